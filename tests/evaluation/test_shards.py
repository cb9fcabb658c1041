"""The extraction engine's shard cache (isc/evaluation/extract.py, shards.py): reuse, invalidation, crashes, SIGKILL.

Run as a script (``python tests/evaluation/test_shards.py IMAGES CACHE``), this file is also the slow extraction that
:func:`test_sigkilled_run_resumes` kills with ``kill -9``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from isc.data.images import load_image
from isc.evaluation.extract import eval_transform, extract, extract_share
from isc.evaluation.shards import listing_fingerprint, model_fingerprint

N_IMAGES, BATCH, SHARD = 40, 4, 8  # 5 shards of 2 batches
N_SHARDS = N_IMAGES // SHARD
SIZE = 32
ROOT = Path(__file__).resolve().parents[2]


class TinyNet(nn.Module):
    """conv -> global average pool -> L2 norm: deterministic on the CPU, a few microseconds an image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.relu(self.conv(x)).mean(dim=(2, 3)), dim=-1)


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def write_images(folder: Path, n: int = N_IMAGES) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"R{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def sharded(model: nn.Module, paths: list[Path], cache: Path | None, **kw) -> np.ndarray:
    kw = {"shard_size": SHARD, "batch_size": BATCH, "num_workers": 0, "progress": False, **kw}
    return extract(model, paths, scales=[SIZE], cache_dir=cache, **kw).vectors


@torch.no_grad()
def reference(model: nn.Module, paths: list[Path]) -> np.ndarray:
    """The engine's numbers computed without it: the eval transform and a forward, batch by batch."""
    transform = eval_transform(SIZE)
    batches = [
        model(
            torch.stack([transform(load_image(p)) for p in paths[i : i + BATCH]]).contiguous(
                memory_format=torch.channels_last  # the engine's layout on the CPU for a conv net
            )
        ).numpy()
        for i in range(0, len(paths), BATCH)
    ]
    return np.concatenate(batches).astype(np.float32)


class Counter:
    """A forward hook counting the images a model sees (hooks are not part of the model fingerprint)."""

    def __init__(self, model: nn.Module, fail_after: int | None = None) -> None:
        self.images, self.fail_after = 0, fail_after
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self.fail_after is not None and self.images >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.images += len(args[0])


def shard_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("shard-*.h5"))


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "references")


def test_fingerprints_track_weights_and_files(tmp_path: Path, images: list[Path]) -> None:
    a, b = tiny_net(), tiny_net()
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.conv.weight[0, 0, 0, 0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)
    before = listing_fingerprint(images, image_size=SIZE)
    assert before == listing_fingerprint([str(p) for p in images], image_size=SIZE)
    assert before != listing_fingerprint(images, image_size=SIZE + 1)
    assert before != listing_fingerprint(images, image_size=SIZE, extra={"transform": "other"})
    assert before != listing_fingerprint(images[::-1], image_size=SIZE)
    os.utime(images[3], ns=(1, 1))
    assert before != listing_fingerprint(images, image_size=SIZE)


def test_no_cache_is_plain_extraction(tmp_path: Path, images: list[Path]) -> None:
    model = tiny_net()
    assert sharded(model, images, None).tobytes() == reference(model, images).tobytes()
    assert not list(tmp_path.rglob("*.h5"))


