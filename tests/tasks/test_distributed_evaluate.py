"""``task=evaluate`` in a group of processes gives what one process gives.

Each rank extracts its share of the shards (``isc.evaluation.distributed``), rank 0 matches and writes:
the metrics, ``predictions.csv`` and the descriptors must equal a one-process run's, with local
verification too; a rank that fails ends the group, naming the file, and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, ddp_env, make_copy_benchmark

import tasks
from isc.data.images import screen_quick
from isc.formats.descriptor_files import read_descriptors

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))

from test_ddp_faults import _corrupt_pixels  # noqa: E402

# shards of 4 images (batches of 2): every split has shards for both ranks
TINY = [
    "evaluation.image_size=32",
    "evaluation.num_workers=0",
    "evaluation.batch_size=2",
    "evaluation.shard_size=4",
    "evaluation.score_normalization.k=2",
]
TEST_STAGE = [
    "evaluation.scales=[32,40]",
    "evaluation.local_verification.enabled=true",
    "evaluation.local_verification.reference_crops=true",
    "evaluation.local_verification.query.min_size=8",
    "evaluation.local_verification.query.proposals.max_proposals=2",
]
TIMES = ("seconds",)  # seconds_per_query: wall-clock time


def two_processes(args: list[str], out: Path, cache: Path, **popen: object) -> subprocess.Popen:
    command = [
        sys.executable,
        "run.py",
        "task=evaluate",
        *args,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        f"evaluation.cache_dir={cache}",
        f"hydra.run.dir={out}",
    ]
    env = ddp_env() | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen
    )


def figures(metrics: dict) -> dict:
    """The metrics without wall-clock times, which differ between any two runs."""
    if isinstance(metrics, dict):
        return {k: figures(v) for k, v in metrics.items() if not any(t in k for t in TIMES) and k != "report"}
    if isinstance(metrics, list):
        return [figures(v) for v in metrics]
    return metrics


@pytest.mark.ddp
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", ["global", "test stage"])
def test_two_processes_give_the_figures_files_and_descriptors_of_one(
    stage: str, benchmark: Path, tmp_path: Path
) -> None:
    args = [f"dataset.root={benchmark}", *TINY, *(TEST_STAGE if stage == "test stage" else [])]
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two ranks on this 2-core machine (Lightning gives cpus / ranks)
    try:
        tasks.evaluate(compose_cfg([*args, f"evaluation.cache_dir={tmp_path / 'cache-one'}"], one))
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    job = two_processes(args, two, tmp_path / "cache-two")
    output = job.communicate(timeout=500)[0].decode(errors="replace")
    assert job.returncode == 0, output[-4000:]
    for split in ("queries", "training", "references" if stage == "global" else "references-000000000"):
        assert f"{split}: rank 1 of 2 computed " in output, f"rank 1 did no {split} shard"
    assert "rank 1 of 2 computed 0" not in output.split("references")[0]  # each split: work on both

    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert figures(got) == figures(expected)
    a, b = (read_descriptors(d / "descriptors.h5") for d in (one, two))
    for x, y in ((a.query, b.query), (a.reference, b.reference), (a.training, b.training)):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)
    assert list(a.query_ids) == list(b.query_ids) and list(a.reference_ids) == list(b.reference_ids)
    assert (two / "predictions.csv").read_bytes() == (one / "predictions.csv").read_bytes()


@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_an_image_that_fails_on_one_rank_ends_the_group_naming_it(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    bench = make_copy_benchmark(tmp_path / "bench")
    bad = bench / "references" / "R000013.png"  # in shard 3: rank 1's
    _corrupt_pixels(bad)
    assert screen_quick([bad], "test")[1] == []  # the pre-pass lets it through: only its rank fails
    started = time.monotonic()
    job = two_processes(
        [f"dataset.root={bench}", *TINY], tmp_path / "run", tmp_path / "cache", start_new_session=True
    )
    try:
        output = job.communicate(timeout=300)[0].decode(errors="replace")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "rank 1 of 2 failed" in output and "R000013.png" in output, output[-3000:]
    assert not (tmp_path / "run" / "predictions.csv").exists()
    time.sleep(2)
    with pytest.raises(ProcessLookupError):  # rank 1 and every worker are gone too
        os.killpg(job.pid, 0)
    assert time.monotonic() - started < 240
