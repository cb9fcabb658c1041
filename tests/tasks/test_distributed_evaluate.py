"""``task=evaluate`` in a group of processes gives what one process gives.

Each rank extracts its share of the shards (``isc.evaluation.distributed``), rank 0 matches and writes:
the metrics, ``predictions.csv`` and the descriptors must equal a one-process run's, with local
verification too; a rank that fails ends the group, naming the file, and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, corrupt_pixels, ddp_env, make_copy_benchmark

import tasks
from isc.data.images import screen_quick
from isc.formats.descriptor_files import read_descriptors

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))

# shards of 4 images (batches of 2): every split has shards for both ranks
TINY = [
    "evaluation.image_size=32",
    "evaluation.num_workers=0",
    "evaluation.batch_size=2",
    "evaluation.shard_size=4",
    "evaluation.score_normalization.k=2",
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


def same_outputs(one: Path, two: Path) -> None:
    """The figures, the CSV's bytes, and the descriptors to 1e-6."""
    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert figures(got) == figures(expected)
    assert (two / "predictions.csv").read_bytes() == (one / "predictions.csv").read_bytes()
    a, b = (read_descriptors(d / "descriptors.h5") for d in (one, two))
    for x, y in ((a.query, b.query), (a.reference, b.reference), (a.training, b.training)):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)
    assert list(a.query_ids) == list(b.query_ids) and list(a.reference_ids) == list(b.reference_ids)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """As each of two ranks on this 2-core machine runs (Lightning gives each cpus / ranks threads): the
    same kernels, so the same float rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_process(args: list[str], tmp_path: Path) -> Path:
    """``task=evaluate`` in this process, one thread: the run folder the group's must equal."""
    one = tmp_path / "one"
    with one_thread():
        tasks.evaluate(compose_cfg([*args, f"evaluation.cache_dir={tmp_path / 'cache-one'}"], one))
    return one


@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_two_processes_give_the_figures_files_and_descriptors_of_one(benchmark: Path, tmp_path: Path) -> None:
    args = [f"dataset.root={benchmark}", *TINY]
    one = one_process(args, tmp_path)
    two = tmp_path / "two"
    job = two_processes(args, two, tmp_path / "cache-two")
    output = job.communicate(timeout=500)[0].decode(errors="replace")
    assert job.returncode == 0, output[-4000:]
    for split in ("queries", "references", "training"):  # each rank computed shards of every split
        for rank in (0, 1):
            assert f"{split}: rank {rank} of 2 computed " in output, (split, rank)
            assert f"{split}: rank {rank} of 2 computed 0 " not in output, (split, rank)
    assert "uAP " in output and f"outputs in {two}" in output  # rank 0 prints the headline
    same_outputs(one, two)


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_the_test_stage_of_two_processes_is_the_test_stage_of_one(
    benchmark: Path, ddp_jobs: Path, tmp_path: Path
) -> None:
    """Local verification and reference crops at two scales (``tests/training/ddp_test_stage_job.py``)."""
    import ddp_test_stage_job as job

    from isc.evaluation.distributed import Ranks

    with one_thread():
        job.evaluate(benchmark, tmp_path, Ranks())
    shared = ddp_jobs / "test_stage"
    shards = sorted(p.relative_to(shared / "cache") for p in (shared / "cache").rglob("shard-*.h5"))
    assert len(shards) >= 8 and any("crops" in str(p) for p in shards)
    same_outputs(tmp_path / "run", shared / "run")


def test_an_image_that_fails_on_one_rank_fails_every_rank_naming_it(ddp_jobs: Path) -> None:
    """In the shared launch (``ddp_test_stage_job.py``): rank 1's decode error ends rank 0 too, with it."""
    import ddp_test_stage_job as job

    for rank in (0, 1):
        error = (ddp_jobs / "test_stage" / f"error-{rank}.txt").read_text()
        assert error.startswith("GroupFailed: rank 1 of 2 failed") and job.BAD in error, error
    assert not (ddp_jobs / "test_stage" / "failed" / "predictions.csv").exists()


@pytest.mark.slow  # two process start-ups; the fault's logic is checked above in the shared launch
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_an_image_that_fails_on_one_rank_ends_the_group_naming_it(tmp_path: Path) -> None:
    """The command line: both processes end, the error names the file, no process is left."""
    (tmp_path / "bench").mkdir()
    bench = make_copy_benchmark(tmp_path / "bench")
    bad = bench / "references" / "R000013.png"  # in shard 3: rank 1's
    corrupt_pixels(bad)
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


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_a_killed_group_resumes_from_every_ranks_shards(benchmark: Path, tmp_path: Path) -> None:
    """SIGKILL the group once both ranks have written shards; the rerun reuses them and writes what an
    uninterrupted group writes."""
    args = [f"dataset.root={benchmark}", *TINY, "evaluation.image_size=96", "evaluation.shard_size=2"]
    cache = tmp_path / "cache"
    killed = two_processes(args, tmp_path / "killed", cache, start_new_session=True)
    deadline = time.monotonic() + 240
    while (
        True
    ):  # both ranks' shards of the first split: rank 0 writes shards 0, 2, ..., rank 1 shards 1, 3, ...
        shards = {int(p.stem.split("-")[1]) % 2 for p in cache.rglob("shard-*.h5")}
        if shards == {0, 1}:
            break
        assert killed.poll() is None and time.monotonic() < deadline, "no shards from both ranks"
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    finished = len(list(cache.rglob("shard-*.h5")))
    assert not (tmp_path / "killed" / "predictions.csv").exists()

    resumed = two_processes(args, tmp_path / "resumed", cache)
    output = resumed.communicate(timeout=500)[0].decode(errors="replace")
    assert resumed.returncode == 0, output[-3000:]
    kept = sum(int(part.split(" and kept ")[1].split()[0]) for part in output.split("computed ")[1:])
    assert kept >= finished >= 2  # every shard the killed group had finished is reused, on either rank
    fresh = two_processes(args, tmp_path / "fresh", tmp_path / "cache-fresh")
    output = fresh.communicate(timeout=500)[0].decode(errors="replace")
    assert fresh.returncode == 0, output[-3000:]
    resumed_dir, fresh_dir = tmp_path / "resumed", tmp_path / "fresh"
    assert (resumed_dir / "predictions.csv").read_bytes() == (fresh_dir / "predictions.csv").read_bytes()
    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (fresh_dir, resumed_dir))
    assert figures(got) == figures(expected)


@pytest.mark.slow  # two more process start-ups; Fabric joins the group torchrun made (TorchElasticEnvironment)
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_torchrun_gives_the_group_that_trainer_ddp_starts(benchmark: Path, tmp_path: Path) -> None:
    """README's torchrun command on one node: the figures, files and descriptors of one process."""
    args = [f"dataset.root={benchmark}", *TINY]
    one = one_process(args, tmp_path)
    two = tmp_path / "two"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = ddp_env()
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", f"--master_port={env.pop('MASTER_PORT')}", "run.py"]
        + ["task=evaluate", *args, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
        + [f"evaluation.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={two}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "queries: rank 1 of 2 computed " in done.stdout + done.stderr
    same_outputs(one, two)
