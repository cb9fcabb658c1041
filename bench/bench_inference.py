"""Memory and time of D2LV's test stage after the model, on synthetic descriptors, against its global path.

D2LV's test stage (``isc.evaluation.inference``) describes every query by ~20 *views* and matches the
original query against 19 views of every reference (the whole image and 18 crops), then combines the
view scores (``isc.evaluation.aggregate``). This script runs the test stage itself,
``isc.evaluation.inference.run_test_stage`` (``_search_model``, ``_stages``, ``_score``), with only the
extraction replaced: :class:`SyntheticExtraction` returns seeded random unit float32 descriptors of the
shapes ``extract`` would (exact search cost does not depend on the data), and its time is not counted.
There is no training set, so post-processing is L2 normalisation. Each stage runs in a process of its own
(forked from a server that did the imports, ``bench/fresh_process.py``) so that its peak RSS is its own:

- ``global``: one view per query, one scale, one model, every reference in one block (the global stage's
  path: ``knn`` -> candidate rows -> ``aggregate_pairs(top=1)`` -> 500,000 pairs), the baseline;
- ``local``: local verification with the query views (``--views`` each), the reference crops
  (``--crops`` > 1) searched ``--block`` images at a time, ``--scales`` kept apart (``multiscale: max``)
  and ``--models`` voting; every stage the test stage scores (global, + multi-scale, + local
  verification, + reference crops, + ensemble).

The searches (``blocked.knn_into``: ``knn`` + ``merge_topk``) and the aggregation (``_stages``) are timed where
the test stage calls them; "other" is the rest of ``run_test_stage`` (post-processing, candidate rows,
bookkeeping). It prints one table (seconds, milliseconds per query, peak RSS over the process after its
imports and a warm-up search, numpy's traced peak of the aggregation) with the local/global ratios of
the same run, then the memory arithmetic of the local stage, checked against the measured peak at this
run's size and evaluated at ``--full-queries`` x ``--full-references`` (DISC21: 50k x 1M), with the
measured time extrapolated there (search linearly in query rows x reference rows, aggregation in
candidate rows). Defaults take about a minute on 2 cores.

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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fresh_process import in_fresh_process  # noqa: E402

from isc.evaluation import blocked, inference  # noqa: E402
from isc.evaluation.extract import Listing, ViewDescriptors, whole_image  # noqa: E402
from isc.evaluation.search import Backend, knn  # noqa: E402
from isc.evaluation.settings import (  # noqa: E402
    Ensemble,
    EvaluationSettings,
    LocalVerification,
    ScoreNormalization,
    Whitening,
)
from isc.evaluation.views import View  # noqa: E402

MAX_PREDICTIONS = 500_000  # the official cap (evaluation.max_predictions)
QUERY_BLOCK = EvaluationSettings.query_block  # queries aggregated at a time (evaluation.query_block)
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
    backend: Backend
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


@dataclass(frozen=True)
class Kept:
    """What the test stage's aggregation (``_stages``) holds, numpy-traced, per what it grows with.

    ``working_per_row``: the peak of the last stage's ``_score`` (every candidate row: selection, penalty,
    pairs) over what it started with, per row; ``masks_per_row``: the stages' row masks, held from the
    first stage to the last; ``per_pair``: each earlier stage's result (pairs, predictions with their ids),
    held until the last stage is scored, per pair (at most ``max_predictions`` a stage).
    """

    working_per_row: float = 0.0
    masks_per_row: float = 0.0
    per_pair: float = 0.0


@dataclass
class StageResult:
    name: str
    search_s: float  # view search (+ crop search for the local stage), merges included
    crop_s: float  # the crop search alone (part of search_s)
    aggregate_s: float  # every stage's rows -> penalty -> pairs -> top 500,000 (the test stage's _stages)
    other_s: float  # the rest of run_test_stage: post-processing, candidate rows, bookkeeping
    generate_s: float  # synthetic descriptors (stand in for the model; not counted)
    rows: int
    pairs: int
    base_rss_mb: float  # RSS of the process after its imports and a warm-up search
    peak_rss_mb: float  # peak RSS of the stage over base_rss_mb
    aggregate_traced_mb: float  # numpy's traced peak during aggregation over what it held before
    kept: Kept  # the aggregation's traced memory, split by what it grows with

    @property
    def total_s(self) -> float:
        return self.search_s + self.aggregate_s + self.other_s


def _rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def _unit(seed: tuple[int, ...], n: int, d: int) -> np.ndarray:
    """(n, d) random unit float32 rows, the same for the same seed in every process."""
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # np.linalg.norm would square x in a temporary
    return x


def _view_kinds(views: int) -> list[str]:
    """Kinds of one query's views, as ``query_views`` orders them: original, rotations, crops, proposals,
    and a final overlay (penalty-free, like the original)."""
    kinds = ["original"] + ["rotation"] * 3 + ["crop"] * 5
    kinds += ["proposal"] * max(0, views - len(kinds) - 1) + ["overlay"]
    return kinds[:views]


class _Model(nn.Module):
    """Stands for ensemble member ``index``: the synthetic extraction reads the index, nothing runs it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index


