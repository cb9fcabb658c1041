"""Metrics benchmark: score 500,000 predictions against a DISC21-sized ground truth.

Prints the time of ``isc.evaluation.metrics.evaluate`` and of a per-pair Python implementation that follows the
official evaluation code's structure (sorted list of tuples, set look-ups, per-query loops), measured
in the same run on the same data, and their ratio.

    .venv/bin/python bench/bench_metrics.py [--predictions 500000] [--queries 50000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from isc.evaluation.metrics import evaluate
from isc.formats.pair_csv import read_ground_truth, read_predictions, write_ground_truth, write_predictions
from isc.formats.pairs import GroundTruth, Predictions


def make_data(n_pred: int, n_queries: int, n_refs: int, seed: int = 0) -> tuple[GroundTruth, Predictions]:
    rng = np.random.default_rng(seed)
    q_ids = np.array([f"Q{i:05d}" for i in range(n_queries)])
    r_ids = np.array([f"R{i:06d}" for i in range(n_refs)])
    matched = rng.random(n_queries) < 0.2  # DISC21: 10k of 50k queries have a match
    truth = rng.integers(n_refs, size=n_queries)
    gt = GroundTruth(q_ids, np.where(matched, r_ids[truth], ""))
    per_query = n_pred // n_queries
    rows_q = np.repeat(np.arange(n_queries), per_query)
    rows_r = rng.integers(n_refs, size=rows_q.size)
    hit = matched[rows_q] & (np.arange(rows_q.size) % per_query == 0) & (rng.random(rows_q.size) < 0.7)
    rows_r[hit] = truth[rows_q[hit]]
    codes = np.unique(rows_q.astype(np.int64) * n_refs + rows_r, return_index=True)[1]  # drop duplicates
    rows_q, rows_r = rows_q[codes], rows_r[codes]
    scores = rng.random(rows_q.size) + hit[codes] * 0.5
    scores = np.round(scores, 3)  # coarse scores: many ties
    return gt, Predictions(q_ids[rows_q], r_ids[rows_r], scores)


def official_style(gt: GroundTruth, pred: Predictions) -> tuple[float, float]:
    """uAP and recall@rank1 the way the organisers' code computes them: Python objects, one pair at a time."""
    gt_pairs = [(q, r) for q, r in zip(*gt.pairs(), strict=True)]
    gt_set = set(gt_pairs)
    rows = list(zip(pred.query_ids.tolist(), pred.reference_ids.tolist(), pred.scores.tolist(), strict=True))
    if len({(q, r) for q, r, _ in rows}) != len(rows):
        raise ValueError("duplicates")
    y_true = np.array([(q, r) in gt_set for q, r, _ in rows], dtype=bool)
    scores = np.array([s for _, _, s in rows])
    order = sorted(range(len(rows)), key=list(zip(scores, ~y_true, strict=True)).__getitem__)[::-1]
    y = y_true[order]
    tp = np.cumsum(y)
    precision, recall = tp / np.arange(1, len(y) + 1), tp / len(gt_pairs)
    ap = float(((recall - np.concatenate([[0], recall[:-1]])) * precision).sum())
    by_query = defaultdict(list)
    for q, r, s in rows:
        by_query[q].append((r, s))
    found = 0
    for q, r in gt_pairs:
        res = by_query.get(q, [])
        true = [s for ref, s in res if ref == r]
        if true and sum(s >= true[0] for _, s in res) - 1 == 0:
            found += 1
    return ap, found / len(gt_pairs)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--predictions", type=int, default=500_000)
    parser.add_argument("--queries", type=int, default=50_000)
    parser.add_argument("--references", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    gt, pred = make_data(args.predictions, args.queries, args.references)
    print(f"{len(pred):,} predictions, {gt.num_positives:,} ground-truth pairs, {len(gt):,} queries")

    metrics = evaluate(gt, pred)
    ap, r1 = official_style(gt, pred)
    assert abs(metrics.uAP - ap) < 1e-12 and abs(metrics.recall_at_rank1 - r1) < 1e-12, (
        "implementations disagree"
    )

    ours = best_of(lambda: evaluate(gt, pred), args.repeat)
    baseline = best_of(lambda: official_style(gt, pred), 1)
    with tempfile.TemporaryDirectory() as tmp:
        gt_csv, pred_csv = Path(tmp) / "gt.csv", Path(tmp) / "pred.csv"
        write_ground_truth(gt_csv, gt)
        write_predictions(pred_csv, pred)
        with_io = best_of(
            lambda: evaluate(read_ground_truth(gt_csv), read_predictions(pred_csv)), args.repeat
        )
    print(f"uAP {metrics.uAP:.4f}  recall@rank1 {metrics.recall_at_rank1:.4f}")
    print(f"isc.evaluation.metrics.evaluate           {ours:7.3f} s")
    print(f"  including reading both CSVs  {with_io:7.3f} s")
    print(f"official-style per-pair loops  {baseline:7.3f} s")
    print(
        f"speed-up: {baseline / ours:.1f}x  (budget: 500,000 predictions in < 1 s: {'met' if ours < 1 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
