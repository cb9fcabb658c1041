"""A generation run that is killed (SIGKILL, SIGTERM, Ctrl-C) leaves no workers, no fake outputs, and
a manifest of what is on disk; running it again gives the bytes of an uninterrupted run."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from isc.augment import synthetic_image

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; relies on POSIX signals")

CLASSES, COPIES, SIZE = 40, 5, 48
SLOW = 0.1  # seconds per copy in the runs to be killed: about 10 s of work on 2 workers
TEMP = re.compile(r"\.\d+\.jpg\.\d+\.[0-9a-f]+\.tmp")  # atomic_write's temporary name for NN.jpg

SCRIPT = f"""
import signal
import sys
import time
from pathlib import Path

from isc.data.generate import generate_copies_dataset

SIZE = {SIZE}


class SlowRotate:
    def __init__(self, delay):
        self.delay = delay

    def __call__(self, image, rng):
        if self.delay:
            time.sleep(self.delay)
        return image.rotate(float(rng.uniform(-40, 40))).resize((SIZE, SIZE))


def run(src, out, delay, workers):
    sources = sorted(Path(src).glob("*.png"))
    return generate_copies_dataset(sources, out, SlowRotate(delay), copies={COPIES}, every=1, size=SIZE,
                                   seed=11, recipe="kill-test", workers=workers, progress=False,
                                   sheet_classes=2)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    run(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
"""


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, ModuleType]:
    """(script, sources folder, the script imported here)."""
    root = tmp_path_factory.mktemp("kill")
    src = root / "src"
    src.mkdir()
    for i in range(CLASSES):
        synthetic_image(np.random.default_rng(i), (64, 64)).save(src / f"S{i:03d}.png")
    script = root / "gen_script.py"
    script.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("gen_kill_script", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return script, src, module


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> dict[str, bytes]:
    """Every file of one uninterrupted run (in this process), by relative path."""
    _, src, module = setup
    out = tmp_path_factory.mktemp("reference")
    module.run(src, out, 0.0, 0)
    return files(out)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, from /proc; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def children(pid: int) -> dict[int, int]:
    """Live children of ``pid``: pid -> start time (to tell a reused pid apart)."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := proc_stat(int(name))) and stat[1] == pid and stat[0] not in "ZX":
            found[int(name)] = stat[2]
    return found


def alive(processes: dict[int, int]) -> list[int]:
    """Those of ``processes`` still running (a zombie nobody reaped has stopped: it counts as gone)."""
    return [
        pid
        for pid, start in processes.items()
        if (stat := proc_stat(pid)) is not None and stat[2] == start and stat[0] not in "ZX"
    ]


def images(out: Path) -> list[Path]:
    return sorted(out.glob("*/*.jpg"))


def manifest_rows(out: Path) -> int:
    try:
        return (out / "manifest.partial.csv").read_bytes().count(b"\n") - 1
    except FileNotFoundError:
        return 0


def temps(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.name.endswith(".tmp"))


@contextlib.contextmanager
def started(script: Path, src: Path, out: Path, delay: float, workers: int = 2, min_images: int = 8,
            min_rows: int = 0):  # fmt: skip
    """The script, in its own session, once it has written ``min_images`` images and ``min_rows``
    manifest rows (or three tasks' worth of images); yields the process, its children and its log.

    On the way out every process of the session is SIGKILLed, so a failing test leaves no orphans.
    """
    log = out.parent / f"{out.name}.log"
    kids: dict[int, int] = {}
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(src), str(out), str(delay), str(workers)],
            cwd=Path(__file__).resolve().parents[2],
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while len(images(out)) < min_images or (manifest_rows(out) < min_rows and len(images(out)) < 72):
            assert proc.poll() is None, f"the generator exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no images after 60 s"
            time.sleep(0.05)
        kids = children(proc.pid)
        while workers > 1 and len(kids) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
            kids = children(proc.pid)
        yield proc, kids, log
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in alive(kids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def wait_gone(processes: dict[int, int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def check_consistent(out: Path, reference: dict[str, bytes]) -> list[list[str]]:
    """What an interrupted run left is true: every ``NN.jpg`` whole (the reference's bytes), nothing
    else but hidden temporaries, no final manifest, and a partial manifest that is a prefix of the
    final one listing only complete classes. Returns the partial manifest's rows."""
    for path in out.rglob("*"):
        if path.is_file() and path.parent != out:
            rel = str(path.relative_to(out))
            assert re.fullmatch(r"\d\d\.jpg|boxes\.csv", path.name) or TEMP.fullmatch(path.name), rel
            if path.suffix in (".jpg", ".csv"):  # a class's boxes.csv is written whole, after its images
                assert path.read_bytes() == reference[rel], f"{rel} differs from the uninterrupted run"
    assert not (out / "manifest.csv").exists(), "an interrupted run must not look finished"
    partial = (out / "manifest.partial.csv").read_bytes()
    final = reference["manifest.csv"]
    assert partial.endswith(b"\r\n") and final.startswith(partial), "not a prefix of the final manifest"
    rows = list(csv.reader(io.StringIO(partial.decode())))[1:]
    for row in rows:
        assert (out / row[1]).is_file(), f"the manifest lists {row[1]}, which is not on disk"
    assert len(rows) % (COPIES + 1) == 0  # whole classes only
    return rows


# ----------------------------------------------------------------------------- tests


def test_sigkill_leaves_no_orphans_and_a_rerun_equals_an_uninterrupted_run(setup, reference, tmp_path):
    script, src, _ = setup
    out = tmp_path / "out"
    with started(script, src, out, SLOW) as (proc, kids, log):
        assert len(kids) >= 2, f"expected 2 pool workers, found {kids}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = wait_gone(kids, 3.0)
        assert not left, f"workers {left} outlived their SIGKILLed parent"
    count = len(images(out))
    time.sleep(1.0)
    assert len(images(out)) == count, "files still being written after the kill"
    assert count < CLASSES * (COPIES + 1), "the kill came too late to test anything"
    check_consistent(out, reference)

    # a stale temporary file from an even earlier kill, next to a missing image: ignored, then removed
    last = out / f"S{CLASSES - 1:03d}"
    last.mkdir(exist_ok=True)
    (last / ".03.jpg.99999.0badc0de.tmp").write_bytes(b"half a jpeg")
    done = subprocess.run(
        [sys.executable, str(script), str(src), str(out), "0", "2"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert not temps(out)
    assert files(out) == reference  # images, manifest.csv, contact sheet: byte for byte


def test_sigterm_stops_promptly_without_orphans_or_temporaries(setup, reference, tmp_path):
    script, src, _ = setup
    out = tmp_path / "out"
    with started(script, src, out, SLOW, min_rows=1) as (proc, kids, log):
        assert len(kids) >= 2, f"expected 2 pool workers, found {kids}"
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        try:
            returncode = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM did not stop the generator within 5 s")
        assert time.monotonic() - start < 5
        left = wait_gone(kids, 1.0)
        assert not left, f"workers {left} outlived their SIGTERMed parent"
        assert returncode == 128 + signal.SIGTERM, log.read_text()  # SystemExit(143), not killed
    assert not temps(out), "the interrupted workers' temporary files were left behind"
    rows = check_consistent(out, reference)
    assert rows  # some classes were finished and listed


def test_ctrl_c_stops_promptly_without_orphans(setup, reference, tmp_path):
    script, src, _ = setup
    out = tmp_path / "out"
    with started(script, src, out, round(3 * SLOW, 3)) as (proc, kids, log):  # 1.8 s per class
        assert len(kids) >= 2, f"expected 2 pool workers, found {kids}"
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)  # the main process only: the workers must be stopped by it
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("Ctrl-C did not stop the generator within 10 s")
        # not after finishing the work already handed to the workers (4 classes each, and one more task)
        assert time.monotonic() - start < 3.0, "Ctrl-C waited for the work in flight"
        assert "KeyboardInterrupt" in log.read_text()
        left = wait_gone(kids, 1.0)
        assert not left, f"workers {left} outlived their interrupted parent"
    assert not temps(out)
    check_consistent(out, reference)


@pytest.mark.slow
def test_sigterm_in_process_run(setup, reference, tmp_path):
    """``workers=0``: SIGTERM still ends the run cleanly, with a true partial manifest."""
    script, src, _ = setup
    out = tmp_path / "out"
    with started(script, src, out, SLOW, workers=0, min_images=4) as (proc, _, log):
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=5) == 128 + signal.SIGTERM, log.read_text()
    assert not temps(out)
    check_consistent(out, reference)


def test_sigterm_handler_is_restored_and_threads_are_fine(setup, tmp_path):
    """The SIGTERM handler is only borrowed for the call; from another thread none is installed."""
    _, src, module = setup
    before = signal.getsignal(signal.SIGTERM)
    module.run(src, tmp_path / "main", 0.0, 0)
    assert signal.getsignal(signal.SIGTERM) is before
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            module.run(src, tmp_path / "thread", 0.0, 0)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert not errors
    assert files(tmp_path / "thread") == files(tmp_path / "main")
    with Image.open(tmp_path / "main" / "S000" / "01.jpg") as img:
        assert img.size == (SIZE, SIZE)
