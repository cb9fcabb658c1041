"""Copy-generation throughput on one CPU core, against D2LV's reported 23 images/s/core.

Runs a recipe from ``conf/augmentation/`` on procedurally generated ~500x375 photos (decoding is not
timed: the figure is the edit pipeline alone) and prints images/s and the ratio to the baseline.

    .venv/bin/python bench/bench_augment.py                     # d2lv_base, ~20 s
    .venv/bin/python bench/bench_augment.py --recipe isc_query --profile
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from isc.augment import Compose, rng_for, synthetic_image  # noqa: E402

D2LV_IMAGES_PER_S_PER_CORE = 23.0


def load_recipe(name: str, conf_dir: Path) -> Compose:
    """Build a recipe with Hydra's composition, so variants that extend the base work too."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(conf_dir), version_base=None):
        cfg = compose(overrides=[f"+augmentation={name}"])
    return instantiate(cfg.augmentation)


class Timed:
    """Wraps one pipeline step to accumulate its wall time (for --profile)."""

    def __init__(self, name: str, t, totals: dict[str, float]) -> None:
        self.name, self.t, self.totals = name, t, totals

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        start = time.perf_counter()
        out = self.t(img, rng)
        self.totals[self.name] += time.perf_counter() - start
        return out


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="d2lv_base", help="name in conf/augmentation (default: d2lv_base)")
    p.add_argument("--conf-dir", type=Path, default=ROOT / "conf")
    p.add_argument("--seconds", type=float, default=20.0, help="timed duration (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="untimed warm-up, fills asset caches")
    p.add_argument("--sources", type=int, default=64, help="distinct source images (default 64)")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print time per pipeline step")
    p.add_argument("--target-ratio", type=float, default=5.0)
    args = p.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):  # one core, whatever the machine has
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    pipeline = load_recipe(args.recipe, args.conf_dir)
    totals: dict[str, float] = defaultdict(float)
    if args.profile:
        pipeline.steps = [(name, Timed(str(name), t, totals)) for name, t in pipeline.steps]
    gen = np.random.default_rng(args.seed)
    sources = [synthetic_image(gen, (args.width, args.height)) for _ in range(args.sources)]
    sizes: set[tuple[int, int]] = set()

    def run(seconds: float, offset: int) -> int:
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(16):
                i = offset + n
                out = pipeline(sources[i % len(sources)], rng_for(args.seed, i % len(sources), i))
                sizes.add(out.size)
                n += 1
        return n

    run(args.warmup, 10**9)
    totals.clear()
    start = time.perf_counter()
    n = run(args.seconds, 0)
    elapsed = time.perf_counter() - start
    rate = n / elapsed
    ratio = rate / D2LV_IMAGES_PER_S_PER_CORE
    print(f"recipe: {args.recipe}  sources: {args.width}x{args.height}  output sizes: {sorted(sizes)[:3]}")
    print(f"images: {n} in {elapsed:.1f} s on 1 core")
    print(f"throughput: {rate:.1f} images/s/core")
    print(
        f"ratio vs D2LV baseline ({D2LV_IMAGES_PER_S_PER_CORE:.0f} images/s/core): {ratio:.2f}x "
        f"(target >= {args.target_ratio:.0f}x: {'met' if ratio >= args.target_ratio else 'NOT met'})"
    )
    if args.profile:
        print("\nper step (ms per image, including skipped applications):")
        for name, total in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {name:16s} {1000 * total / n:7.3f}")
        print(f"  {'(overhead)':16s} {1000 * (elapsed - sum(totals.values())) / n:7.3f}")
    return rate


if __name__ == "__main__":
    main()
