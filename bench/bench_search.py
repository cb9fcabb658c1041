"""Time exact kNN search with the faiss and torch backends of ``isc.evaluation.search`` in the same run.

Random L2-normalised descriptors stand in for real ones (exact search cost does not depend on the data).
Defaults run in well under 30 s on 2 CPU cores; on a GPU machine both backends use the GPU when they can.

    .venv/bin/python bench/bench_search.py --queries 5000 --database 50000 --dim 256 --k 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isc.evaluation.search import faiss_gpu_available, knn, range_search  # noqa: E402


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _best_time(fn, repeats: int) -> float:
    """Best of ``repeats`` wall-clock times (after one warm-up run, which also builds GPU state)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--database", type=int, default=50000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=16384)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--range-threshold", type=float, default=None, help="also time range search")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    queries, database = _unit(rng, args.queries, args.dim), _unit(rng, args.database, args.dim)
    print(
        f"{args.queries} queries x {args.database} database x {args.dim} dims, k={args.k}; "
        f"faiss GPU: {faiss_gpu_available()}, torch CUDA: {torch.cuda.is_available()}, "
        f"torch threads: {torch.get_num_threads()}"
    )

    results = {}
    for backend in ("faiss", "torch"):
        seconds = _best_time(
            lambda b=backend: knn(
                queries, database, args.k, backend=b, device=args.device, block_size=args.block_size
            ),
            args.repeats,
        )
        results[backend] = seconds
        print(f"knn  {backend:5s}: {seconds:8.3f} s  ({args.queries / seconds:,.0f} queries/s)")
    print(f"knn  torch/faiss time ratio: {results['torch'] / results['faiss']:.2f}")

    sf, i_f = knn(queries, database, args.k, backend="faiss", device=args.device)
    st, i_t = knn(queries, database, args.k, backend="torch", device=args.device)
    print(
        f"agreement: {np.mean(i_f == i_t):.6f} of indices equal, max |sim diff| {np.max(np.abs(sf - st)):.2e}"
    )

    if args.range_threshold is not None:
        for backend in ("faiss", "torch"):
            seconds = _best_time(
                lambda b=backend: range_search(
                    queries, database, args.range_threshold, backend=b, device=args.device
                ),
                args.repeats,
            )
            results[f"range_{backend}"] = seconds
            print(f"range {backend:5s}: {seconds:8.3f} s")
        print(f"range torch/faiss time ratio: {results['range_torch'] / results['range_faiss']:.2f}")


if __name__ == "__main__":
    main()
