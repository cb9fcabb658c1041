"""Extraction throughput: ``isc.evaluation.extract.extract`` end to end against the bare model forward.

``extract`` decodes every image in its DataLoader workers, resizes it to the model's input size (bicubic,
antialiased), batches it and runs the forward; this script measures it in images/s against the forward
alone on the same images already decoded, resized and batched, in the same run:

- ``plain forward``: ``model(x)`` on contiguous float batches, as a loop written without the engine;
- ``forward, channels_last``: the same batches in ``torch.channels_last`` (what the engine feeds on CPU);
- ``forward as the engine runs it``: channels_last and the engine's allocator setting
  (``_reuse_freed_memory``: large freed activations stay in the heap for the next batch): the
  baseline; ``extract`` can at best match it;
- ``extract``: the engine end to end (``cache_dir=None``, ``--workers`` DataLoader workers);
- ``extract, contiguous + glibc defaults``: the engine with the layout and allocator of the plain
  forward, i.e. as it ran before both were added.

The variants run in turn, ``--rounds`` times, and each one's median and best round are kept: a shared
machine's other jobs then slow every variant alike. User and system CPU seconds (this process and its
DataLoader workers) are summed per variant. The model is EfficientNet-Lite0 with its packaged ImageNet
weights and GeM (``conf/backbone/efficientnet_lite0.yaml``); the images are ``skimage.data``'s photos,
cropped and resized to 640x480 JPEGs (DISC21's typical size), written to a temp folder.

    .venv/bin/python bench/bench_extract.py
    .venv/bin/python bench/bench_extract.py --images 8 --batch 4 --size 64 --rounds 1   # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isc.data.images import load_image  # noqa: E402
from isc.evaluation import extract as engine  # noqa: E402
from isc.models.descriptor import DescriptorModel  # noqa: E402
from isc.models.pooling import GeM  # noqa: E402
from isc.models.trunks import efficientnet_lite0  # noqa: E402

PHOTOS = (
    *("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry"),
    *("retina", "coins", "camera", "moon", "clock", "brick", "grass", "gravel"),
)


def write_images(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """``n`` JPEGs of ``size``: random crops of skimage's photos, resized (no network)."""
    from skimage import data, util

    photos = [util.img_as_ubyte(getattr(data, name)()) for name in PHOTOS]
    photos = [np.stack([p] * 3, axis=-1) if p.ndim == 2 else p[..., :3] for p in photos]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = Image.fromarray(np.ascontiguousarray(photo[y : y + ch, x : x + cw]))
        path = folder / f"R{i:06d}.jpg"
        image.resize(size, Image.Resampling.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def _cpu_seconds() -> tuple[float, float]:
    """User and system CPU seconds of this process and its finished children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


@contextlib.contextmanager
def _as_before() -> Iterator[None]:
    """The engine with contiguous batches and glibc's allocator settings (before channels_last and
    ``_reuse_freed_memory``)."""
    with (
        mock.patch.object(engine, "_forward_memory_format", lambda model, device: torch.contiguous_format),
        mock.patch.object(engine, "_reuse_freed_memory", lambda device: contextlib.nullcontext()),
    ):
        yield


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224, help="model input size (px)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="extract's DataLoader workers")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    model = DescriptorModel(trunk=efficientnet_lite0(pretrained=True), pooling=GeM(p=3.0)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images)
        transform = engine.eval_transform(args.size)
        batches = [
            torch.stack([transform(load_image(p)) for p in paths[i : i + args.batch]])
            for i in range(0, len(paths), args.batch)
        ]
        channels_last = [b.contiguous(memory_format=torch.channels_last) for b in batches]

        @torch.no_grad()
        def forward(xs: list[torch.Tensor]) -> np.ndarray:
            return np.concatenate([model(x).numpy() for x in xs])

        def engine_forward(k: int) -> np.ndarray:
            with engine._reuse_freed_memory(device):
                return forward(channels_last[:k])

        def run_extract(k: int) -> np.ndarray:
            kw: dict[str, Any] = {"batch_size": args.batch, "num_workers": args.workers, "device": device}
            files = paths[: k * args.batch]
            return engine.extract(model, files, scales=[args.size], progress=False, **kw).vectors

        def run_extract_before(k: int) -> np.ndarray:
            with _as_before():
                return run_extract(k)

        variants: dict[str, Callable[[int], np.ndarray]] = {  # each on the first k batches
            "plain forward": lambda k: forward(batches[:k]),
            "forward, channels_last": lambda k: forward(channels_last[:k]),
            "forward as the engine runs it": engine_forward,
            "extract": run_extract,
            "extract, contiguous + glibc defaults": run_extract_before,
        }
        for fn in variants.values():  # warm-up on one batch: oneDNN's kernels, the page cache
            fn(1)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        cpu = {name: [0.0, 0.0] for name in variants}
        outputs = {}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                u0, s0 = _cpu_seconds()
                started = time.perf_counter()
                outputs[name] = fn(len(batches))
                seconds[name].append(time.perf_counter() - started)
                u1, s1 = _cpu_seconds()
                cpu[name][0] += u1 - u0
                cpu[name][1] += s1 - s0
    n = len(paths)
    print(
        f"{n} images (640x480 JPEG) at {args.size} px, batch {args.batch}, EfficientNet-Lite0 + GeM, "
        f"CPU, torch {torch.__version__} with {torch.get_num_threads()} threads, {engine._usable_cpus()} "
        f"usable CPUs, extract with {args.workers} workers; {args.rounds} rounds, each variant in turn"
    )
    print(f"\n{'':38s} {'median img/s':>12s} {'best img/s':>10s} {'user s/round':>12s} {'sys s/round':>11s}")
    rate = {}
    for name, t in seconds.items():
        rate[name] = n / statistics.median(t)
        user, system = (c / args.rounds for c in cpu[name])
        print(f"{name:38s} {rate[name]:12.1f} {n / min(t):10.1f} {user:12.1f} {system:11.1f}")
    base = rate["forward as the engine runs it"]
    print(
        f"\nextract / forward as the engine runs it: {rate['extract'] / base:.2f}x (goal >= 0.9); "
        f"extract / plain forward: {rate['extract'] / rate['plain forward']:.2f}x; "
        f"extract now / as before: {rate['extract'] / rate['extract, contiguous + glibc defaults']:.2f}x"
    )
    print(
        f"channels_last / contiguous forward: {rate['forward, channels_last'] / rate['plain forward']:.2f}x; "
        f"with the engine's allocator setting: {base / rate['forward, channels_last']:.2f}x more"
    )
    plain = outputs["plain forward"]
    for name in ("forward, channels_last", "extract", "extract, contiguous + glibc defaults"):
        print(f"max |descriptor - plain forward's|, {name}: {np.abs(outputs[name] - plain).max():.2e}")


if __name__ == "__main__":
    main()
