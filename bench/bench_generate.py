"""End-to-end copy generation throughput (decode + d2lv_base edits + JPEG encode + write).

Runs ``isc.data.generate.generate_copies_dataset`` on synthetic 500x375 JPEG sources, first in one process
(images/s per core) and then with every core, and prints both with the ratio to D2LV's published
throughput (about 23 images/s per core: one CPU-day per 2M images) and the multi-core scaling measured
in this run. See bench_augment.py for the edit pipeline alone.

    .venv/bin/python bench/bench_generate.py [--classes 20] [--copies 19]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from bench_augment import load_recipe  # noqa: E402

from isc.augment import synthetic_image  # noqa: E402
from isc.data.generate import generate_copies_dataset  # noqa: E402

D2LV_IMAGES_PER_S_PER_CORE = 23.0


def timed_run(sources: list[Path], out: Path, recipe, copies: int, workers: int) -> float:
    started = time.perf_counter()
    summary = generate_copies_dataset(
        sources, out, recipe, copies=copies, every=1, workers=workers, progress=False, sheet_classes=0
    )
    elapsed = time.perf_counter() - started
    assert summary.written == len(sources) * (copies + 1), summary
    return summary.written / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--copies", type=int, default=19)
    parser.add_argument("--recipe", default="d2lv_base")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, ROOT / "conf")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        sources = []
        for i in range(args.classes):
            path = Path(tmp) / "src" / f"T{i:06d}.jpg"
            path.parent.mkdir(exist_ok=True)
            synthetic_image(np.random.default_rng(i), (500, 375)).save(path, quality=90)
            sources.append(path)
        one = timed_run(sources, Path(tmp) / "one", recipe, args.copies, workers=0)
        many = timed_run(sources, Path(tmp) / "many", recipe, args.copies, workers=cores)
    print(f"{args.recipe}, {args.classes} classes x {args.copies + 1} files at 256 px")
    print(
        f"1 process:    {one:7.1f} images/s  ({one / D2LV_IMAGES_PER_S_PER_CORE:.1f}x D2LV's 23 images/s/core)"
    )
    print(f"{cores} processes: {many:7.1f} images/s  (scaling {many / one:.2f}x on {cores} cores)")


if __name__ == "__main__":
    main()
