"""Shared test fixtures: a tiny DISC21-layout benchmark whose matched queries are exact copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isc.formats.pair_csv import write_ground_truth
from isc.formats.pairs import GroundTruth

N_REFS, N_MATCHED, N_UNMATCHED, N_TRAIN = 16, 10, 6, 6


def random_image(rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A distinct, structured image: a few random colour blocks upsampled (not white noise)."""
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)


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
    import os

    os.environ.setdefault("ISC_CACHE_DIR", str(tmp_path_factory.mktemp("isc-cache")))


@pytest.fixture(scope="session")
def benchmark(tmp_path_factory) -> Path:
    return make_copy_benchmark(tmp_path_factory.mktemp("bench"))


def ddp_env() -> dict[str, str]:
    """Environment for a 2-process gloo job in a subprocess: a free rendezvous port, no inherited ranks."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    root = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": root}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    return env
