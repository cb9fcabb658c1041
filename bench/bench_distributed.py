"""Extraction throughput of a group of processes against one process, on the same images in one run.

What ``task=evaluate trainer=ddp trainer.devices=N`` does with the extraction (``isc/evaluation/
distributed.py``): each of N processes computes its share of the listing's shards
(``isc.evaluation.extract.extract_share``: shards r, r + N, ... into the shared ``cache_dir``), then one
process reads the whole listing back (``extract`` on the full cache). The baseline is one process running
``extract`` on the same listing into an empty cache. The machine's cores are split evenly: the one process
gets every core as torch threads and DataLoader workers, each of the N gets 1/N of them, as Lightning
gives each rank on a CPU. The processes fork from a server that has done the imports
(``bench/fresh_process.py``), and each side is timed inside its processes (the model's construction
and the extraction; for the group its slowest share, then the read), so neither pays Python's start-up:
the real command's other ranks rerun it, a fixed few seconds a run that this does not count.

It also checks that the group's descriptors equal the one process's (to 1e-5: the thread count changes
float rounding). On a CPU the group can only win what one process leaves idle (the Python between
batches, the decode); on GPUs each process drives its own device.

    .venv/bin/python bench/bench_distributed.py
    .venv/bin/python bench/bench_distributed.py --images 16 --shard 4 --size 64 --rounds 1   # seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import write_images  # noqa: E402
from fresh_process import in_fresh_processes  # noqa: E402

from isc.evaluation.extract import extract, extract_share  # noqa: E402
from isc.models.descriptor import DescriptorModel  # noqa: E402
from isc.models.pooling import GeM  # noqa: E402
from isc.models.trunks import efficientnet_lite0  # noqa: E402


def _model() -> DescriptorModel:
    torch.manual_seed(0)
    return DescriptorModel(trunk=efficientnet_lite0(pretrained=True), pooling=GeM(p=3.0)).eval()


def _options(args: argparse.Namespace, cache: Path, threads: int) -> dict[str, object]:
    return {
        "scales": [args.size],
        "batch_size": args.batch,
        "num_workers": threads,
        "device": "cpu",
        "cache_dir": cache,
        "shard_size": args.shard,
        "progress": False,
    }


def share(args: argparse.Namespace, paths: list[Path], cache: Path, rank: int, world: int) -> float:
    """One process of the group: its shards of the listing; returns its seconds."""
    threads = max(1, args.cores // world)
    torch.set_num_threads(threads)
    model = _model()
    started = time.perf_counter()
    extract_share(model, paths, rank=rank, world=world, **_options(args, cache, threads))  # type: ignore[arg-type]
    return time.perf_counter() - started


def whole(args: argparse.Namespace, paths: list[Path], cache: Path) -> tuple[float, np.ndarray]:
    """One process: the whole listing (computed, or read back from a full cache); seconds, descriptors."""
    torch.set_num_threads(args.cores)
    model = _model()
    started = time.perf_counter()
    vectors = extract(model, paths, **_options(args, cache, args.cores)).vectors  # type: ignore[arg-type]
    return time.perf_counter() - started, vectors


PRELOAD = [
    "torch",
    "isc.evaluation.extract",
    "isc.models.trunks",
    "bench_extract",
]  # the forkserver's imports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224, help="model input size (px)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shard", type=int, default=64, help="images a shard (the unit a process takes)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    world = args.processes
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        paths = write_images(root / "images", args.images)
        one, group, read = [], [], []
        for r in range(args.rounds):  # alternate, so a busy moment of the machine hits both sides
            seconds, expected = in_fresh_processes(whole, [(args, paths, root / f"one{r}")], PRELOAD)[0]
            one.append(seconds)
            shares = in_fresh_processes(
                share, [(args, paths, root / f"group{r}", k, world) for k in range(world)]
            )
            seconds, got = in_fresh_processes(whole, [(args, paths, root / f"group{r}")], PRELOAD)[0]
            group.append(max(shares) + seconds)  # the slowest share, then the read
            read.append(seconds)
            gap = float(np.abs(got - expected).max())
            if not gap <= 1e-5:
                raise SystemExit(f"the group's descriptors differ from one process's by {gap:.2e}")
    n = args.images
    print(
        f"{n} images at {args.size} px, EfficientNet-Lite0, batch {args.batch}, shards of {args.shard}, "
        f"{args.cores} cores; median of {args.rounds} rounds (best in brackets)"
    )
    print(f"{'':<44} {'seconds':>8} {'images/s':>9}")
    for name, times in [("1 process", one), (f"{world} processes (shares, then one reads)", group)]:
        median = statistics.median(times)
        print(f"{name:<44} {median:8.2f} {n / median:9.1f}  ({n / min(times):.1f})")
    print(f"  of which reading the full cache back: {statistics.median(read):.2f} s")
    print(
        f"descriptors equal to 1e-5: yes; throughput ratio {world} / 1 processes: "
        f"{statistics.median(one) / statistics.median(group):.2f}x"
    )


if __name__ == "__main__":
    main()
