"""Generate D2LV-style training sets of augmented copies on disk, sharded, resumable and parallel.

Every k-th source image becomes a class holding the original (resized) plus ``copies`` edited copies.
Copy ``i`` of class ``c`` is a pure function of ``(seed, c, i)`` (see :func:`isc.augment.rng_for`), so
a run can be split across machines (``shard=(i, n)``), killed and resumed (finished files are
skipped), and always produces the same bytes as one uninterrupted run.

Layout::

    out_dir/<class_id>/00.jpg          the original, resized
    out_dir/<class_id>/01.jpg ...      the copies
    out_dir/<class_id>/boxes.csv       where each copy of the class shows a pasted image (isc.formats.paste_boxes)
    out_dir/boxes.csv                  those rows for every class of the run (boxes-i-of-n.csv for a shard)
    out_dir/manifest.csv               class_id,file,source,recipe,copy_index,seed (one per shard if sharded)
    out_dir/manifest.partial.csv       the same rows, for the classes finished so far (only while running)
    out_dir/failed.csv                 source,reason for unreadable sources (only if there were any)
    out_dir/contact_sheet.png          originals beside their first copies

Interruptions (Linux and macOS):

* Images are written through :func:`isc.formats.files.atomic_write` (a hidden ``.NN.jpg.<pid>.<hex>.tmp``
  file renamed into place), so a file named ``NN.jpg`` is always complete. A temporary file left by a
  killed writer is never taken for an output, and the next run over that class deletes it.
* The manifest is built incrementally: the rows of each finished class (all its files on disk) are
  appended, in class order, to ``manifest.partial.csv`` (``manifest-i-of-n.partial.csv`` for a shard),
  fsynced every few seconds. A finished run renames it to ``manifest.csv``, which is therefore only
  ever replaced whole and, once there, always complete. Every run (a resume included) starts a fresh
  partial manifest and refills it from what it finds on disk, so after a kill and a re-run the final
  manifest is byte for byte that of an uninterrupted run. After a ``SIGKILL`` in the middle of an
  append, the partial manifest's last line may be cut short; nothing else in it can be wrong.
* Pool workers die with the main process: on Linux they ask the kernel for ``SIGKILL`` when their
  parent exits (``prctl(PR_SET_PDEATHSIG)``), and everywhere a watchdog thread in each worker exits it
  within about a second once its parent is gone. So even a ``kill -9`` leaves no orphan writing on.
* ``SIGINT`` (``KeyboardInterrupt``) and ``SIGTERM`` (turned into ``SystemExit(143)`` for the length of
  the call, when called from the main thread and no handler of the caller's own is installed) cancel
  the queued work, terminate the workers, remove their half-written temporary files and propagate.
  Workers ignore ``SIGINT``, so a Ctrl-C reaches them only through the main process.

Two runs over the same class folders at the same time are not supported (they would delete each
other's temporary files).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from isc.augment import Resize, Transform, record_pastes, rng_for
from isc.data.images import ImageLoadError, load_image
from isc.formats.files import atomic_write
from isc.formats.paste_boxes import PasteBox, read_paste_boxes, write_paste_boxes

log = logging.getLogger(__name__)

__all__ = ["GenerationSummary", "select_classes", "generate_copies_dataset", "contact_sheet", "parse_shard"]

MANIFEST_HEADER = ("class_id", "file", "source", "recipe", "copy_index", "seed")

_CHUNK = 4  # classes per pool task
_MANIFEST_SYNC_S = 5.0  # fsync the partial manifest at most this often
_PARENT_POLL_S = 1.0  # how often a worker's watchdog checks that its parent is still there
_WORKER_STOP_S = 5.0  # after SIGTERM, how long workers get before SIGKILL
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# atomic_write's temporary name for NN.jpg (or the class's boxes.csv): .NN.jpg.<pid>.<hex>.tmp
_IMAGE_TEMP = re.compile(r"\.(\d+\.jpg|boxes\.csv)\.\d+\.[0-9a-f]+\.tmp")
BOXES_NAME = "boxes.csv"  # per class, and merged for the run

_Result = tuple[str, int, int, str | None]


@dataclass
class GenerationSummary:
    """What a generation run did; ``failed`` lists unreadable sources as ``(path, reason)``."""

    classes: int = 0
    written: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    manifest: Path | None = None
    contact_sheet: Path | None = None
    boxes: Path | None = None  # the run's paste-box CSV (isc.formats.paste_boxes)
    pasted: int = 0  # copies showing a pasted image (with an exact box or not)


def parse_shard(shard: str | Sequence[int] | None) -> tuple[int, int]:
    """``"i/n"`` (or ``(i, n)``) -> ``(i, n)`` with 0 <= i < n; ``None`` means the whole job."""
    if shard is None or shard == "":
        return 0, 1
    if isinstance(shard, str):
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like 'i/n' (e.g. 0/4), got {shard!r}") from None
    else:
        i, n = (int(x) for x in shard)
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    return i, n


def select_classes(sources: Sequence[str | os.PathLike[str]], every: int = 10) -> list[tuple[str, Path]]:
    """Every ``every``-th source (in sorted path order) as ``(class_id, path)``.

    The class id is the file name without extension when those are unique (DISC21 ``T000010``), else
    the path relative to the common folder with ``/`` replaced by ``_`` (e.g. ``accordion_image_0001``).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    paths = sorted(Path(p) for p in sources)[::every]
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return list(zip(stems, paths, strict=True))
    common = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path()
    ids = ["_".join(p.relative_to(common).with_suffix("").parts) for p in paths]
    return list(zip(ids, paths, strict=True))