class SyntheticExtraction:
    """Replaces :meth:`Listing.extract` (every extraction of the test stage): seeded unit descriptors of the shape the
    engine would return for each call of the test stage (training, query views, a reference block, its
    crops), timed as generation. It also tells the search timer whether the next searches are crop searches.

    Seeds: (run seed, model, what, scale, block); what: 0 query views, 2 references, 3 crops.
    """

    def __init__(self, seed: int, sz: Sizes) -> None:
        self.seed, self.sz = seed, sz
        self.seconds = 0.0
        self.crops_next = False
        self.box = (0, 0, 640, 480)  # DISC21's typical query size; nothing reads the pixels

    def __call__(
        self,
        model: nn.Module,
        paths: Sequence[Path],
        *,
        scales: Sequence[int],
        views: Any,
        name: str,
        **_: Any,
    ) -> ViewDescriptors:
        started = time.perf_counter()
        sz, m, n = self.sz, int(model.index), len(paths)  # type: ignore[arg-type]
        ids = np.array([p.stem for p in paths])
        self.crops_next = name.endswith("-crops")
        if name == "queries":
            if views is whole_image:
                views_of = [[View("original", self.box)]] * n
            elif callable(views):  # the first model: the query views of every query
                views_of = [[View(k, self.box) for k in _view_kinds(sz.views)]] * n  # type: ignore[arg-type]
            else:  # a later model gets the first one's views
                views_of = list(views)
            per_image = len(views_of[0])
            per_scale = []
            for e in range(len(scales)):
                originals = _unit((self.seed, m, 1, e, 0), n, sz.dim)  # the global stage's descriptors
                if per_image == 1:
                    per_scale.append(originals)
                    continue
                x = _unit((self.seed, m, 0, e, 0), n * per_image, sz.dim)
                x[::per_image] = originals
                per_scale.append(x)
        elif self.crops_next:
            b = int(name.split("-")[1]) // sz.block
            crop = [View("reference_crop", self.box)] * (sz.crops - 1)
            views_of, per_image = [crop] * n, sz.crops - 1
            per_scale = [_unit((self.seed, m, 3, 0, b), n * per_image, sz.dim)]
        else:
            b = int(name.split("-")[1]) // sz.block
            views_of, per_image = [[View("original", self.box)]] * n, 1
            per_scale = [_unit((self.seed, m, 2, e, b), n, sz.dim) for e in range(len(scales))]
        out = ViewDescriptors(
            ids,
            per_scale,
            np.repeat(np.arange(n, dtype=np.int64), per_image),
            views_of,
            np.tile(np.array(self.box[2:], dtype=np.int64), (n, 1)),
            np.zeros(len(scales)),
        )
        self.seconds += time.perf_counter() - started
        return out


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


