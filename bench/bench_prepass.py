"""Pre-pass benchmark: what checking every image before a run costs, against decoding every image.

Every task runs :func:`isc.data.images.screen_quick` over its images before any model is built (headers
and JPEG/PNG end markers); ``dataset.skip_bad_images=true`` adds a full decode
(:func:`isc.data.images.screen_decode`). Both are measured in the same run on the same files, and their
ratio printed, with the extrapolation to a million images.

    .venv/bin/python bench/bench_prepass.py [--images 2000] [--size 640x480] [--pool DIR]

Without ``--pool`` the images are synthetic JPEGs at DISC21's typical size, written to a temp folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from isc.data.images import find_images, screen_decode, screen_quick


def synthetic_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        blocks = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)  # photo-like: smooth regions
        image = Image.fromarray(blocks).resize(size, Image.Resampling.BILINEAR)
        path = folder / f"R{i:06d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", default="640x480", help="synthetic image size WxH")
    parser.add_argument("--pool", type=Path, default=None, help="measure these images instead")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.pool is None:
            width, height = (int(v) for v in args.size.split("x"))
            paths = synthetic_jpegs(Path(tmp), args.images, (width, height))
            what = f"{len(paths)} synthetic {width}x{height} JPEGs"
        else:
            paths = find_images(args.pool)[: args.images]
            what = f"{len(paths)} images of {args.pool}"
        timed(screen_quick, paths, "warm-up", ids=False, progress=False)  # page cache: both runs warm
        prepass = timed(screen_quick, paths, "pre-pass", ids=False, num_workers=args.workers, progress=False)
        decode = timed(screen_decode, paths, skip_bad=True, num_workers=args.workers)
    n = len(paths)
    print(f"{what}, {args.workers} threads")
    print(f"  pre-pass (headers + end markers) {prepass:7.2f} s  {1e3 * prepass / n:6.3f} ms/image")
    print(f"  full decode (skip_bad_images)    {decode:7.2f} s  {1e3 * decode / n:6.3f} ms/image")
    print(f"  ratio decode / pre-pass          {decode / prepass:7.1f}x")
    print(
        f"  1,000,000 images: pre-pass {1e6 * prepass / n / 60:.1f} min, full decode {1e6 * decode / n / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
