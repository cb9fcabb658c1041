"""Peak memory and time of the test stage's aggregation, query-blocked against all at once, in one run.

The aggregation (``isc.evaluation.inference._stages``: every stage's row selection, penalty, 2-of-3 vote,
top-2 pair scores and the 500,000 cap) runs on a synthetic candidate table of D2LV's shape, built here
instead of searched: every query view keeps ``k`` references per scale and model, and the reference crops
add ``k`` rows per query and model. The models mostly agree (each of a view's references is shared by all
models with probability ``--agree``), so the vote keeps rows as it does on real data. The table is built
in a fresh process (``bench/fresh_process.py``); the peak RSS counted is the one over the RSS once the
table is built (the peak is reset there), so it is the aggregation's own.

- ``all at once``: ``evaluation.query_block`` = every query (what the test stage did before it was blocked);
- ``query blocks``: ``evaluation.query_block`` (default 5,000 queries), the default.

Both run at ``--queries``; then the blocked one alone at ``--full-queries`` (DISC21: 50,000 queries, the
full D2LV configuration: 20 views, 3 scales, 3 models, k 10, 1M references with 19 crops), where the table
itself is measured too. Check that both give the same predictions.

    .venv/bin/python bench/bench_aggregate.py
    .venv/bin/python bench/bench_aggregate.py --queries 200 --full-queries 400 --references 5000   # seconds
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import MAX_PREDICTIONS, PENALTY, PENALTY_FREE, TOP  # noqa: E402
from fresh_process import in_fresh_process  # noqa: E402

from isc.evaluation import inference  # noqa: E402
from isc.evaluation.aggregate import Candidates  # noqa: E402
from isc.evaluation.settings import (  # noqa: E402
    Ensemble,
    EvaluationSettings,
    LocalVerification,
    ScoreNormalization,
    Whitening,
)
from isc.evaluation.views import View  # noqa: E402

MB = 1e6
PRELOAD = ["numpy", "isc.evaluation.inference", "bench_inference"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MB


def _reset_peak() -> None:
    """Linux: from now on, the peak RSS (VmHWM) counts from the current RSS (proc(5), clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024 / MB


def _view_kinds(views: int) -> list[str]:
    kinds = ["original"] + ["rotation"] * 3 + ["crop"] * 5
    kinds += ["proposal"] * max(0, views - len(kinds) - 1) + ["overlay"]
    return kinds[:views]


def candidate_table(args: argparse.Namespace, queries: int) -> inference.TestStageRows:
    """The rows of ``queries`` queries, filled in place into int32 / float32 columns (so that building the
    table never holds it twice, and the peak RSS after it is the aggregation's)."""
    rng = np.random.default_rng(0)
    v, k, n_views = args.views, args.k, queries * args.views
    per_part, crop_rows = n_views * k, (queries * k if args.crops > 1 else 0)
    n = args.models * (args.scales * per_part + crop_rows)
    cols = {
        name: np.empty(n, np.int32)
        for name in ("query", "reference", "query_view", "reference_view", "scale", "model")
    }
    score = np.empty(n, np.float32)
    shared = rng.integers(args.references, size=(n_views, k), dtype=np.int32)  # each view's references
    base = np.sort(rng.uniform(0.0, 1.0, (n_views, k)).astype(np.float32), axis=1)[:, ::-1]
    view = np.repeat(np.arange(n_views, dtype=np.int32), k)
    at = 0

    def put(rows: int, **values: np.ndarray | int) -> None:
        nonlocal at
        for name, value in values.items():
            (score if name == "score" else cols[name])[at : at + rows] = value
        at += rows

    for m in range(args.models):
        own = rng.random((n_views, k)) >= args.agree
        refs = np.where(own, rng.integers(args.references, size=(n_views, k), dtype=np.int32), shared).ravel()
        for e in range(args.scales):
            noisy = (base + rng.normal(0, 0.02, base.shape).astype(np.float32)).ravel()
            put(
                per_part,
                query=view // v,
                reference=refs,
                score=noisy,
                query_view=view,
                reference_view=0,
                scale=e,
                model=m,
            )
        if crop_rows:  # the original view against the crops: crop index 1..18, scale 0
            originals = np.repeat(np.arange(0, n_views, v, dtype=np.int32), k)
            put(
                crop_rows,
                query=originals // v,
                reference=rng.integers(args.references, size=crop_rows, dtype=np.int32),
                score=rng.uniform(0.0, 1.0, crop_rows).astype(np.float32),
                query_view=originals,
                reference_view=rng.integers(1, args.crops, size=crop_rows, dtype=np.int32),
                scale=0,
                model=m,
            )
    del shared, base, view
    candidates = Candidates(score=score, **cols)
    kinds = _view_kinds(v)
    views = [View(kinds[i % v], (0, 0, 640, 480)) for i in range(n_views)]
    scale_names = [f"{224 + 32 * e} px" for e in range(args.scales)]
    return inference.TestStageRows(candidates, views, [(640, 480)] * args.references, scale_names)


def run(args: argparse.Namespace, queries: int, query_block: int) -> dict[str, float]:
    """Build the table, then aggregate every stage; seconds and MB over the RSS after the table."""
    before = _rss_mb()
    started = time.perf_counter()
    rows = candidate_table(args, queries)
    build_s = time.perf_counter() - started
    table_mb = _rss_mb() - before
    ids = {
        "queries": [f"Q{i:07d}" for i in range(queries)],
        "references": [f"R{i:07d}" for i in range(args.references)],
    }
    s = settings(args, query_block)
    held = _rss_mb()
    _reset_peak()
    forward = np.ones((args.models, args.scales))
    started = time.perf_counter()
    scored = inference._stages(rows, s, ids, None, forward, 0.0)
    seconds = time.perf_counter() - started
    final = scored[-1].stage.predictions
    return {
        "rows": float(len(rows.candidates)),
        "build_s": build_s,
        "table_mb": table_mb,
        "held_mb": held - before,
        "peak_mb": _peak_mb() - held,
        "seconds": seconds,
        "pairs": float(len(final.scores)),
        "checksum": float(np.float64(final.scores).sum()),
    }


def settings(args: argparse.Namespace, query_block: int) -> EvaluationSettings:
    """D2LV's aggregation (conf/experiment/d2lv_inference.yaml): penalty 0.05 off all but the original and
    overlay views, top-2 pair scores, scales kept apart, 2 of 3 models voting, the 500,000 cap."""
    lv = LocalVerification(
        enabled=True, reference_crops=args.crops > 1, penalty=PENALTY, penalty_free=PENALTY_FREE, top=TOP
    )
    ensemble = Ensemble(models=tuple(f"m{i}" for i in range(args.models)), min_votes=min(2, args.models))
    return EvaluationSettings(
        k=args.k,
        scales=tuple(224 + 32 * e for e in range(args.scales)),
        multiscale="max",
        local_verification=lv,
        ensemble=ensemble if args.models > 1 else Ensemble(),
        max_predictions=MAX_PREDICTIONS,
        query_block=query_block,
        whitening=Whitening(enabled=False),
        score_normalization=ScoreNormalization(enabled=False),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--queries", type=int, default=20_000, help="the size both variants run at")
    add("--full-queries", type=int, default=50_000, help="the blocked variant alone (0: skip)")
    add("--query-block", type=int, default=5_000, help="evaluation.query_block")
    add("--views", type=int, default=20)
    add("--k", type=int, default=10)
    add("--scales", type=int, default=3)
    add("--models", type=int, default=3)
    add("--references", type=int, default=1_000_000)
    add("--crops", type=int, default=19, help="reference views of the crop search, whole image included")
    add("--agree", type=float, default=0.8, help="chance that a model returns a view's shared reference")
    args = parser.parse_args(argv)

    print(
        f"{args.views} views x {args.scales} scales x {args.models} models x k {args.k} a query, "
        f"{args.references:,} references with {args.crops - 1} crops; each run in a fresh process"
    )
    print(f"{'':<34} {'queries':>8} {'rows':>12} {'table MB':>9} {'peak MB':>8} {'seconds':>8}")
    results = {}
    for name, queries, block in [
        ("all at once", args.queries, args.queries),
        (f"query blocks of {args.query_block:,}", args.queries, args.query_block),
    ] + (
        [(f"query blocks of {args.query_block:,}", args.full_queries, args.query_block)]
        if args.full_queries
        else []
    ):
        r = in_fresh_process(run, args, queries, block, preload=PRELOAD)
        results[(name, queries)] = r
        print(
            f"{name:<34} {queries:>8,} {int(r['rows']):>12,} {r['table_mb']:>9,.0f} {r['peak_mb']:>8,.0f} {r['seconds']:>8.1f}"
        )
    one, blocked = (
        results[("all at once", args.queries)],
        results[(f"query blocks of {args.query_block:,}", args.queries)],
    )
    if (one["pairs"], one["checksum"]) != (blocked["pairs"], blocked["checksum"]):
        raise SystemExit("the blocked aggregation's predictions differ from the unblocked one's")
    print(
        f"same predictions: yes; at {args.queries:,} queries the blocks' peak is "
        f"{blocked['peak_mb'] / one['peak_mb']:.2f}x and their time {blocked['seconds'] / one['seconds']:.2f}x "
        "the all-at-once aggregation's (peak: RSS over the table and the inputs)"
    )


if __name__ == "__main__":
    main()