def test_sharded_equals_extract_and_rerun_reuses_everything(
    tmp_path: Path, images: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    model, cache = tiny_net(), tmp_path / "cache"
    expected = reference(model, images)
    first = sharded(model, images, cache)
    assert first.dtype == np.float32 and first.tobytes() == expected.tobytes()
    files = shard_files(cache)
    assert [f.name for f in files] == [f"shard-{s:05d}.h5" for s in range(N_SHARDS)]
    counter = Counter(model)
    with caplog.at_level(logging.INFO, logger="isc.evaluation.extract"):
        second = sharded(model, images, cache)
    assert counter.images == 0
    assert second.tobytes() == expected.tobytes()
    assert f"reused {N_SHARDS} of {N_SHARDS} shards ({N_IMAGES} images)" in caplog.text


def test_splits_share_a_cache_without_clashing(tmp_path: Path, images: list[Path]) -> None:
    model, cache = tiny_net(), tmp_path / "cache"
    queries = write_images(tmp_path / "queries", 12)[::-1]
    expected = reference(model, images), reference(model, queries)
    sharded(model, images, cache)
    sharded(model, queries, cache)
    counter = Counter(model)
    assert sharded(model, images, cache).tobytes() == expected[0].tobytes()
    assert sharded(model, queries, cache).tobytes() == expected[1].tobytes()
    assert counter.images == 0
    assert len({f.parent for f in shard_files(cache)}) == 2


def test_shares_of_a_group_make_up_the_listing(tmp_path: Path, images: list[Path]) -> None:
    """Rank r of 3 computes shards r, r + 3, ... and nothing else; the three shares together are what
    one extraction reads back whole, without a forward, to the same bytes."""
    model, cache = tiny_net(), tmp_path / "cache"
    kw = {"shard_size": SHARD, "batch_size": BATCH, "num_workers": 0, "progress": False}
    expected = reference(model, images)
    counter = Counter(model)
    for rank in range(3):
        before = {f.name for f in shard_files(cache)}
        extract_share(model, images, rank=rank, world=3, cache_dir=cache, scales=[SIZE], **kw)
        new = sorted(f.name for f in shard_files(cache) if f.name not in before)
        assert new == [f"shard-{s:05d}.h5" for s in range(rank, N_SHARDS, 3)]
    assert counter.images == N_IMAGES  # every image once, over the three shares
    extract_share(model, images, rank=1, world=3, cache_dir=cache, scales=[SIZE], **kw)
    assert counter.images == N_IMAGES  # a share already on disk is kept
    assert sharded(model, images, cache).tobytes() == expected.tobytes()
    assert counter.images == N_IMAGES  # read back whole, no forward
    with pytest.raises(ValueError, match="rank 3 is not one of the 3"):
        extract_share(model, images, rank=3, world=3, cache_dir=cache, scales=[SIZE], **kw)


def test_shard_size_is_rounded_to_batches(tmp_path: Path, images: list[Path]) -> None:
    model = tiny_net()
    out = sharded(model, images, tmp_path / "cache", shard_size=6)  # -> 8, batch boundaries kept
    assert out.tobytes() == reference(model, images).tobytes()
    assert len(shard_files(tmp_path / "cache")) == N_SHARDS


def test_changed_image_recomputes_only_its_shard(tmp_path: Path, images: list[Path]) -> None:
    model, cache = tiny_net(), tmp_path / "cache"
    sharded(model, images, cache)
    Image.fromarray(np.full((SIZE, SIZE, 3), 7, dtype=np.uint8)).save(images[13])  # shard 1
    os.utime(images[13], ns=(10**18, 10**18))  # a new mtime even on a coarse-clock file system
    counter = Counter(model)
    out = sharded(model, images, cache)
    assert counter.images == SHARD
    assert out.tobytes() == reference(model, images).tobytes()


def test_changed_weights_or_list_recompute(tmp_path: Path, images: list[Path]) -> None:
    model, cache = tiny_net(), tmp_path / "cache"
    sharded(model, images, cache)
    with torch.no_grad():
        model.conv.bias[0] += 0.5
    counter = Counter(model)
    out = sharded(model, images, cache)
    assert counter.images == N_IMAGES
    assert out.tobytes() == reference(model, images).tobytes()

    counter.images = 0
    shifted = images[1:]  # every shard now starts one image later
    out = sharded(model, shifted, cache)
    assert counter.images == len(shifted)
    assert out.tobytes() == reference(model, shifted).tobytes()

    counter.images = 0
    swapped = [*images[:SHARD], *images[SHARD:][::-1]]  # shards 1.. hold other files
    sharded(model, images, cache)
    counter.images = 0
    sharded(model, swapped, cache)
    assert counter.images == N_IMAGES - SHARD


def test_corrupt_shard_is_recomputed_with_a_warning(
    tmp_path: Path, images: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    model, cache = tiny_net(), tmp_path / "cache"
    expected = sharded(model, images, cache)
    files = shard_files(cache)
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) // 2])  # truncated
    files[4].write_bytes(b"not an hdf5 file")
    counter = Counter(model)
    with caplog.at_level(logging.WARNING, logger="isc.evaluation.extract"):
        out = sharded(model, images, cache)
    assert counter.images == 2 * SHARD
    assert out.tobytes() == expected.tobytes()
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 2
    counter.images = 0
    sharded(model, images, cache)  # repaired
    assert counter.images == 0


def test_crash_mid_shard_keeps_finished_shards(tmp_path: Path, images: list[Path]) -> None:
    model, cache = tiny_net(), tmp_path / "cache"
    counter = Counter(model, fail_after=3 * SHARD + BATCH)  # second batch of shard 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        sharded(model, images, cache)
    counter.handle.remove()
    assert [f.name for f in shard_files(cache)] == [f"shard-{s:05d}.h5" for s in range(3)]
    assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.startswith("shard-")]
    counter = Counter(model)
    out = sharded(model, images, cache)
    assert counter.images == N_IMAGES - 3 * SHARD
    assert out.tobytes() == reference(model, images).tobytes()


def test_sigkilled_run_resumes(tmp_path: Path, images: list[Path]) -> None:
    cache = tmp_path / "cache"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, __file__, str(images[0].parent), str(cache)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while len(shard_files(cache)) < 2:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the extraction script wrote no shards in time"
            time.sleep(0.02)
        assert proc.poll() is None, "the script finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(shard_files(cache))
    assert 2 <= done < N_SHARDS
    model = tiny_net()
    counter = Counter(model)
    out = sharded(model, images, cache)
    assert counter.images == N_IMAGES - done * SHARD
    assert out.tobytes() == reference(model, images).tobytes()


def _slow_extraction(folder: str, cache: str) -> None:
    """What the SIGKILL test runs: the same model and settings, slowed by a sleep before each batch."""
    model = tiny_net()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.3))
    paths = sorted(Path(folder).glob("*.png"))
    sharded(model, paths, Path(cache))


def test_an_empty_listing_gives_empty_arrays(tmp_path: Path) -> None:
    """A split with no images (an empty training/) extracts to zero rows, with or without a cache."""
    for cache in (None, tmp_path / "cache"):
        out = extract(tiny_net(), [], scales=[SIZE], num_workers=0, progress=False, cache_dir=cache)
        assert out.vectors.shape[0] == 0 and len(out.ids) == 0 and out.owner.shape == (0,)


if __name__ == "__main__":
    _slow_extraction(sys.argv[1], sys.argv[2])
