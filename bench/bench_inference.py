"""Memory and time of D2LV's search + aggregation on synthetic descriptors, against the global path.

D2LV's test stage (``isc.evaluation.inference``) describes every query by ~20 *views* and matches the
original query against 19 views of every reference (the whole image and 18 crops), then combines the
view scores (``isc.evaluation.aggregate``). This script runs the part after the model on random unit
float32 descriptors (seeded; exact search cost does not depend on the data), each stage in its own
freshly spawned process so that its peak RSS is its own:

- ``global``: one descriptor per query against all references held in memory: ``knn`` -> candidate rows ->
  ``aggregate_pairs(top=1)`` -> ``.top(500_000)``, the baseline (``global`` stage of the test stage);
- ``local``: every query view against the references ``--block`` images at a time, each view keeping its
  running top-k (``merge_topk``), and the original views against the reference crops, generated block by
  block so that the crop matrix never exists whole; then ``Candidates`` -> ``view_penalty`` ->
  ``aggregate_pairs(top=2)`` -> ``.top(500_000)``. The loop has the shape of ``_search_model`` in
  ``isc/evaluation/inference.py`` (same arrays alive at the same time, same bookkeeping); descriptor
  post-processing and score normalisation are left out.

It prints one table (search and aggregation seconds, milliseconds per query, peak RSS over the process
after its imports and a warm-up search, numpy's traced peak of the aggregation) with the local/global
ratios of the same run, then the memory arithmetic of the local stage, checked against the measured
peak at this run's size and evaluated at ``--full-queries`` x ``--full-references`` (DISC21: 50k x
1M), with the measured time extrapolated there (search linearly in queries x references, aggregation
in candidate rows). Descriptor generation stands in for the model and is not counted. Defaults take
about a minute on 2 cores.

    .venv/bin/python bench/bench_inference.py
    .venv/bin/python bench/bench_inference.py --queries 50 --views 4 --references 500 --block 200 \
        --full-queries 1000 --full-references 10000
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isc.evaluation.aggregate import Candidates, aggregate_pairs, merge_topk, view_penalty  # noqa: E402
from isc.evaluation.search import knn  # noqa: E402

MAX_PREDICTIONS = 500_000  # the official cap (evaluation.max_predictions)
PENALTY, PENALTY_FREE, TOP = 0.05, ("original", "overlay"), 2  # conf/experiment/d2lv_inference.yaml
CANDIDATE_ROW_BYTES = 6 * 4 + 4  # six int32 columns and a float32 score
TOPK_BYTES = 4 + 8  # float32 similarity + int64 index per kept neighbour
MB = 1e6


@dataclass(frozen=True)
class Sizes:
    """One problem size: ``crops`` counts the reference views of the crop search (whole image included)."""

    queries: int
    views: int
    references: int
    crops: int
    dim: int
    k: int
    block: int
    scales: int
    models: int

    @property
    def n_blocks(self) -> int:
        return -(-self.references // self.block)

    @property
    def view_rows(self) -> int:
        """Candidate rows of the view searches: every query view keeps k references per scale and model."""
        return self.queries * self.views * min(self.k, self.references) * self.scales * self.models

    @property
    def crop_rows(self) -> int:
        """At most: the crop search's neighbours that are crops (its whole-image rows are dropped)."""
        return self.queries * min(self.k, self.references * self.crops) * self.models if self.crops > 1 else 0


class Ns(argparse.Namespace):
    """The parsed command line (typed)."""

    queries: int
    views: int
    references: int
    crops: int
    dim: int
    k: int
    block: int
    scales: int
    models: int
    backend: str
    device: str
    seed: int
    full_queries: int
    full_references: int
    full_views: int | None
    full_block: int
    full_scales: int
    full_models: int

    def sizes(self) -> Sizes:
        return Sizes(
            self.queries,
            self.views,
            self.references,
            self.crops,
            self.dim,
            self.k,
            self.block,
            self.scales,
            self.models,
        )


@dataclass
class StageResult:
    name: str
    search_s: float  # view search (+ crop search for the local stage), merges included
    crop_s: float  # the crop search alone (part of search_s)
    aggregate_s: float  # candidate rows -> pairs -> top 500,000
    generate_s: float  # synthetic descriptors (stands in for the model; not counted)
    rows: int
    pairs: int
    base_rss_mb: float  # RSS of the process after its imports and a warm-up search
    peak_rss_mb: float  # peak RSS of the stage over base_rss_mb
    aggregate_traced_mb: float  # numpy's traced peak during aggregation over what it held before

    @property
    def total_s(self) -> float:
        return self.search_s + self.aggregate_s