def _copy_path(out_dir: Path, class_id: str, copy_index: int) -> Path:
    return out_dir / class_id / f"{copy_index:02d}.jpg"


def _save_jpeg(image: Image.Image, path: Path, quality: int) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    with atomic_write(path, durable=False) as tmp:  # no fsync: millions of files; a kill is still safe
        tmp.write_bytes(buffer.getvalue())


def _remove_stale_temps(class_dir: Path) -> int:
    """Delete the temporary image files a killed writer left in ``class_dir``; returns how many."""
    try:
        with os.scandir(class_dir) as entries:
            stale = [entry.path for entry in entries if _IMAGE_TEMP.fullmatch(entry.name)]
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return len(stale)


@dataclass(frozen=True)
class _Settings:
    transform: Transform
    out_dir: Path
    copies: int
    size: int
    seed: int
    quality: int


# Set once per worker process by the pool initialiser, so the transform is not re-sent with every task.
_SETTINGS: list[_Settings] = []


# ---------------------------------------------------------------------------------------------------
# workers that die with their parent


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there; the ppid check has to do
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _set_parent_death_signal() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent (the thread that forked it) exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, ppid: int) -> None:
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != ppid or not _pid_alive(parent_pid):  # re-parented, or the main process gone
            os._exit(1)


def _die_with_parent(parent_pid: int, direct_child: bool) -> None:
    """Make sure this worker does not outlive ``parent_pid``, the process that runs the pool.

    ``direct_child``: the worker was forked or spawned by that process itself (``fork`` / ``spawn``),
    not by a ``forkserver`` (which exits after the main process; the worker's death signal or its
    watchdog, seeing it re-parented, then ends the worker too).
    The death signal is set first and the parent checked after, so a parent that died in between
    is noticed too; the watchdog thread covers systems without ``prctl`` (and is cheap: one check a
    second). CPython's ProcessPoolExecutor starts its workers from the thread that submits the first
    task (``fork``: all at once; ``spawn``: on demand from ``submit``), here the thread running
    :func:`generate_copies_dataset`, which outlives the pool, so the Linux death signal fires exactly
    when the main process dies.
    """
    _set_parent_death_signal()
    ppid = os.getppid()
    if (direct_child and ppid != parent_pid) or not _pid_alive(parent_pid):
        os._exit(1)  # the parent died before the death signal was armed
    threading.Thread(target=_watch_parent, args=(parent_pid, ppid), name="parent-watch", daemon=True).start()


def _init_worker(settings: _Settings, parent_pid: int, direct_child: bool) -> None:
    _die_with_parent(parent_pid, direct_child)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the inherited handler: terminate() must kill
    import torch

    torch.set_num_threads(1)  # one process per core; torchvision ops must not oversubscribe
    _SETTINGS[:] = [settings]


def _generate_class(job: tuple[str, Path]) -> _Result:
    """Write the missing files of one class: ``(class_id, written, skipped, error)``.

    The class's ``boxes.csv`` is written last, so a class is finished when it is there with every image.
    A class whose images are all there but not its boxes (killed in between, or made before boxes were
    recorded) has its copies' edits redone, without rewriting them, to recover the boxes: every copy is a
    pure function of ``(seed, class, index)``.
    """
    class_id, source = job
    s = _SETTINGS[0]
    out_dir, copies, size, seed, quality, transform = (
        s.out_dir,
        s.copies,
        s.size,
        s.seed,
        s.quality,
        s.transform,
    )
    boxes_path = out_dir / class_id / BOXES_NAME
    missing = [i for i in range(copies + 1) if not _copy_path(out_dir, class_id, i).is_file()]
    need_boxes = not boxes_path.is_file()
    if not missing and not need_boxes:
        return class_id, 0, copies + 1, None
    _remove_stale_temps(out_dir / class_id)  # left by a killed run (only ever next to a missing file)
    try:
        image = load_image(source)
    except ImageLoadError as error:
        return class_id, 0, 0, error.reason
    resize = Resize(size)
    original = getattr(transform, "original", None)  # e.g. D2LV's bw sets store greyscale originals
    todo = sorted(set(missing) | (set(range(1, copies + 1)) if need_boxes else set()))
    boxes: dict[str, PasteBox] = {}
    for i in todo:
        if i == 0:
            first = original(image, rng_for(seed, class_id, 0)) if original is not None else image
            out = resize(first, rng_for(seed, class_id, 0))
        else:
            with record_pastes() as record:
                out = transform(image, rng_for(seed, class_id, i))
                if out.size != (size, size):
                    out = resize(out, rng_for(seed, class_id, i))
            if record.pasted:
                boxes[f"{class_id}/{i:02d}"] = record.box
        if i in missing:
            _save_jpeg(out.convert("RGB"), _copy_path(out_dir, class_id, i), quality)
    if need_boxes:
        write_paste_boxes(boxes_path, boxes)
    return class_id, len(missing), copies + 1 - len(missing), None


