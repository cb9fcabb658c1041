"""The extraction engine's CPU settings (isc/evaluation/extract.py): worker threads, layout, allocator."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from isc.evaluation import extract as engine
from isc.evaluation.views import View

SIZE = 32


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.relu(self.conv(x)).mean(dim=(2, 3)), dim=-1)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        path = tmp_path / "images" / f"R{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class RecordThreads:
    """A views function (it runs in the DataLoader workers) that writes down the worker's thread counts."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __call__(self, image: Image.Image) -> list[View]:
        with open(self.out, "a") as f:
            f.write(json.dumps([torch.get_num_threads(), cv2.getNumThreads()]) + "\n")
        return [View("original", (0, 0, image.width, image.height))]


def test_workers_run_one_torch_and_one_opencv_thread(images: list[Path], tmp_path: Path) -> None:
    if engine._usable_cpus() < 2:
        pytest.skip("needs two usable CPUs for two workers")
    out = tmp_path / "threads.jsonl"
    engine.extract(
        ConvNet(),
        images,
        scales=[SIZE],
        views=RecordThreads(out),
        batch_size=2,
        num_workers=2,
        progress=False,
        device="cpu",
    )
    seen = {tuple(json.loads(line)) for line in out.read_text().splitlines()}
    assert seen == {(1, 1)}


def test_workers_are_capped_by_the_usable_cpus(monkeypatch: pytest.MonkeyPatch, images: list[Path]) -> None:
    created = []
    real = engine.DataLoader

    def spy(*args, **kwargs):
        created.append(kwargs["num_workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_usable_cpus", lambda: 1)
    monkeypatch.setattr(engine, "DataLoader", spy)
    engine.extract(ConvNet(), images, scales=[SIZE], num_workers=8, progress=False, device="cpu")
    assert created == [1]


def test_cpu_forward_is_channels_last_and_leaves_the_model_alone(images: list[Path]) -> None:
    model = ConvNet()
    before = {k: (v.data_ptr(), v.stride()) for k, v in model.state_dict().items()}
    got = engine.extract(
        model, images, scales=[SIZE], batch_size=4, num_workers=0, progress=False, device="cpu"
    ).vectors
    assert {k: (v.data_ptr(), v.stride()) for k, v in model.state_dict().items()} == before
    transform = engine.eval_transform(SIZE)
    x = torch.stack([transform(engine.load_image(p)) for p in images])
    with torch.no_grad():
        batches = [x[i : i + 4] for i in (0, 4)]
        last = np.concatenate(
            [model(b.contiguous(memory_format=torch.channels_last)).numpy() for b in batches]
        )
        plain = np.concatenate([model(b).numpy() for b in batches])
    assert got.tobytes() == last.tobytes()
    np.testing.assert_allclose(got, plain, atol=1e-6, rtol=0)


def test_the_layout_is_part_of_the_cache_key(
    monkeypatch: pytest.MonkeyPatch, images: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    kw: dict[str, Any] = {
        "scales": [SIZE],
        "num_workers": 0,
        "progress": False,
        "device": "cpu",
        "cache_dir": cache,
    }
    engine.extract(ConvNet(), images, **kw)
    monkeypatch.setattr(engine, "_forward_memory_format", lambda model, device: torch.contiguous_format)
    engine.extract(ConvNet(), images, **kw)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def _faults(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(engine._glibc() is None, reason="glibc's allocator only")
def test_large_freed_buffers_are_reused_inside_the_forward_loop() -> None:
    """A 128 MB activation is mmapped, faulted in and unmapped on every forward, but not in the loop."""
    conv = nn.Conv2d(3, 64, 3, padding=1)
    x = torch.rand(8, 3, 256, 256)  # output 8 x 64 x 256 x 256 x 4 B = 134 MB, over glibc's 32 MB cap

    @torch.no_grad()
    def forwards() -> None:
        for _ in range(3):
            conv(x)

    with engine._reuse_freed_memory(torch.device("cpu")):
        forwards()  # the first forward grows the heap
        inside = _faults(forwards)
    outside = _faults(forwards)
    pages = 134_217_728 // resource.getpagesize()
    assert outside > 2 * pages  # every forward faults its output in again
    assert inside < pages // 4
