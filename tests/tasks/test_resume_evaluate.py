"""A SIGKILLed ``task=evaluate`` resumes from its descriptor shards and writes the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image

from isc.formats.pair_csv import write_ground_truth
from isc.formats.pairs import GroundTruth

ROOT = Path(__file__).resolve().parents[2]


def _benchmark(root: Path, n_refs: int = 48, n_queries: int = 48, n_train: int = 16) -> Path:
    rng = np.random.default_rng(5)
    for split in ("references", "queries", "training"):
        (root / split).mkdir(parents=True)
    refs = [random_image(rng, 96) for _ in range(n_refs)]
    for i, image in enumerate(refs):
        image.save(root / "references" / f"R{i:06d}.png")
    for i in range(n_train):
        random_image(rng, 96).save(root / "training" / f"T{i:06d}.png")
    q_ids, r_ids = [], []
    for q in range(n_queries):
        matched = q % 2 == 0
        image = refs[q % n_refs].rotate(10) if matched else random_image(rng, 96)
        image.save(root / "queries" / f"Q{q:05d}.png")
        q_ids.append(f"Q{q:05d}")
        r_ids.append(f"R{q % n_refs:06d}" if matched else "")
    write_ground_truth(root / "ground_truth.csv", GroundTruth(q_ids, r_ids))
    return root


def _command(bench: Path, out: Path, cache: Path | None, workers: int = 0) -> list[str]:
    return [
        sys.executable,
        "run.py",
        "task=evaluate",
        f"dataset.root={bench}",
        f"evaluation.cache_dir={cache if cache else 'null'}",
        "evaluation.shard_size=8",
        "evaluation.batch_size=8",
        f"evaluation.num_workers={workers}",
        "evaluation.image_size=160",
        f"hydra.run.dir={out}",
    ]


def _run(command: list[str], tmp: Path) -> str:
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ISC_CACHE_DIR": str(tmp / "bench-cache")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _alive(session: int) -> bool:
    """Whether any process of the process group ``session`` (started with start_new_session) lives on."""
    try:
        os.killpg(session, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(600)
def test_a_killed_evaluate_resumes_from_its_shards_to_the_same_bytes(tmp_path: Path) -> None:
    bench = _benchmark(tmp_path / "bench")
    cache = tmp_path / "shards"
    killed = subprocess.Popen(
        _command(bench, tmp_path / "killed", cache, workers=2),  # DataLoader workers must die too
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "ISC_CACHE_DIR": str(tmp_path / "bench-cache")},
    )
    deadline = time.monotonic() + 240
    while len(list(cache.rglob("shard-*.h5"))) < 2:
        assert killed.poll() is None, "the run ended before two shards were written"
        assert time.monotonic() < deadline, "no shards after 240 s"
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 15  # torch's workers notice a dead parent within ~5 s
    while _alive(killed.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(killed.pid), "processes of the killed run are still alive"
    finished_before = sorted(p.relative_to(cache) for p in cache.rglob("shard-*.h5"))
    assert not list((tmp_path / "killed").glob("predictions.csv")), "a killed run wrote no outputs"
    assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.startswith("shard-")], "temp files"

    log = _run(_command(bench, tmp_path / "resumed", cache), tmp_path)
    assert "reused" in log
    reused = sum(int(part.split(" of ")[0].split()[-1]) for part in log.split("reused ")[1:])
    assert reused >= len(finished_before) >= 2  # at least the shards the killed run had finished
    _run(_command(bench, tmp_path / "fresh", None), tmp_path)  # no cache: one uninterrupted run
    for name in ("predictions.csv", "descriptors.h5"):
        resumed, fresh = (tmp_path / d / name for d in ("resumed", "fresh"))
        assert resumed.read_bytes() == fresh.read_bytes(), name