def _generate_chunk(jobs: Sequence[tuple[str, Path]]) -> list[_Result]:
    return [_generate_class(job) for job in jobs]


# ---------------------------------------------------------------------------------------------------
# the incremental manifest and interruptions


class _PartialManifest:
    """Rows appended, class by class, to ``manifest*.partial.csv``; :meth:`finish` renames it into place.

    Each class's rows go out in one ``os.write`` of whole lines on an ``O_APPEND`` descriptor (nothing
    buffered in this process), so what a kill leaves is the rows of the classes finished so far.
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self.partial = final.with_name(f"{final.stem}.partial{final.suffix}")
        _write_csv(self.partial, MANIFEST_HEADER, [])  # a fresh start: replaces a killed run's partial
        self._fd = os.open(self.partial, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
        self._synced = time.monotonic()

    def add(self, rows: Sequence[Sequence[object]]) -> None:
        text = io.StringIO()
        csv.writer(text).writerows(rows)  # the bytes _write_csv writes: utf-8, \r\n line ends
        data = memoryview(text.getvalue().encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data) :]
        if time.monotonic() - self._synced >= _MANIFEST_SYNC_S:
            os.fsync(self._fd)
            self._synced = time.monotonic()

    def finish(self) -> Path:
        os.fsync(self._fd)
        self.close()
        os.replace(self.partial, self.final)
        return self.final

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@contextlib.contextmanager
def _sigterm_raises_system_exit() -> Iterator[None]:
    """For the duration: SIGTERM raises ``SystemExit(143)`` (so cleanup runs) instead of killing.

    Only from the main thread (the only one that may set handlers) and only over the default action:
    a caller's own handler, or SIG_IGN, is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _stop_pool(pool: ProcessPoolExecutor, pending: deque[tuple[Future[list[_Result]], list[tuple[str, Path]]]],
               out: Path) -> None:  # fmt: skip
    """Cancel queued work, terminate (then kill) the workers, delete their half-written temporary files."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # private; gone after shutdown
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()  # SIGTERM: the workers reset it to the default action (die at once)
    deadline = time.monotonic() + _WORKER_STOP_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(1.0)
    if any(process.is_alive() for process in processes):
        log.warning("generation interrupted: %d worker(s) did not stop", sum(p.is_alive() for p in processes))
        return
    # With every worker dead no class is being written; the ones that were (or had been handed to a
    # worker) are the running futures and those the pool failed on their behalf.
    for future, chunk in pending:
        if future.running() or (future.done() and not future.cancelled() and future.exception() is not None):
            for class_id, _ in chunk:
                _remove_stale_temps(out / class_id)


def _results_in_pool(
    classes: Sequence[tuple[str, Path]], settings: _Settings, workers: int
) -> Iterator[_Result]:
    """Results of every class, in class order, from ``workers`` processes; stopped cleanly on any error."""
    context = multiprocessing.get_context()
    direct_child = context.get_start_method() in ("fork", "spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(settings, os.getpid(), direct_child)
    )
    pending: deque[tuple[Future[list[_Result]], list[tuple[str, Path]]]] = deque()
    try:
        for start in range(0, len(classes), _CHUNK):
            chunk = list(classes[start : start + _CHUNK])
            pending.append((pool.submit(_generate_chunk, chunk), chunk))
        while pending:
            results = pending[0][0].result()
            pending.popleft()
            yield from results
        pool.shutdown(wait=True)
    except BaseException:  # KeyboardInterrupt, SystemExit from SIGTERM, a worker's error, GeneratorExit
        _stop_pool(pool, pending, settings.out_dir)
        raise


def _remove_stale_outputs(out: Path, names: Sequence[str]) -> None:
    """Delete atomic_write temporaries of ``names`` in ``out`` that a killed run left behind."""
    for name in names:
        for path in out.glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def generate_copies_dataset(
    sources: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    transform: Transform,
    *,
    copies: int = 19,
    every: int = 10,
    size: int = 256,
    seed: int = 0,
    recipe: str = "",
    shard: str | tuple[int, int] | None = None,
    workers: int | None = None,
    jpeg_quality: int = 100,
    progress: bool = True,
    sheet_classes: int = 8,
) -> GenerationSummary:
    """Build (or finish) a generated training set; returns counts, failures and output paths.

    ``workers`` defaults to every core; ``workers=0`` runs in this process (handy for debugging).
    Unreadable sources are logged, counted and listed in ``failed.csv``; they never stop the run.
    The manifest grows as classes finish (``manifest.partial.csv``, renamed to ``manifest.csv`` at the
    end); an interrupted run (Ctrl-C, SIGTERM, even SIGKILL) leaves no worker behind, and running the
    same call again finishes the set (see the module docstring).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_index, shard_count = parse_shard(shard)
    classes = select_classes(sources, every)[shard_index::shard_count]
    summary = GenerationSummary(classes=len(classes))
    settings = _Settings(transform, out, copies, size, seed, jpeg_quality)
    if workers is None:
        workers = os.cpu_count() or 1
    suffix = "" if shard_count == 1 else f"-{shard_index}-of-{shard_count}"
    boxes_name = f"boxes{suffix}.csv"
    _remove_stale_outputs(
        out, [f"manifest{suffix}.csv", f"manifest{suffix}.partial.csv", f"failed{suffix}.csv", boxes_name]
    )

    sources_of = dict(classes)
    done: list[str] = []  # the first sheet_classes finished classes, for the contact sheet
    finished: list[str] = []  # every finished class, for the run's boxes.csv
    bar = tqdm(total=len(classes), desc=f"generate {recipe or 'copies'}", unit="class", disable=not progress)
    with _sigterm_raises_system_exit():
        manifest = _PartialManifest(out / f"manifest{suffix}.csv")
        results: Iterator[_Result] = iter(())
        try:
            if workers <= 1:
                _SETTINGS[:] = [settings]  # in this process: leave the caller's torch thread count alone
                results = map(_generate_class, classes)
            else:
                results = _results_in_pool(classes, settings, workers)
            for class_id, written, skipped, error in results:
                bar.update()
                if error is not None:
                    summary.failed.append((str(sources_of[class_id]), error))
                    continue
                summary.written += written
                summary.skipped_existing += skipped
                manifest.add(
                    [
                        (class_id, f"{class_id}/{i:02d}.jpg", str(sources_of[class_id]), recipe, i, seed)
                        for i in range(copies + 1)
                    ]
                )
                finished.append(class_id)
                if len(done) < sheet_classes:
                    done.append(class_id)
            summary.manifest = manifest.finish()
        finally:
            if isinstance(results, Generator):  # interrupted here rather than inside it: stop the pool now
                results.close()
            manifest.close()
            bar.close()

    run_boxes: dict[str, PasteBox] = {}
    for class_id in finished:
        run_boxes.update(read_paste_boxes(out / class_id / BOXES_NAME))
    summary.boxes, summary.pasted = write_paste_boxes(out / boxes_name, run_boxes), len(run_boxes)
    if summary.failed:
        _write_csv(out / f"failed{suffix}.csv", ("source", "reason"), summary.failed)
        log.warning(
            "%d unreadable source image(s) skipped, listed in failed%s.csv", len(summary.failed), suffix
        )
    if done and sheet_classes:
        summary.contact_sheet = contact_sheet(out, done, copies=min(copies, 9))
    return summary


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def contact_sheet(
    out_dir: str | os.PathLike[str],
    class_ids: Sequence[str],
    copies: int = 9,
    thumb: int = 112,
    name: str = "contact_sheet.png",
) -> Path:
    """One row per class: the original, then its first ``copies`` copies; written atomically as a PNG."""
    out = Path(out_dir)
    pad, label_h = 4, 14
    sheet = Image.new(
        "RGB", ((copies + 1) * (thumb + pad) + pad, len(class_ids) * (thumb + pad + label_h) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for row, class_id in enumerate(class_ids):
        y = pad + row * (thumb + pad + label_h)
        draw.text((pad, y), f"{class_id}: original, then copies 1-{copies}", fill=(0, 0, 0))
        for col in range(copies + 1):
            path = _copy_path(out, class_id, col)
            if not path.is_file():
                continue
            with Image.open(path) as img:
                tile = img.convert("RGB").resize((thumb, thumb), Image.Resampling.BILINEAR)
            sheet.paste(tile, (pad + col * (thumb + pad), y + label_h))
    target = out / name
    with atomic_write(target) as tmp:
        sheet.save(tmp, format="PNG")
    return target