def _rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def _unit(seed: tuple[int, ...], n: int, d: int) -> np.ndarray:
    """(n, d) random unit float32 rows, the same for the same seed in every process."""
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # np.linalg.norm would square x in a temporary
    return x


# seeds: (run seed, model, what, scale, block); what: 0 query views, 1 query originals, 2 references, 3 crops
def _originals(seed: int, model: int, scale: int, sz: Sizes) -> np.ndarray:
    return _unit((seed, model, 1, scale, 0), sz.queries, sz.dim)


def _reference_block(seed: int, model: int, scale: int, block: int, n: int, sz: Sizes) -> np.ndarray:
    return _unit((seed, model, 2, scale, block), n, sz.dim)


def _query_views(seed: int, model: int, scale: int, sz: Sizes) -> np.ndarray:
    """(queries * views, d), view 0 of each query being its original (the global stage's descriptor)."""
    x = _unit((seed, model, 0, scale, 0), sz.queries * sz.views, sz.dim)
    x[:: sz.views] = _originals(seed, model, scale, sz)
    return x


def _view_kinds(views: int) -> np.ndarray:
    """Kinds of one query's views, as ``query_views`` orders them: original, rotations, crops, proposals,
    and a final overlay (penalty-free, like the original)."""
    kinds = ["original"] + ["rotation"] * 3 + ["crop"] * 5
    kinds += ["proposal"] * max(0, views - len(kinds) - 1) + ["overlay"]
    return np.array(kinds[:views])


