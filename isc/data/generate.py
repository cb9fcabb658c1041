"""Generate D2LV-style training sets of augmented copies on disk, sharded, resumable and parallel.

Every k-th source image becomes a class holding the original (resized) plus ``copies`` edited copies.
Copy ``i`` of class ``c`` is a pure function of ``(seed, c, i)`` (see :func:`isc.augment.rng_for`), so
a run can be split across machines (``shard=(i, n)``), killed and resumed (finished files are
skipped), and always produces the same bytes as one uninterrupted run.

Layout::

    out_dir/<class_id>/00.jpg      the original, resized
    out_dir/<class_id>/01.jpg ...  the copies
    out_dir/manifest.csv           class_id,file,source,recipe,copy_index,seed (one per shard if sharded)
    out_dir/contact_sheet.png      originals beside their first copies
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from isc.augment import Resize, Transform, rng_for
from isc.data.images import ImageLoadError, load_image
from isc.evaluation.io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["GenerationSummary", "select_classes", "generate_copies_dataset", "contact_sheet", "parse_shard"]

MANIFEST_HEADER = ("class_id", "file", "source", "recipe", "copy_index", "seed")


@dataclass
class GenerationSummary:
    """What a generation run did; ``failed`` lists unreadable sources as ``(path, reason)``."""

    classes: int = 0
    written: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    manifest: Path | None = None
    contact_sheet: Path | None = None


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


def _init_worker(settings: _Settings) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; torchvision ops must not oversubscribe
    _SETTINGS[:] = [settings]


def _generate_class(job: tuple[str, Path]) -> tuple[str, int, int, str | None]:
    """Write the missing files of one class: ``(class_id, written, skipped, error)``."""
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
    missing = [i for i in range(copies + 1) if not _copy_path(out_dir, class_id, i).is_file()]
    if not missing:
        return class_id, 0, copies + 1, None
    try:
        image = load_image(source)
    except ImageLoadError as error:
        return class_id, 0, 0, error.reason
    resize = Resize(size)
    original = getattr(transform, "original", None)  # e.g. D2LV's bw sets store greyscale originals
    for i in missing:
        if i == 0:
            first = original(image, rng_for(seed, class_id, 0)) if original is not None else image
            out = resize(first, rng_for(seed, class_id, 0))
        else:
            out = transform(image, rng_for(seed, class_id, i))
            if out.size != (size, size):
                out = resize(out, rng_for(seed, class_id, i))
        _save_jpeg(out.convert("RGB"), _copy_path(out_dir, class_id, i), quality)
    return class_id, len(missing), copies + 1 - len(missing), None


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
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_index, shard_count = parse_shard(shard)
    classes = select_classes(sources, every)[shard_index::shard_count]
    summary = GenerationSummary(classes=len(classes))
    settings = _Settings(transform, out, copies, size, seed, jpeg_quality)
    if workers is None:
        workers = os.cpu_count() or 1

    results: list[tuple[str, int, int, str | None]] = []
    bar = tqdm(total=len(classes), desc=f"generate {recipe or 'copies'}", unit="class", disable=not progress)
    if workers <= 1:
        _SETTINGS[:] = [settings]  # in this process: leave the caller's torch thread count alone
        for job in classes:
            results.append(_generate_class(job))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(settings,)) as pool:
            for result in pool.map(_generate_class, classes, chunksize=4):
                results.append(result)
                bar.update()
    bar.close()

    sources_of = dict(classes)
    rows = []
    for class_id, written, skipped, error in results:
        if error is not None:
            summary.failed.append((str(sources_of[class_id]), error))
            continue
        summary.written += written
        summary.skipped_existing += skipped
        rows += [
            (class_id, f"{class_id}/{i:02d}.jpg", str(sources_of[class_id]), recipe, i, seed)
            for i in range(copies + 1)
        ]
    suffix = "" if shard_count == 1 else f"-{shard_index}-of-{shard_count}"
    summary.manifest = out / f"manifest{suffix}.csv"
    _write_csv(summary.manifest, MANIFEST_HEADER, rows)
    if summary.failed:
        _write_csv(out / f"failed{suffix}.csv", ("source", "reason"), summary.failed)
        log.warning(
            "%d unreadable source image(s) skipped, listed in failed%s.csv", len(summary.failed), suffix
        )
    done = [c for c, _, _, e in results if e is None]
    if done and sheet_classes:
        summary.contact_sheet = contact_sheet(out, done[:sheet_classes], copies=min(copies, 9))
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
