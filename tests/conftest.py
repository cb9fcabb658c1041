"""Shared test helpers: a tiny DISC21-layout benchmark whose matched queries are exact copies, config
composition, and the official uAP of a run's files computed independently of the run."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from isc.evaluation.metrics import evaluate
from isc.formats.pair_csv import read_ground_truth, read_predictions, write_ground_truth
from isc.formats.pairs import GroundTruth

N_REFS, N_MATCHED, N_UNMATCHED, N_TRAIN = 16, 10, 6, 6
ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # under `pytest -n N` the N workers share the cores: each gets its share of threads, and so do the
    # commands it starts (OMP_NUM_THREADS), instead of N x cores threads thrashing
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)


def compose_cfg(*parts: str | Sequence[str] | Path, hydra: bool = False) -> DictConfig:
    """The config ``python run.py <overrides>`` composes, outside ``@hydra.main``.

    ``parts`` are overrides, given one by one or as lists; a ``Path`` among them is the run's output dir
    (default ``/unused``). ``hydra=True`` also returns the ``hydra:`` node.
    """
    overrides: list[str] = []
    out_dir: Path | None = None
    for part in parts:
        if isinstance(part, Path):
            out_dir = part
        elif isinstance(part, str):
            overrides.append(part)
        else:
            overrides += list(part)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"paths.output_dir={out_dir or '/unused'}", *overrides],
            return_hydra_config=hydra,
        )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def official_uap(dataset: Path, predictions_csv: Path) -> float | None:
    """The official micro-AP of a written ``predictions.csv`` against the dataset's ground truth, read
    back from the files: an independent check of the figure a task reports."""
    return evaluate(read_ground_truth(dataset / "ground_truth.csv"), read_predictions(predictions_csv)).uAP


def random_image(rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A distinct, structured image: a few random colour blocks upsampled (not white noise)."""
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)


def corrupt_pixels(path: Path) -> None:
    """A PNG whose header and end marker are intact but whose compressed pixels are not.

    The cheap pre-pass lets it through; only the rank that decodes it fails, mid-run.
    """
    buffer = io.BytesIO()
    random_image(np.random.default_rng(7), 64).save(buffer, format="PNG", compress_level=0)
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 4
    data[start + 2 : start + 40] = b"\xff" * 38  # the zlib stream after its 2-byte header
    path.write_bytes(bytes(data))


def make_copy_benchmark(root: Path) -> Path:
    """References, training, and queries that are exact PNG copies of references or unseen images."""
    rng = np.random.default_rng(0)
    for split in ("references", "queries", "training"):
        (root / split).mkdir()
    refs = [random_image(rng) for _ in range(N_REFS)]
    for i, image in enumerate(refs):
        image.save(root / "references" / f"R{i:06d}.png")
    for i in range(N_TRAIN):
        random_image(rng).save(root / "training" / f"T{i:06d}.png")
    q_ids, r_ids = [], []
    for q in range(N_MATCHED + N_UNMATCHED):
        qid = f"Q{q:05d}"
        if q < N_MATCHED:
            ref = (q * 7) % N_REFS
            refs[ref].save(root / "queries" / f"{qid}.png")
            r_ids.append(f"R{ref:06d}")
        else:
            random_image(rng).save(root / "queries" / f"{qid}.png")
            r_ids.append("")
        q_ids.append(qid)
    write_ground_truth(root / "ground_truth.csv", GroundTruth(q_ids, r_ids))
    return root


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory) -> None:
    """Built benchmarks and descriptor shards go to a session folder, never the user's own cache."""
    os.environ.setdefault("ISC_CACHE_DIR", str(tmp_path_factory.mktemp("isc-cache")))


@pytest.fixture(scope="session")
def benchmark(tmp_path_factory) -> Path:
    return make_copy_benchmark(tmp_path_factory.mktemp("bench"))


def ddp_env() -> dict[str, str]:
    """Environment for a 2-process gloo job in a subprocess: a free rendezvous port, no inherited ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    root = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": root}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def ddp_jobs(benchmark: Path, tmp_path_factory) -> Path:
    """The folder of every job of ``tests/training/ddp_jobs.py``, run once for the session in one
    two-process launch (start-up and rendezvous cost seconds a launch); job ``name`` is in ``name/``."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("ddp_jobs")
    script = Path(__file__).parent / "training" / "ddp_jobs.py"
    result = subprocess.run(
        [sys.executable, str(script), str(benchmark), str(out)],
        cwd=Path(__file__).resolve().parents[1],
        env=ddp_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def evaluate_checkpoint(
    training_overrides: Sequence[str], checkpoint: Path, out_dir: Path
) -> dict[str, object]:
    """``task=evaluate ckpt_path=<checkpoint>`` with a training run's overrides: the figure a user gets
    from the saved model, to compare with the ``val/uAP`` the callback logged."""
    import tasks

    kept = [o for o in training_overrides if not o.startswith("paths.output_dir=")]
    return tasks.evaluate(compose_cfg(kept, "task=evaluate", f"ckpt_path={checkpoint}", out_dir))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n`` (xdist), keep the users of ``ddp_jobs`` on one worker, so the session's
    two-process launch runs once, not once per worker (needs ``--dist loadgroup``)."""
    for item in items:
        if "ddp_jobs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ddp_jobs"))
