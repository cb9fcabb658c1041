"""An approximate faiss index against exact search, in one run: build time, search time, memory, recall@k.

What ``evaluation.index`` (global matching) does, on synthetic clustered unit vectors (random centres with
per-cluster spreads, so neighbours are not all equally far, as in real descriptors): the index is built
from its index-factory string, trained on a separate training set, filled with the database and searched;
``IndexFlatIP`` gives the exact neighbours of the same queries. Memory is the index's serialised size.

    .venv/bin/python bench/bench_index.py                                   # 200k x 5k x 256 d, IVF1024,PQ32
    .venv/bin/python bench/bench_index.py --index HNSW32 --parameters efSearch=128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isc.evaluation.search import approximate_knn, knn, recall_at_k  # noqa: E402


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray, spread: np.ndarray) -> np.ndarray:
    c = rng.integers(len(centres), size=n)
    x = centres[c] + rng.standard_normal((n, centres.shape[1]), dtype=np.float32) * spread[c, None]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--database", type=int, default=200_000)
    add("--queries", type=int, default=5_000)
    add("--training", type=int, default=50_000)
    add("--dim", type=int, default=256)
    add("--clusters", type=int, default=1_000)
    add("--k", type=int, default=10)
    add("--index", default="IVF1024,PQ32", help="a faiss index-factory string (evaluation.index)")
    add("--parameters", default="nprobe=16", help="faiss search parameters (evaluation.index_parameters)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.5, 1.5, args.clusters).astype(np.float32) / np.sqrt(args.dim).astype(np.float32)
    db, q, train = (clustered(rng, n, centres, spread) for n in (args.database, args.queries, args.training))
    print(
        f"{args.queries:,} queries x {args.database:,} database x {args.dim} d ({args.clusters:,} clusters), "
        f"k={args.k}, training {args.training:,}; faiss threads {faiss.omp_get_max_threads()}"
    )

    t0 = time.perf_counter()
    _, exact = knn(q, db, args.k)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, found = approximate_knn(q, db, args.k, index=args.index, training=train, parameters=args.parameters)
    approx_s = time.perf_counter() - t0

    built = faiss.index_factory(args.dim, args.index, faiss.METRIC_INNER_PRODUCT)  # its size, rebuilt
    t0 = time.perf_counter()
    if not built.is_trained:
        built.train(train)
    train_s = time.perf_counter() - t0
    built.add(db)
    index_mb = len(faiss.serialize_index(built)) / 1e6
    flat_mb = db.nbytes / 1e6
    recall = recall_at_k(found, exact)
    print(f"exact IndexFlatIP: search {exact_s:.2f} s, {flat_mb:,.0f} MB of vectors")
    print(
        f"{args.index} ({args.parameters or 'default parameters'}): train + add + search {approx_s:.2f} s "
        f"(of which training {train_s:.2f} s), {index_mb:,.0f} MB"
    )
    print(
        f"recall@{args.k} {recall:.4f}; time approximate / exact {approx_s / exact_s:.2f} "
        f"({(approx_s - train_s) / exact_s:.2f} without the training, timed on a second build); "
        f"memory {index_mb / flat_mb:.3f} of the flat index"
    )


if __name__ == "__main__":
    main()