def _knn_into(
    best: tuple[np.ndarray, np.ndarray], queries: np.ndarray, refs: np.ndarray, rows: np.ndarray, args: Ns
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``refs`` (global row numbers ``rows``) and merge into the running top-k, as the test stage."""
    sims, idx = knn(queries, refs, args.k, backend=args.backend, device=args.device)
    idx = np.where(idx >= 0, rows[np.maximum(idx, 0)], -1)
    return merge_topk(*best, sims, idx, args.k)


def _aggregate(candidates: Candidates, kinds: np.ndarray | None, top: int) -> tuple[int, float, float]:
    """Penalise (when ``kinds`` is given), aggregate and cap: (pairs kept, seconds, traced peak MB)."""
    tracemalloc.reset_peak()
    held = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    c = candidates.take(np.flatnonzero(np.ones(len(candidates), dtype=bool)))  # _score selects its rows
    if kinds is not None:
        c = c.with_scores(
            c.score - view_penalty(np.isin(kinds, PENALTY_FREE)[c.query_view], c.reference_view, PENALTY)
        )
    pairs = aggregate_pairs(c, top=top).top(MAX_PREDICTIONS)
    seconds = time.perf_counter() - started
    return len(pairs), seconds, (tracemalloc.get_traced_memory()[1] - held) / MB


def _current_rss_mb() -> float:
    """Resident set size of this process now (Linux ``/proc``; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / MB
    except OSError:
        return _rss_mb()


def _warm_up(args: Ns) -> float:
    """One search of the size of a tile, so that the search library's lasting state (thread pool, BLAS
    buffers) is not counted in the stage; then start tracing numpy. Returns the resident size now: the
    stage's peak RSS is counted over it."""
    knn(_unit((1,), 4096, 256), _unit((2,), 2048, 256), 10, backend=args.backend, device=args.device)
    tracemalloc.start()
    return _current_rss_mb()


def run_global(args: Ns) -> StageResult:
    """Baseline: one descriptor per query, all references in memory, one search, max over rows."""
    sz = args.sizes()
    base = _warm_up(args)
    started = time.perf_counter()
    queries = _originals(args.seed, 0, 0, sz)
    refs = np.empty((sz.references, sz.dim), dtype=np.float32)
    for b, start in enumerate(range(0, sz.references, sz.block)):
        stop = min(start + sz.block, sz.references)
        refs[start:stop] = _reference_block(args.seed, 0, 0, b, stop - start, sz)
    generate = time.perf_counter() - started
    started = time.perf_counter()
    sims, idx = knn(queries, refs, sz.k, backend=args.backend, device=args.device)
    search = time.perf_counter() - started
    started = time.perf_counter()
    i, j = np.nonzero(idx >= 0)
    candidates = Candidates(
        query=i,
        reference=idx[i, j],
        score=sims[i, j],
        query_view=i * sz.views,
        reference_view=np.zeros(len(i), dtype=np.int64),
        scale=np.zeros(len(i), dtype=np.int64),
        model=np.zeros(len(i), dtype=np.int64),
    )
    build = time.perf_counter() - started
    n_pairs, aggregate, traced = _aggregate(candidates, None, top=1)
    return StageResult(
        "global",
        search,
        0.0,
        build + aggregate,
        generate,
        len(candidates),
        n_pairs,
        base,
        _rss_mb() - base,
        traced,
    )


def run_local(args: Ns) -> StageResult:
    """Query views x references block by block (+ original views x reference crops), then aggregation."""
    sz = args.sizes()
    base = _warm_up(args)
    generate = search = crop_search = build = 0.0
    owner = np.repeat(np.arange(sz.queries, dtype=np.int64), sz.views)
    original = np.arange(sz.queries, dtype=np.int64) * sz.views
    n_views = len(owner)
    parts: list[Candidates] = []
    kept_references: list[np.ndarray] = []  # run_test_stage keeps the first model's whole references

    def empty(n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((n, sz.k), -np.inf, np.float32), np.full((n, sz.k), -1, np.int64)

    for m in range(sz.models):
        started = time.perf_counter()
        queries = [_query_views(args.seed, m, e, sz) for e in range(sz.scales)]
        generate += time.perf_counter() - started
        whole = [empty(n_views) for _ in queries]
        crops = empty(sz.queries)
        ref_tables: list[np.ndarray] = []  # (image, crop index) of every reference row searched
        global_refs: list[np.ndarray] = []
        rc: np.ndarray | None = None
        n_ref_views = 0
        for b, start in enumerate(range(0, sz.references, sz.block)):
            n = min(sz.block, sz.references - start)
            rows = n_ref_views + np.arange(n)
            ref_tables.append(np.stack([start + np.arange(n), np.zeros(n, dtype=np.int64)], axis=1))
            n_ref_views += n
            for e in range(sz.scales):
                started = time.perf_counter()
                ref = _reference_block(args.seed, m, e, b, n, sz)
                generate += time.perf_counter() - started
                if e == 0:
                    global_refs.append(ref)
                started = time.perf_counter()
                whole[e] = _knn_into(whole[e], queries[e], ref, rows, args)
                search += time.perf_counter() - started
            if sz.crops > 1:
                started = time.perf_counter()
                # like the test stage's `rc`, the previous block's crops live until these replace them
                rc = _unit((args.seed, m, 3, 0, b), n * (sz.crops - 1), sz.dim)
                generate += time.perf_counter() - started
                started = time.perf_counter()
                crop_index = np.tile(np.arange(1, sz.crops, dtype=np.int64), n)
                crop_rows = n_ref_views + np.arange(len(crop_index))
                crop_owner = np.repeat(start + np.arange(n, dtype=np.int64), sz.crops - 1)
                ref_tables.append(np.stack([crop_owner, crop_index], axis=1))
                n_ref_views += len(crop_index)
                ref = np.concatenate([global_refs[-1], rc])
                crops = _knn_into(crops, queries[0][original], ref, np.r_[rows, crop_rows], args)
                crop_search += time.perf_counter() - started
        started = time.perf_counter()
        ref_table = np.concatenate(ref_tables)
        searches = [(e, sims, idx, np.arange(n_views)) for e, (sims, idx) in enumerate(whole)]
        if sz.crops > 1:  # whole references found here are already in the first search: keep crop rows
            sims, idx = crops
            searches.append((0, sims, np.where(ref_table[np.maximum(idx, 0), 1] > 0, idx, -1), original))
        for e, sims, idx, view_rows in searches:
            i, j = np.nonzero(idx >= 0)
            hit = idx[i, j]
            parts.append(
                Candidates(
                    query=owner[view_rows[i]],
                    reference=ref_table[hit, 0],
                    score=sims[i, j],
                    query_view=view_rows[i],
                    reference_view=ref_table[hit, 1],
                    scale=np.full(len(i), e),
                    model=np.full(len(i), m),
                )
            )
        if m == 0:
            kept_references.append(np.concatenate(global_refs))
        del queries, whole, crops, ref_tables, global_refs, ref_table, searches, ref, rc
        build += time.perf_counter() - started
    started = time.perf_counter()
    candidates = Candidates.concat(parts)
    del parts
    kinds = np.tile(_view_kinds(sz.views), sz.queries)  # per query view, as TestStageResult.query_views
    build += time.perf_counter() - started
    n_pairs, aggregate, traced = _aggregate(candidates, kinds, top=TOP)
    return StageResult(
        "local",
        search + crop_search,
        crop_search,
        build + aggregate,
        generate,
        len(candidates),
        n_pairs,
        base,
        _rss_mb() - base,
        traced,
    )


def _in_fresh_process(stage: str, args: Ns) -> StageResult:
    """Run one stage in a newly spawned interpreter: its peak RSS owes nothing to the other stage."""
    fn = run_global if stage == "global" else run_local
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, args).result()


# ------------------------------------------------------------------------------------------------------
# memory arithmetic


def _tile(query_rows: int, database_rows: int) -> int:
    """Bytes of faiss's BLAS similarity tile (``distance_compute_blas_{query,database}_bs``: 4096 x 1024)."""
    return min(query_rows, 4096) * min(database_rows, 1024) * 4


Term = tuple[str, str, str, float]  # phase, what, grows with, bytes


def memory_terms(sz: Sizes, aggregate_bytes_per_row: float) -> list[Term]:
    """The local stage's main allocations at size ``sz``.

    Search phase: what one model's pass holds while it searches the last reference block (its crops, or
    its whole images when there are no crops); aggregation phase: the candidate rows of every model and
    the aggregation's working set (measured per row in this run).
    """
    d4, b, k = sz.dim * 4, min(sz.block, sz.references), sz.k
    view_rows = sz.queries * sz.views * sz.scales
    rows = sz.view_rows + sz.crop_rows
    kept = sz.references * d4  # the first scale's whole references: run_test_stage returns them
    terms: list[Term] = []

    def search(what: str, grows: str, nbytes: float) -> None:
        terms.append(("search", what, grows, nbytes))

    def aggregate(what: str, grows: str, nbytes: float) -> None:
        terms.append(("aggregate", what, grows, nbytes))

    search(
        "candidate rows of the models before the last",
        "queries",
        rows * (sz.models - 1) // sz.models * CANDIDATE_ROW_BYTES,
    )
    search("query-view descriptors q*v*s*d*4", "queries", view_rows * d4)
    search("running top-k (q*v*s + q)*k*(4+8)", "queries", (view_rows + sz.queries) * k * TOPK_BYTES)
    if sz.crops > 1:  # the peak: the crop search of a block
        search("knn + merge_topk temporaries ~5x the crop search's top-k", "queries", 5 * sz.queries * k * 12)
        search(
            "  + faiss's similarity tile min(q,4096)*min(rows,1024)*4",
            "queries",
            _tile(sz.queries, b * sz.crops),
        )
        search("crop-search matrix block*crops*d*4 (whole + crops)", "block", b * sz.crops * d4)
        search("  + faiss's copy of it (IndexFlatIP.add)", "block", b * sz.crops * d4)
        search("  + the crops before concatenation block*(crops-1)*d*4", "block", b * (sz.crops - 1) * d4)
    else:  # the peak: a view search of a block
        search("knn + merge_topk temporaries ~5x a view search's top-k", "queries", 5 * view_rows * k * 12)
        search("  + faiss's similarity tile min(q*v,4096)*min(block,1024)*4", "queries", _tile(view_rows, b))
        search(
            "whole-reference block (scales > 1) + faiss's copy, block*d*4",
            "block",
            b * d4 * (1 + (sz.scales > 1)),
        )
    search(
        "reference-view table r*crops*2*8 (image, crop index)", "references", sz.references * sz.crops * 16
    )
    search("whole-reference descriptors kept so far, r*d*4", "references", kept)
    aggregate(f"candidate rows ({rows:,}) x {CANDIDATE_ROW_BYTES} B", "queries", rows * CANDIDATE_ROW_BYTES)
    aggregate(
        f"aggregation working set {aggregate_bytes_per_row:.0f} B/row (measured)",
        "queries",
        rows * aggregate_bytes_per_row,
    )
    aggregate("whole-reference descriptors kept, r*d*4", "references", kept)
    return terms


GROWTH = ("queries", "block", "references")


def _by(terms: list[Term], phase: str) -> dict[str, float]:
    """Bytes of ``phase`` per what they grow with."""
    return {g: sum(t[3] for t in terms if t[0] == phase and t[2] == g) for g in GROWTH}


def print_arithmetic(
    label: str, sz: Sizes, per_row: float, measured_mb: float | None = None
) -> tuple[str, float]:
    """Print the terms and each phase's total; return the peak phase and its bytes."""
    terms = memory_terms(sz, per_row)
    print(
        f"\n{label}: {sz.queries:,} queries x {sz.views} views x {sz.scales} scale(s) x "
        f"{sz.models} model(s), "
        f"{sz.references:,} references x {sz.crops} views, d={sz.dim}, k={sz.k}, "
        f"block={min(sz.block, sz.references):,} ({sz.n_blocks} blocks)"
    )
    for phase, what, grows, nbytes in terms:
        print(f"  {phase:9s} {what:58s} {nbytes / MB:12,.1f} MB  [{grows}]")
    totals = {}
    for phase in ("search", "aggregate"):
        by = _by(terms, phase)
        totals[phase] = sum(by.values())
        parts = ", ".join(f"{g} {v / MB:,.0f}" for g, v in by.items() if v)
        print(f"  {phase:9s} {'phase total':58s} {totals[phase] / MB:12,.1f} MB  ({parts})")
    phase = max(totals, key=totals.__getitem__)
    if measured_mb is not None:
        print(
            f"  predicted peak ({phase} phase) {totals[phase] / MB:,.1f} MB, measured peak RSS "
            f"{measured_mb:,.1f} MB: measured/predicted {measured_mb / (totals[phase] / MB):.2f}"
        )
    return phase, totals[phase]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def global_bytes(queries: int, references: int, dim: int, k: int, per_row: float) -> float:
    """The baseline: queries + all references + faiss's copy and isfinite mask + its rows and aggregation."""
    rows = queries * min(k, references)
    return queries * dim * 4 + references * dim * (4 + 4 + 1) + rows * (CANDIDATE_ROW_BYTES + per_row)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--queries", type=int, default=2000)
    add("--views", type=int, default=20, help="views per query, the original first (D2LV: ~20)")
    add("--references", type=int, default=50000)
    add("--crops", type=int, default=19, help="reference views in the crop search, whole image included")
    add("--dim", type=int, default=256)
    add("--k", type=int, default=10)
    add("--block", type=int, default=10000, help="reference images searched at a time")
    add("--scales", type=int, default=1, help="descriptor entries searched per query view (multiscale=max)")
    add("--models", type=int, default=1, help="ensemble members (a whole search pass each)")
    add("--backend", default="faiss", choices=["faiss", "torch"])
    add("--device", default="auto", help="auto | cpu | cuda[:N]")
    add("--seed", type=int, default=0)
    add("--full-queries", type=int, default=50000)
    add("--full-references", type=int, default=1000000)
    add("--full-views", type=int, default=None, help="default: --views")
    add("--full-block", type=int, default=25000, help="evaluation.reference_block")
    add("--full-scales", type=int, default=3, help="conf/experiment/d2lv_inference.yaml: 256/320/200 px")
    add("--full-models", type=int, default=3, help="D2LV's ensemble of three backbones")
    args = parser.parse_args(argv, namespace=Ns())
    for name in ("queries", "views", "references", "crops", "dim", "k", "block", "scales", "models"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    sz = args.sizes()
    print(
        f"{sz.queries:,} queries x {sz.views} views, {sz.references:,} references x {sz.crops} views "
        f"(whole + {sz.crops - 1} crops), d={sz.dim}, k={sz.k}, block={sz.block:,}, scales={sz.scales}, "
        f"models={sz.models}, backend={args.backend}; each stage in a fresh process"
    )
    results = {stage: _in_fresh_process(stage, args) for stage in ("global", "local")}

    print(
        f"\n{'stage':8s} {'search s':>9s} {'of which crops':>14s} {'aggregate s':>11s} {'total s':>8s} "
        f"{'ms/query':>9s} {'peak RSS MB':>11s} {'agg. traced MB':>14s} {'rows':>11s} {'pairs':>9s}"
    )
    for r in results.values():
        print(
            f"{r.name:8s} {r.search_s:9.2f} {r.crop_s:14.2f} {r.aggregate_s:11.2f} {r.total_s:8.2f} "
            f"{1000 * r.total_s / sz.queries:9.2f} {r.peak_rss_mb:11.1f} {r.aggregate_traced_mb:14.1f} "
            f"{r.rows:11,d} {r.pairs:9,d}"
        )
    g, loc = results["global"], results["local"]
    print(
        f"local/global ratio: time {loc.total_s / g.total_s:.1f}x (search {loc.search_s / g.search_s:.1f}x, "
        f"aggregation {loc.aggregate_s / g.aggregate_s:.1f}x), "
        f"peak RSS {loc.peak_rss_mb / g.peak_rss_mb:.1f}x"
    )
    print(
        "(peak RSS is over the RSS of each process after its imports and a warm-up search: "
        f"{g.base_rss_mb:.0f} / {loc.base_rss_mb:.0f} MB; "
        f"descriptor generation, not counted: {g.generate_s:.1f} / {loc.generate_s:.1f} s)"
    )

    per_row = loc.aggregate_traced_mb * MB / max(1, loc.rows)
    g_per_row = g.aggregate_traced_mb * MB / max(1, g.rows)
    print_arithmetic("memory at this run's size", sz, per_row, loc.peak_rss_mb)
    full = Sizes(
        args.full_queries,
        args.full_views or args.views,
        args.full_references,
        args.crops,
        args.dim,
        args.k,
        args.full_block,
        args.full_scales,
        args.full_models,
    )
    phase, peak = print_arithmetic("memory at full size", full, per_row)
    doubled = replace(full, references=2 * full.references)
    before, after = (
        {p: _by(memory_terms(x, per_row), p) for p in ("search", "aggregate")} for x in (full, doubled)
    )
    growth = "; ".join(
        f"{p} phase " + ", ".join(f"{g} {(after[p][g] - before[p][g]) / MB:+,.0f}" for g in GROWTH)
        for p in ("search", "aggregate")
    )
    print(
        f"  twice the references ({doubled.references:,}): {growth} MB; "
        f"blocks {full.n_blocks} -> {doubled.n_blocks} (time)"
    )
    g_full = global_bytes(full.queries, full.references, full.dim, full.k, g_per_row)
    print(
        f"  global baseline at full size (all references in memory, one scale, one model): "
        f"{g_full / MB:,.0f} MB; local/global {peak / g_full:.1f}x"
    )

    # time: searches scale with (query rows x reference rows), aggregation with candidate rows
    view_s, crop_s, agg_s = loc.search_s - loc.crop_s, loc.crop_s, loc.aggregate_s
    view_x = (full.queries * full.views * full.scales * full.models * full.references) / (
        sz.queries * sz.views * sz.scales * sz.models * sz.references
    )
    crop_x = (full.queries * full.models * full.references * full.crops) / (
        sz.queries * sz.models * sz.references * sz.crops
    )
    agg_x = (full.view_rows + full.crop_rows) / max(1, loc.rows)
    t_local = view_s * view_x + (crop_s * crop_x if sz.crops > 1 else 0.0) + agg_s * agg_x
    g_search_x = (full.queries * full.references) / (sz.queries * sz.references)
    t_global = g.search_s * g_search_x + g.aggregate_s * full.queries / sz.queries
    print(f"\ntime at full size, extrapolated linearly from this run (same machine, {args.backend}):")
    for what, seconds, x, unit in (
        ("view search", view_s, view_x, "query views x scales x models x references"),
        ("crop search", crop_s, crop_x, "queries x models x references x crops"),
        ("aggregation", agg_s, agg_x, "candidate rows"),
        ("global search", g.search_s, g_search_x, "queries x references"),
        ("global aggregation", g.aggregate_s, full.queries / sz.queries, "queries"),
    ):
        print(f"  {what:18s} {seconds:8.2f} s x {x:12,.0f} = {_duration(seconds * x):>9s}  (ratio of {unit})")
    print(
        f"  local total {_duration(t_local)} ({1000 * t_local / full.queries:,.0f} ms/query), global "
        f"{_duration(t_global)} ({1000 * t_global / full.queries:,.1f} ms/query): local/global "
        f"{t_local / t_global:.0f}x"
    )


if __name__ == "__main__":
    main()