def settings_for(stage: str, args: Ns) -> EvaluationSettings:
    """The test stage's settings: ``global`` one view, one scale, one model, every reference in one block;
    ``local`` the query views, the reference crops (``--crops`` > 1), ``--scales`` kept apart
    (``multiscale: max``) and ``--models`` voting (D2LV: 2 of 3). No training set: post-processing is
    L2 normalisation only."""
    sz = args.sizes()
    off = {"whitening": Whitening(enabled=False), "score_normalization": ScoreNormalization(enabled=False)}
    common = {
        "k": sz.k,
        "search_backend": args.backend,
        "device": args.device,
        "max_predictions": MAX_PREDICTIONS,
    }
    if stage == "global":
        return EvaluationSettings(scales=(224,), reference_block=sz.references, **common, **off)  # type: ignore[arg-type]
    lv = LocalVerification(
        enabled=True, reference_crops=sz.crops > 1, penalty=PENALTY, penalty_free=PENALTY_FREE, top=TOP
    )
    ensemble = Ensemble(models=tuple(f"m{i}" for i in range(sz.models)), min_votes=min(2, sz.models))
    scales = tuple(224 + 32 * e for e in range(sz.scales))
    return EvaluationSettings(
        scales=scales,
        multiscale="max",
        local_verification=lv,
        ensemble=ensemble if sz.models > 1 else Ensemble(),
        reference_block=sz.block,
        **common,  # type: ignore[arg-type]
        **off,  # type: ignore[arg-type]
    )


def run_stage(stage: str, args: Ns) -> StageResult:
    """``isc.evaluation.inference.run_test_stage`` with the synthetic extraction, its searches and its
    aggregation timed where the test stage calls them."""
    sz = args.sizes()
    s = settings_for(stage, args)
    base = _warm_up(args)
    synthetic = SyntheticExtraction(args.seed, sz)
    timer = {"search": 0.0, "crops": 0.0, "aggregate": 0.0, "traced": 0.0}
    knn_into, stages, score = blocked.knn_into, inference._stages, inference._score

    def timed_knn_into(*a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        out = knn_into(*a, **kw)
        seconds = time.perf_counter() - started
        timer["search"] += seconds
        timer["crops"] += seconds if synthetic.crops_next else 0.0
        return out

    calls: list[tuple[int, int, int, int, int]] = []  # per _score: held before, peak, held after, rows, pairs
    entry, peak = [0], [0]  # traced bytes when _stages starts; the highest peak of its _score calls

    def timed_stages(*a: Any, **kw: Any) -> Any:
        tracemalloc.reset_peak()
        entry[0] = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        out = stages(*a, **kw)
        timer["aggregate"] += time.perf_counter() - started
        timer["traced"] = (peak[0] - entry[0]) / MB
        return out

    def traced_score(name: str, rows: np.ndarray, *a: Any, **kw: Any) -> Any:
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = score(name, rows, *a, **kw)
        after, top = tracemalloc.get_traced_memory()
        peak[0] = max(peak[0], top)
        calls.append((held, top, after, int(np.count_nonzero(rows)), len(out.pairs)))
        return out

    Listing.extract = lambda listing, model, **engine: synthetic(  # type: ignore[method-assign]
        model, listing.paths, **engine, **listing.arguments()
    )
    blocked.knn_into = timed_knn_into  # type: ignore[assignment]
    inference._stages = timed_stages  # type: ignore[assignment]
    inference._score = traced_score  # type: ignore[assignment]
    models = [_Model(m) for m in range(1 if stage == "global" else sz.models)]
    paths = {
        "queries": [Path(f"Q{i:07d}.jpg") for i in range(sz.queries)],
        "references": [Path(f"R{i:07d}.jpg") for i in range(sz.references)],
    }
    ids = {split: [p.stem for p in files] for split, files in paths.items()}
    started = time.perf_counter()
    result = inference.run_test_stage(models, paths, ids, s)  # type: ignore[arg-type]
    wall = time.perf_counter() - started
    other = wall - synthetic.seconds - timer["search"] - timer["aggregate"]
    first, last = calls[0], calls[-1]
    earlier_pairs = sum(c[4] for c in calls[:-1])
    kept = Kept(
        (last[1] - last[0]) / max(1, last[3]),
        (first[0] - entry[0]) / max(1, len(result.rows.candidates)),
        sum(c[2] - c[0] for c in calls[:-1]) / max(1, earlier_pairs),
    )
    return StageResult(
        stage,
        timer["search"],
        timer["crops"],
        timer["aggregate"],
        other,
        synthetic.seconds,
        len(result.rows.candidates),
        len(result.predictions.scores),
        base,
        _rss_mb() - base,
        timer["traced"],
        kept,
    )


def _in_fresh_process(stage: str, args: Ns) -> StageResult:
    """Run one stage in a new process: its peak RSS owes nothing to the other stage."""
    return in_fresh_process(run_stage, stage, args)


# ------------------------------------------------------------------------------------------------------
# memory arithmetic


def _tile(query_rows: int, database_rows: int) -> int:
    """Bytes of faiss's BLAS similarity tile (``distance_compute_blas_{query,database}_bs``: 4096 x 1024)."""
    return min(query_rows, 4096) * min(database_rows, 1024) * 4


Term = tuple[str, str, str, float]  # phase, what, grows with, bytes


def n_stages(sz: Sizes) -> int:
    """The stages the test stage scores: global, + multi-scale, + local verification, + reference crops,
    + ensemble."""
    return 2 + (sz.scales > 1) + (sz.crops > 1) + (sz.models > 1)


def memory_terms(sz: Sizes, aggregate_bytes_per_row: float, kept: Kept | None = None) -> list[Term]:
    """The local stage's main allocations at size ``sz``.

    Search phase: what one model's pass holds while it searches the last reference block (its crops, or
    its whole images when there are no crops); aggregation phase: the candidate rows of every model and
    the aggregation's working set (measured per row in this run, for one query block's rows), and with ``kept`` (measured) the
    stages' row masks and the results of the stages before the last (at most ``max_predictions`` pairs
    each, the global stage at most queries x k).
    """
    d4, b, k = sz.dim * 4, min(sz.block, sz.references), sz.k
    view_rows = sz.queries * sz.views * sz.scales
    rows = sz.view_rows + sz.crop_rows
    whole = sz.references * d4  # the first scale's whole references: run_test_stage returns them
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
    search("whole-reference descriptors kept so far, r*d*4", "references", whole)
    aggregate(f"candidate rows ({rows:,}) x {CANDIDATE_ROW_BYTES} B", "queries", rows * CANDIDATE_ROW_BYTES)
    block_rows = rows * min(1.0, QUERY_BLOCK / sz.queries)  # the aggregation runs a query block at a time
    aggregate(
        f"aggregation working set {aggregate_bytes_per_row:.0f} B/row (measured) x a {QUERY_BLOCK:,}-query "
        f"block's {block_rows:,.0f} rows",
        "queries",
        block_rows * aggregate_bytes_per_row,
    )
    if kept is not None:
        aggregate(
            f"the stages' row masks {kept.masks_per_row:.0f} B/row (measured)",
            "queries",
            rows * kept.masks_per_row,
        )
        pairs = min(sz.queries * k, MAX_PREDICTIONS) + (n_stages(sz) - 2) * min(rows, MAX_PREDICTIONS)
        aggregate(
            f"earlier stages' results, {pairs:,} pairs x {kept.per_pair:.0f} B (measured)",
            "queries",
            pairs * kept.per_pair,
        )
    aggregate("whole-reference descriptors kept, r*d*4", "references", whole)
    return terms


GROWTH = ("queries", "block", "references")


def _by(terms: list[Term], phase: str) -> dict[str, float]:
    """Bytes of ``phase`` per what they grow with."""
    return {g: sum(t[3] for t in terms if t[0] == phase and t[2] == g) for g in GROWTH}


def print_arithmetic(
    label: str, sz: Sizes, per_row: float, measured_mb: float | None = None, kept: Kept | None = None
) -> tuple[str, float]:
    """Print the terms and each phase's total; return the peak phase and its bytes."""
    terms = memory_terms(sz, per_row, kept)
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
        f"\n{'stage':8s} {'search s':>9s} {'of which crops':>14s} {'aggregate s':>11s} {'other s':>8s} "
        f"{'total s':>8s} "
        f"{'ms/query':>9s} {'peak RSS MB':>11s} {'agg. traced MB':>14s} {'rows':>11s} {'pairs':>9s}"
    )
    for r in results.values():
        print(
            f"{r.name:8s} {r.search_s:9.2f} {r.crop_s:14.2f} {r.aggregate_s:11.2f} {r.other_s:8.2f} "
            f"{r.total_s:8.2f} "
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
        "(other: the rest of run_test_stage, i.e. L2 post-processing of every descriptor, candidate rows, "
        "bookkeeping; peak RSS is over the RSS of each process after its imports and a warm-up search: "
        f"{g.base_rss_mb:.0f} / {loc.base_rss_mb:.0f} MB; "
        f"descriptor generation, not counted: {g.generate_s:.1f} / {loc.generate_s:.1f} s)"
    )

    per_row, kept = loc.kept.working_per_row, loc.kept
    g_per_row = g.kept.working_per_row
    print(
        f"aggregation, numpy traced: last stage's working set {per_row:.0f} B/row, stage masks "
        f"{kept.masks_per_row:.0f} B/row, earlier stages' results {kept.per_pair:.0f} B/pair"
    )
    print_arithmetic("memory at this run's size", sz, per_row, loc.peak_rss_mb, kept)
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
    phase, peak = print_arithmetic("memory at full size", full, per_row, kept=kept)
    doubled = replace(full, references=2 * full.references)
    before, after = (
        {p: _by(memory_terms(x, per_row, kept), p) for p in ("search", "aggregate")} for x in (full, doubled)
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
    other_x = (full.references * (full.scales + full.crops - 1) * full.models) / (
        sz.references * (sz.scales + sz.crops - 1) * sz.models
    )
    t_local = view_s * view_x + (crop_s * crop_x if sz.crops > 1 else 0.0) + agg_s * agg_x
    t_local += loc.other_s * other_x
    g_search_x = (full.queries * full.references) / (sz.queries * sz.references)
    g_other_x = full.references / sz.references
    t_global = g.search_s * g_search_x + g.aggregate_s * full.queries / sz.queries + g.other_s * g_other_x
    print(f"\ntime at full size, extrapolated linearly from this run (same machine, {args.backend}):")
    for what, seconds, x, unit in (
        ("view search", view_s, view_x, "query views x scales x models x references"),
        ("crop search", crop_s, crop_x, "queries x models x references x crops"),
        ("aggregation", agg_s, agg_x, "candidate rows"),
        ("other", loc.other_s, other_x, "reference rows post-processed x models"),
        ("global search", g.search_s, g_search_x, "queries x references"),
        ("global aggregation", g.aggregate_s, full.queries / sz.queries, "queries"),
        ("global other", g.other_s, g_other_x, "references"),
    ):
        print(f"  {what:18s} {seconds:8.2f} s x {x:12,.0f} = {_duration(seconds * x):>9s}  (ratio of {unit})")
    print(
        f"  local total {_duration(t_local)} ({1000 * t_local / full.queries:,.0f} ms/query), global "
        f"{_duration(t_global)} ({1000 * t_global / full.queries:,.1f} ms/query): local/global "
        f"{t_local / t_global:.0f}x"
    )


if __name__ == "__main__":
    main()
