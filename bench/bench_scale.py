"""Peak memory and time of matching precomputed descriptors at scale, against a bare faiss search.

``task=evaluate evaluation.descriptors=...`` reads per-split HDF5 files, runs
``isc.evaluation.settings.match_descriptors`` (optional PCA-whitening fitted on the training descriptors,
L2 normalisation, score normalisation against them, exact faiss search, the 500,000-prediction cap, the
official metrics, and a second "raw" search for the metrics without post-processing), then writes
``descriptors.h5`` and ``predictions.csv``. This script runs exactly those library calls on synthetic
clustered unit float32 descriptors (random centres with per-cluster spreads, so some regions are dense
"hubs"; a fraction of the queries are noisy copies of references, so the metrics are non-trivial), each
phase in a process of its own (forked from a server that did the imports, ``bench/fresh_process.py``) so
that its peak RSS (``ru_maxrss``) is its own:

- ``baseline``: the minimal cost of the same answer, raw float32 arrays read from disk, one bare
  ``faiss.IndexFlatIP`` (``add`` + ``search`` for the top k);
- ``evaluate d2lv``: the chain above with D2LV's post-processing (``conf/experiment/d2lv_inference.yaml``:
  PCA-whitening to 256 dims, score normalisation beta 2, k 10) and a ground truth;
- ``evaluate default``: the same with ``conf/evaluation/default.yaml`` (score normalisation beta 1, k 3);
- ``predict d2lv``: D2LV's post-processing without ground truth (``task=predict``: one search, no metrics);
- ``test-stage block``: D2LV's local verification for one reference block (``evaluation.reference_block``
  images and their 18 crops), in the shape of ``_search_model`` in ``isc/evaluation/inference.py``: query
  views post-processed and kept (their raw copies freed, as the test stage frees them), the block whitened,
  searched by every view, the original views searched against the block with its crops, the running top-k
  merged (``merge_topk``), then the candidate rows penalised and aggregated (``aggregate_pairs(top=2)``).

The baseline and ``evaluate d2lv`` run at every ``--references`` count (the baseline before and after
the other phases of that count, the faster kept: other jobs on a shared machine come and go; wall and
CPU seconds are both reported). Time and peak RSS are fitted as linear in the number of references and
extrapolated to ``--full-references`` (DISC21: 1,000,000) x ``--full-queries``. The block run is
extrapolated to D2LV's full test stage with the cost model of ``bench/bench_inference.py`` (search
linear in query rows x reference rows). Peak RSS is counted over the RSS of each process after its
imports and a warm-up search, and includes the inputs it reads. Descriptor generation (which stands in
for the model) is not counted. The defaults (200,000 references x 50,000 queries x 256 d, a
20,000-image training set) take about 8 minutes on 2 idle cores, 10-15 when other jobs share them.

    .venv/bin/python bench/bench_scale.py
    .venv/bin/python bench/bench_scale.py --quick        # toy sizes, seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fresh_process  # noqa: E402

MB = 1e6
CHUNK = 65536  # rows generated at a time
QUICK = {  # --quick: every phase on toy sizes
    "references": "2000,4000",
    "queries": 500,
    "training": 400,
    "dim": 32,
    "clusters": 20,
    "lv_queries": 20,
    "views": 4,
    "block": 500,
    "full_queries": 1000,
    "full_references": 10000,
    "full_block": 1000,
}


# ------------------------------------------------------------------------------------------------------
# the command line


class Ns(argparse.Namespace):
    """The parsed command line (typed)."""

    references: list[int]
    queries: int
    training: int
    dim: int
    k: int
    clusters: int
    copies: float
    lv_queries: int
    views: int
    crops: int
    block: int
    full_queries: int
    full_references: int
    full_views: int
    full_block: int
    full_scales: int
    full_models: int
    workdir: str | None
    seed: int
    quick: bool

    @property
    def whitening_dim(self) -> int:
        return min(256, self.dim, self.training)


def _int_list(text: str) -> list[int]:
    values = sorted({int(v.replace("_", "")) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> Ns:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--references", type=_int_list, default="50000,100000,200000", help="reference counts to fit on")
    add("--queries", type=int, default=50000)
    add("--training", type=int, default=20000, help="training descriptors (D2LV's evaluation.max_training)")
    add("--dim", type=int, default=256)
    add("--k", type=int, default=10, help="evaluation.k")
    add("--clusters", type=int, default=1000, help="cluster centres of the synthetic descriptors")
    add("--copies", type=float, default=0.2, help="fraction of queries that copy a reference (DISC21: 0.2)")
    add("--lv-queries", type=int, default=500, help="queries of the test-stage block run")
    add("--views", type=int, default=20, help="views per query in the block run, the original first")
    add("--crops", type=int, default=19, help="reference views in the crop search, whole image included")
    add("--block", type=int, default=25000, help="evaluation.reference_block of the block run")
    add("--full-queries", type=int, default=50000)
    add("--full-references", type=int, default=1000000)
    add("--full-views", type=int, default=20)
    add("--full-block", type=int, default=25000, help="evaluation.reference_block at full size")
    add("--full-scales", type=int, default=3, help="conf/experiment/d2lv_inference.yaml: 256/320/200 px")
    add("--full-models", type=int, default=3, help="D2LV's ensemble of three backbones")
    add("--workdir", default=None, help="where the synthetic files go (default: a temporary folder)")
    add("--seed", type=int, default=0)
    add(
        "--quick",
        action="store_true",
        help="toy sizes (" + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + ")",
    )
    first, _ = parser.parse_known_args(argv)
    if first.quick:  # toy defaults; sizes given explicitly still win
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv, namespace=Ns())
    if isinstance(args.references, str):
        args.references = _int_list(args.references)
    for name in ("queries", "training", "dim", "k", "clusters", "lv_queries", "views", "crops", "block"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.copies <= 1:
        parser.error("--copies must be in [0, 1]")
    if args.lv_queries > args.queries or args.block > args.references[-1]:
        parser.error("--lv-queries must be <= --queries and --block <= the largest --references")
    if args.training < max(10, args.whitening_dim):
        parser.error("--training must be >= 10 (score normalisation k) and >= the whitening dimension")
    return args


# ------------------------------------------------------------------------------------------------------
# synthetic descriptors (generated once, in a process of its own, into files the phases read)


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def _ids(prefix: str, n: int) -> np.ndarray:
    width = max(5 if prefix == "Q" else 6, len(str(max(n - 1, 0))))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)])


@dataclass(frozen=True)
class Files:
    """Where the phases read their inputs."""

    root: Path
    shards: tuple[tuple[int, Path], ...]  # (references up to here, shard file), in order

    def raw(self, name: str) -> Path:
        return self.root / f"{name}.f32"

    def h5(self, name: str) -> Path:
        return self.root / f"{name}.hdf5"

    def reference_shards(self, n: int) -> list[str]:
        return [str(p) for stop, p in self.shards if stop <= n]

    @property
    def ground_truth(self) -> Path:
        return self.root / "ground_truth.csv"


class Generator:
    """Clustered unit vectors: a point of cluster c is ``centre_c + spread_c * N(0, I / d)``, normalised."""

    def __init__(self, args: Ns) -> None:
        self.rng = np.random.default_rng(args.seed)
        self.dim = args.dim
        self.centres = _normalise(self.rng.standard_normal((args.clusters, args.dim), dtype=np.float32))
        self.spreads = self.rng.uniform(0.7, 1.4, args.clusters).astype(np.float32)

    def noise(self, n: int, scale: np.ndarray | float) -> np.ndarray:
        g = self.rng.standard_normal((n, self.dim), dtype=np.float32)
        g *= np.asarray(scale, dtype=np.float32).reshape(-1, 1) / np.float32(np.sqrt(self.dim))
        return g

    def points(self, n: int) -> np.ndarray:
        c = self.rng.integers(len(self.centres), size=n)
        return _normalise(self.centres[c] + self.noise(n, self.spreads[c]))

    def near(self, x: np.ndarray, low: float, high: float) -> np.ndarray:
        """Noisy copies of ``x``: similarity 1 / sqrt(1 + t^2) for t uniform in [low, high]."""
        return _normalise(x + self.noise(len(x), self.rng.uniform(low, high, len(x))))

    def write(self, path: Path, n: int) -> None:
        """``n`` points to the raw float32 file ``path``, chunk by chunk."""
        with open(path, "wb") as f:
            for start in range(0, n, CHUNK):
                self.points(min(CHUNK, n - start)).tofile(f)


def _read(path: Path, n: int, dim: int, first: int = 0) -> np.ndarray:
    """Rows ``first:first + n`` of a raw float32 file, read into exactly one new array (no mmap, whose
    resident file pages would count in the RSS)."""
    return np.fromfile(path, dtype=np.float32, count=n * dim, offset=first * dim * 4).reshape(n, dim)


def make_data(args: Ns, root: Path) -> tuple[Files, int]:
    """Write every input; returns the files and the number of queries with a copy in the references."""
    from isc.formats.descriptor_files import write_split_descriptors
    from isc.formats.pair_csv import write_ground_truth
    from isc.formats.pairs import GroundTruth

    gen = Generator(args)
    n_ref, d = args.references[-1], args.dim
    gen.write(root / "references.f32", n_ref)
    gen.write(root / "training.f32", args.training)
    ref_ids = _ids("R", n_ref)
    shards, start = [], 0
    for i, stop in enumerate(args.references):  # shard boundaries at every reference count measured
        path = root / f"references_{i}.hdf5"
        write_split_descriptors(
            path, ref_ids[start:stop], _read(root / "references.f32", stop - start, d, start)
        )
        shards.append((stop, path))
        start = stop
    files = Files(root, tuple(shards))
    write_split_descriptors(
        files.h5("training"), _ids("T", args.training), _read(files.raw("training"), args.training, d)
    )

    # queries: copies of references among the first (smallest) reference set, the rest distractors
    n_copies = int(round(args.copies * args.queries))
    targets = gen.rng.choice(args.references[0], size=n_copies, replace=False)
    queries = gen.points(args.queries)
    slots = gen.rng.permutation(args.queries)[:n_copies]
    queries[slots] = gen.near(_read(files.raw("references"), n_ref, d)[targets], 0.3, 4.0)
    queries.tofile(files.raw("queries"))
    query_ids = _ids("Q", args.queries)
    write_split_descriptors(files.h5("queries"), query_ids, queries)
    truth = np.full(args.queries, "", dtype=ref_ids.dtype)
    truth[slots] = ref_ids[targets]
    write_ground_truth(files.ground_truth, GroundTruth(query_ids, truth))

    # the block run: views of the first queries (view 0 the original) and the 18 crops of each reference
    views = gen.near(np.repeat(queries[: args.lv_queries], args.views, axis=0), 0.5, 1.5)
    views[:: args.views] = queries[: args.lv_queries]
    views.tofile(files.raw("views"))
    block = _read(files.raw("references"), args.block, d)
    with open(files.raw("crops"), "wb") as f:
        for start in range(0, args.block, CHUNK // args.crops + 1):
            part = block[start : start + CHUNK // args.crops + 1]
            gen.near(np.repeat(part, args.crops - 1, axis=0), 0.5, 1.5).tofile(f)
    return files, n_copies


# ------------------------------------------------------------------------------------------------------
# measurement helpers (run in the phase processes)


def _peak_mb() -> float:
    """Peak resident set size of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def _current_mb() -> float:
    """Resident set size of this process now (Linux ``/proc``; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / MB
    except OSError:
        return _peak_mb()


@dataclass
class Step:
    name: str
    seconds: float  # wall clock
    cpu_s: float  # CPU time of the process (all threads)
    peak_mb: float  # peak RSS so far over the base
    held_mb: float  # RSS after the step over the base


@dataclass
class PhaseResult:
    name: str
    references: int
    queries: int
    inputs_mb: float  # descriptor bytes the phase reads (N x d x 4 of every split)
    base_mb: float  # RSS after imports and a warm-up search
    inherited_mb: float = 0.0  # ru_maxrss at the process's start (the parent's RSS at fork)
    steps: list[Step] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def cpu_s(self) -> float:
        return sum(s.cpu_s for s in self.steps)

    @property
    def peak_mb(self) -> float:
        return max(s.peak_mb for s in self.steps)

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


class Timer:
    """Records steps: wall and CPU seconds since ``start``, and the peak / current RSS after it, over the base."""

    def __init__(self, result: PhaseResult) -> None:
        self.result = result
        self.start()

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __call__(self, name: str) -> None:
        base = self.result.base_mb
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.result.steps.append(Step(name, wall, cpu, _peak_mb() - base, _current_mb() - base))


def _warm_up(result: PhaseResult, dim: int, product: bool) -> None:
    """A small search, so that the thread pool and BLAS buffers are not counted; the RSS after it is the
    phase's base. ``ru_maxrss`` of a forked process starts at its parent's RSS at fork time: the parent
    (the forkserver, which only imported) stays small, and this checks it."""
    result.inherited_mb = _peak_mb()
    rng = np.random.default_rng(1)
    q, r = (_normalise(rng.standard_normal((n, dim), dtype=np.float32)) for n in (4096, 2048))
    if product:
        from isc.evaluation.search import knn

        knn(q, r, 10)
    else:
        import faiss

        index = faiss.IndexFlatIP(dim)
        index.add(r)
        index.search(q, 10)
    result.base_mb = _current_mb()


# ------------------------------------------------------------------------------------------------------
# phases


def run_baseline(args: Ns, files: Files, n_ref: int) -> PhaseResult:
    """Raw arrays from disk, one bare IndexFlatIP: the least any exact top-k search can cost."""
    import faiss

    d = args.dim
    result = PhaseResult("baseline", n_ref, args.queries, (n_ref + args.queries) * d * 4 / MB, 0.0)
    _warm_up(result, d, product=False)
    timer = Timer(result)
    timer.start()
    queries, refs = _read(files.raw("queries"), args.queries, d), _read(files.raw("references"), n_ref, d)
    timer("read")
    timer.start()
    index = faiss.IndexFlatIP(d)
    index.add(refs)
    index.search(queries, args.k)
    timer("search")
    return result


def _settings(name: str, args: Ns):  # noqa: ANN202 - EvaluationSettings, imported in the phase process
    from isc.evaluation.settings import EvaluationSettings, ScoreNormalization, Whitening

    if name == "default":
        return EvaluationSettings(k=args.k)  # = conf/evaluation/default.yaml
    return EvaluationSettings(  # conf/experiment/d2lv_inference.yaml's global post-processing
        k=args.k,
        whitening=Whitening(enabled=True, dim=args.whitening_dim, eigen_power=-0.5),
        score_normalization=ScoreNormalization(enabled=True, beta=2.0, k=10),
        max_training=args.training,
    )


def run_product(args: Ns, files: Files, n_ref: int, config: str, with_truth: bool) -> PhaseResult:
    """What ``task=evaluate`` (``task=predict`` without ground truth) runs on ``evaluation.descriptors``."""
    from isc.evaluation.matching import match_descriptors
    from isc.formats.descriptor_files import read_descriptors, write_descriptors
    from isc.formats.pair_csv import read_ground_truth, write_predictions

    d = args.dim
    name = f"{'evaluate' if with_truth else 'predict'} {config}"
    inputs = (n_ref + args.queries + args.training) * d * 4 / MB
    result = PhaseResult(name, n_ref, args.queries, inputs, 0.0)
    _warm_up(result, d, product=True)
    settings = _settings(config, args)
    timer = Timer(result)
    out = Path(tempfile.mkdtemp(prefix="out_", dir=files.root))
    try:
        timer.start()
        source = {
            "queries": str(files.h5("queries")),
            "references": files.reference_shards(n_ref),
            "training": str(files.h5("training")),
        }
        desc = read_descriptors(source)
        truth = read_ground_truth(files.ground_truth) if with_truth else None
        timer("read")
        timer.start()
        matched = match_descriptors(
            desc.query_ids,
            desc.query,
            desc.reference_ids,
            desc.reference,
            desc.training,
            truth,
            settings,
        )
        timer("match")
        timer.start()
        write_descriptors(
            out / "descriptors.h5",
            desc.query_ids,
            matched.query,
            desc.reference_ids,
            matched.reference,
            desc.training_ids,
            matched.training,
            max_dim=settings.descriptor_track_max_dim,
        )
        timer("write descriptors")
        timer.start()
        write_predictions(out / "predictions.csv", matched.predictions, max_rows=settings.max_predictions)
        timer("write predictions")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result.info["predictions"] = len(matched.predictions)
    for label, m in (("uAP", matched.metrics), ("uAP_raw", matched.raw_metrics)):
        if m is not None and m.uAP is not None:
            result.info[label] = m.uAP
    return result


def run_block(args: Ns, files: Files) -> PhaseResult:
    """The test stage's search of one reference block with its crops (one model, one scale), then the
    aggregation of the candidate rows, with the library calls of ``isc/evaluation/inference.py``."""
    from isc.evaluation.aggregate import Candidates, aggregate_pairs, merge_topk, view_penalty
    from isc.evaluation.postprocess import PCAWhitening, l2_normalize, query_bias
    from isc.evaluation.search import knn

    d, k, b, n_q, n_v = args.dim, args.k, args.block, args.lv_queries, args.lv_queries * args.views
    inputs = (args.training + n_v + b * args.crops) * d * 4 / MB
    result = PhaseResult("test-stage block", b, n_q, inputs, 0.0)
    _warm_up(result, d, product=True)
    timer = Timer(result)

    # per model: what the test stage holds across all blocks (fitted post-processing, query views, top-k)
    timer.start()
    training = _read(files.raw("training"), args.training, d)
    whitening = PCAWhitening.fit(training, dim=args.whitening_dim, eigen_power=-0.5)

    def apply(x: np.ndarray) -> np.ndarray:  # inference._PostProcess.apply
        return np.asarray(l2_normalize(np.ascontiguousarray(whitening.transform(x), dtype=np.float32)))

    post_training = apply(training)
    views = apply(_read(files.raw("views"), n_v, d))  # _search_model frees the raw views (q.per_scale)
    bias = query_bias(views, post_training, k=10, beta=2.0)
    owner = np.repeat(np.arange(n_q), args.views)
    original = np.arange(n_q) * args.views

    def empty(n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)

    whole, crops = empty(n_v), empty(n_q)
    timer("query views")

    def knn_into(best, queries, refs, rows):  # noqa: ANN001, ANN202 - inference._knn_into
        sims, idx = knn(queries, refs, k)
        idx = np.where(idx >= 0, rows[np.maximum(idx, 0)], -1)
        return merge_topk(*best, sims, idx, k)

    # one block: its whole references searched by every view, then its crops by the original views
    timer.start()
    block_raw = _read(files.raw("references"), b, d)
    timer("read block")
    timer.start()
    ref = apply(block_raw)
    rows = np.arange(b)
    timer("post-process block")
    timer.start()
    whole = knn_into(whole, views, ref, rows)
    timer("view search")
    timer.start()
    rc = _read(files.raw("crops"), b * (args.crops - 1), d)  # _extract's 18 crops of each reference
    timer("read crops")
    timer.start()
    crop_index = np.tile(np.arange(1, args.crops, dtype=np.int64), b)
    crop_rows = b + np.arange(len(crop_index))
    ref_table = np.concatenate(
        [
            np.stack([np.arange(b), np.zeros(b, dtype=np.int64)], axis=1),
            np.stack([np.repeat(np.arange(b), args.crops - 1), crop_index], axis=1),
        ]
    ).astype(np.int32)
    both = np.concatenate([ref, apply(rc)])
    timer("post-process crops")
    timer.start()
    crops = knn_into(crops, views[original], both, np.r_[rows, crop_rows])
    timer("crop search")
    del both, rc

    # candidate rows (with the score normalisation), penalty, top-2 aggregation, the 500,000 cap
    timer.start()
    tracemalloc.start()
    held = tracemalloc.get_traced_memory()[0]
    parts = []
    crop_idx = np.where(ref_table[np.maximum(crops[1], 0), 1] > 0, crops[1], -1)
    for sims, idx, view_rows in ((whole[0], whole[1], np.arange(n_v)), (crops[0], crop_idx, original)):
        sims = sims - bias[view_rows][:, None]
        i, j = np.nonzero(idx >= 0)
        hit = idx[i, j]
        parts.append(
            Candidates(
                query=owner[view_rows[i]],
                reference=ref_table[hit, 0],
                score=sims[i, j],
                query_view=view_rows[i],
                reference_view=ref_table[hit, 1],
                scale=np.zeros(len(i), dtype=np.int64),
                model=np.zeros(len(i), dtype=np.int64),
            )
        )
    candidates = Candidates.concat(parts)
    free = np.zeros(n_v, dtype=bool)
    free[original] = True  # the original (and overlay) views are penalty-free
    penalty = view_penalty(free[candidates.query_view], candidates.reference_view, 0.05)
    pairs = aggregate_pairs(candidates.with_scores(candidates.score - penalty), top=2).top(500_000)
    traced = tracemalloc.get_traced_memory()[1] - held
    tracemalloc.stop()
    timer("aggregate")
    result.info.update(
        rows=float(len(candidates)),
        pairs=float(len(pairs)),
        aggregate_bytes_per_row=traced / max(1, len(candidates)),
        crop_hits=float(np.mean(crops[1][:, 0] >= b)),
    )
    return result


PRELOAD = (  # what the phases import, imported once by the server they fork from
    "faiss",
    "isc.evaluation.aggregate",
    "isc.evaluation.matching",
    "isc.evaluation.postprocess",
    "isc.evaluation.search",
    "isc.evaluation.settings",
    "isc.formats.descriptor_files",
    "isc.formats.pair_csv",
    "isc.formats.pairs",
)


def in_fresh_process(fn, *args):  # noqa: ANN001, ANN002, ANN201
    """Run one phase in a new process: its peak RSS owes nothing to the other phases."""
    return fresh_process.in_fresh_process(fn, *args, preload=PRELOAD)


# ------------------------------------------------------------------------------------------------------
# reporting


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``: (a, b)."""
    b, a = np.polyfit(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), 1)
    return float(a), float(b)


def print_table(results: list[PhaseResult], baselines: dict[int, PhaseResult]) -> None:
    print(
        f"\n{'phase':17s} {'refs':>7s} {'queries':>7s} {'read s':>6s} {'match s':>7s} {'write s':>7s} "
        f"{'total s':>7s} {'CPU s':>6s} {'peak MB':>7s} {'inputs MB':>9s} {'over inputs':>11s} "
        f"{'time/base':>9s} {'CPU/base':>8s} {'peak/base':>9s}  notes"
    )
    for r in results:
        names = [s.name for s in r.steps]
        read = r.step("read").seconds
        main = r.step("match" if "match" in names else "search").seconds
        write = sum(s.seconds for s in r.steps if s.name.startswith("write"))
        base = baselines[r.references]
        notes = ", ".join(
            [f"{k} {v:.4f}" if isinstance(v, float) and v < 1 else f"{k} {v:,.0f}" for k, v in r.info.items()]
            + ([r.note] if r.note else [])
        )
        print(
            f"{r.name:17s} {r.references:7,d} {r.queries:7,d} {read:6.1f} {main:7.1f} {write:7.1f} "
            f"{r.seconds:7.1f} {r.cpu_s:6.1f} {r.peak_mb:7,.0f} {r.inputs_mb:9,.0f} {r.peak_mb - r.inputs_mb:11,.0f} "
            f"{r.seconds / base.seconds:9.2f} {r.cpu_s / base.cpu_s:8.2f} {r.peak_mb / base.peak_mb:9.2f}  {notes}"
        )
    print(
        "(s: wall clock; CPU s: CPU time of the process, all threads: about 2x the wall time when it has both "
        "cores, about 1x when another job takes one; peak MB: peak RSS of the phase's process over its RSS after imports and a warm-up search, "
        "inputs included; inputs MB: N x d x 4 of every split it reads; over inputs: peak - inputs; "
        "x/base: against the baseline at the same reference count, same run)"
    )


def print_peaks_by_step(results: list[PhaseResult]) -> None:
    print("\npeak RSS after each step (MB over the base; the step that sets the phase's peak is marked *):")
    for r in results:
        top = r.peak_mb
        parts = [
            f"{s.name} {s.seconds:.1f} s ({s.cpu_s:.1f} CPU) -> {s.peak_mb:,.0f}{'*' if s.peak_mb == top and s.peak_mb > 0 else ''}"
            f" (held {s.held_mb:,.0f})"
            for s in r.steps
        ]
        print(f"  {r.name:18s} {r.references:9,d} refs: " + "; ".join(parts))


def print_extrapolation(args: Ns, series: dict[str, list[PhaseResult]]) -> None:
    n_full, q_full = args.full_references, args.full_queries
    q_scale = q_full / args.queries
    print(
        f"\nlinear fits in the number of references (at {args.queries:,} queries), evaluated at "
        f"{n_full:,} references x {q_full:,} queries:"
    )
    if q_scale != 1:
        print(
            f"  (this run measured {args.queries:,} queries: times are scaled by {q_scale:.2f} "
            "(search is linear in queries); peak RSS adds the query-side arrays (raw, normalised, whitened: "
            "3 x q x d x 4) for the missing queries)"
        )
    d4 = args.dim * 4
    extra_q = 3 * (q_full - args.queries) * d4 / MB
    full: dict[str, tuple[float, float, float]] = {}
    for name, rs in series.items():
        xs = [r.references for r in rs]
        if len(set(xs)) < 2:
            continue
        ta, tb = _fit(xs, [r.seconds for r in rs])
        ca, cb = _fit(xs, [r.cpu_s for r in rs])
        ma, mb = _fit(xs, [r.peak_mb for r in rs])
        t, cpu = (ta + tb * n_full) * q_scale, (ca + cb * n_full) * q_scale
        m = ma + mb * n_full + extra_q
        full[name] = (t, cpu, m)
        points = ", ".join(
            f"{r.references:,}: {r.seconds:.1f} s, {r.cpu_s:.1f} CPU s, {r.peak_mb:,.0f} MB" for r in rs
        )
        print(f"  {name} ({points})")
        scaled = f" (x {q_scale:.2f} queries)" if q_scale != 1 else ""
        print(
            f"    time  = {ta:.2f} s + {tb * 1e6:.1f} s per million references{scaled} -> {_duration(t)} "
            f"at {n_full:,}"
        )
        print(
            f"    CPU   = {ca:.2f} s + {cb * 1e6:.1f} s per million references{scaled} -> {_duration(cpu)} "
            f"at {n_full:,}"
        )
        print(
            f"    peak  = {ma:,.0f} MB + {mb * MB:,.0f} B per reference ({mb * MB / d4:.2f} x the "
            f"{d4:,} B descriptor){f' + {extra_q:,.0f} MB' if extra_q else ''} -> {m:,.0f} MB at {n_full:,}"
        )
    if "baseline" in full:
        t0, c0, m0 = full["baseline"]
        for name, (t, cpu, m) in full.items():
            if name != "baseline":
                print(
                    f"  {name} / baseline at {n_full:,} references: time {t / t0:.2f}x, CPU {cpu / c0:.2f}x, "
                    f"peak RSS {m / m0:.2f}x"
                )
    # where the per-reference bytes go, from the code: copies of the (N, d) float32 reference matrix alive
    # at the peak (ids and the read's concatenation come on top)
    model = {
        "baseline": "the array read + IndexFlatIP's copy (index.add) = 2",
        "evaluate d2lv": "as read + L2-normalised (kept for the raw metrics) + whitened + IndexFlatIP's copy = 4",
    }
    for name, what in model.items():
        if name in series and len(series[name]) > 1:
            slope = _fit([r.references for r in series[name]], [r.peak_mb for r in series[name]])[1]
            print(f"  {name}: {what} copies modelled, {slope * MB / d4:.2f} measured")


def print_block(args: Ns, block: PhaseResult) -> None:
    """Extrapolate the block run to D2LV's full test stage with bench_inference's cost model."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_inference import Sizes, memory_terms, print_arithmetic

    b, n_q, n_v, c = args.block, args.lv_queries, args.lv_queries * args.views, args.crops
    st = {s.name: s for s in block.steps}
    held = st["query views"].held_mb
    block_peak = max(
        st[n].peak_mb for n in ("post-process block", "view search", "post-process crops", "crop search")
    )
    per_row = block.info["aggregate_bytes_per_row"]
    print(
        f"\ntest-stage block: {n_q:,} queries x {args.views} views vs one block of {b:,} references x {c} "
        f"views, d={args.dim}, k={args.k}, D2LV post-processing (one model, one scale):"
    )
    for s in block.steps:
        print(
            f"  {s.name:20s} {s.seconds:7.2f} s ({s.cpu_s:6.2f} CPU s)   peak {s.peak_mb:8,.0f} MB   "
            f"held after {s.held_mb:8,.0f} MB"
        )
    print(
        f"  state kept across blocks (training, post-processed views, top-k): {held:,.0f} MB; "
        f"the block adds {block_peak - held:,.0f} MB at its peak "
        f"({(block_peak - held) * MB / (b * c * args.dim * 4):.2f} x its {b * c * args.dim * 4 / MB:,.0f} MB "
        f"of {c}-view descriptors); aggregation {per_row:.0f} B a candidate row (numpy traced)"
    )
    here = Sizes(n_q, args.views, b, c, args.dim, args.k, b, 1, 1)
    print_arithmetic("bench_inference.py's cost model at this block's size", here, per_row, block.peak_mb)
    modelled_block = sum(t[3] for t in memory_terms(here, per_row) if t[0] == "search" and t[2] == "block")
    full = Sizes(
        args.full_queries,
        args.full_views,
        args.full_references,
        c,
        args.dim,
        args.k,
        args.full_block,
        args.full_scales,
        args.full_models,
    )
    print_arithmetic("the same cost model at D2LV's full size", full, per_row)
    terms = memory_terms(full, per_row)
    search = sum(t[3] for t in terms if t[0] == "search")
    aggregate = sum(t[3] for t in terms if t[0] == "aggregate")
    full_block_model = sum(t[3] for t in terms if t[0] == "search" and t[2] == "block")
    measured_block = (block_peak - held) * MB * (full.block / b)
    corrected = search - full_block_model + measured_block
    print(
        f"  correction from this run: block measured {(block_peak - held):,.0f} MB here vs "
        f"{modelled_block / MB:,.0f} MB modelled -> at block {full.block:,}: {measured_block / MB:,.0f} MB "
        f"instead of {full_block_model / MB:,.0f}: search phase {corrected / MB:,.0f} MB "
        f"(aggregation phase {aggregate / MB:,.0f} MB as modelled)"
    )
    # time: searches scale with query rows x reference rows, post-processing with reference rows
    view_s, crop_s = st["view search"].seconds, st["crop search"].seconds
    post_s = st["post-process block"].seconds + st["post-process crops"].seconds
    agg_s = st["aggregate"].seconds
    cpu = {
        "view search": st["view search"].cpu_s,
        "crop search": st["crop search"].cpu_s,
        "post-process refs": st["post-process block"].cpu_s + st["post-process crops"].cpu_s,
        "aggregation": st["aggregate"].cpu_s,
    }
    view_x = (full.queries * full.views * full.scales * full.models * full.references) / (n_v * b)
    crop_x = (full.queries * full.models * full.references * c) / (n_q * b * c)
    post_x = (full.references * (full.scales + c - 1) * full.models) / (b * c)
    agg_x = (full.view_rows + full.crop_rows) / max(1.0, block.info["rows"])
    print("  time at full size, extrapolated linearly from this block (same machine, faiss CPU):")
    total = total_cpu = 0.0
    for what, seconds, x, unit in (
        ("view search", view_s, view_x, "query views x scales x models x references"),
        ("crop search", crop_s, crop_x, "queries x models x references x crops"),
        ("post-process refs", post_s, post_x, "reference rows x (scales + crops - 1) x models"),
        ("aggregation", agg_s, agg_x, "candidate rows"),
    ):
        total += seconds * x
        total_cpu += cpu[what] * x
        print(
            f"    {what:18s} {seconds:8.2f} s x {x:14,.0f} = {_duration(seconds * x):>9s} wall, "
            f"{_duration(cpu[what] * x):>9s} CPU  (ratio of {unit})"
        )
    print(
        f"    total {_duration(total)} wall ({_duration(total_cpu)} CPU) on this machine, excluding the "
        "model's forward passes"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    n_max = args.references[-1]
    print(
        f"references {', '.join(f'{n:,}' for n in args.references)} x {args.queries:,} queries x {args.dim} d "
        f"(training {args.training:,}, {args.clusters:,} clusters, {args.copies:.0%} of queries are copies), "
        f"k={args.k}; test-stage block: {args.lv_queries:,} queries x {args.views} views vs {args.block:,} "
        f"references x {args.crops} views; each phase in a process of its own"
    )
    started = time.perf_counter()
    try:
        files, n_copies = in_fresh_process(make_data, args, root)  # the parent never holds the data
        print(
            f"synthetic descriptors written to {root} in {time.perf_counter() - started:.1f} s (not counted)"
        )
        baselines: dict[int, PhaseResult] = {}
        series: dict[str, list[PhaseResult]] = {"baseline": [], "evaluate d2lv": []}
        results: list[PhaseResult] = []
        for n in args.references:
            before = in_fresh_process(run_baseline, args, files, n)
            configs = [("d2lv", True)] + ([("default", True), ("d2lv", False)] if n == n_max else [])
            products = [in_fresh_process(run_product, args, files, n, c, truth) for c, truth in configs]
            after = in_fresh_process(run_baseline, args, files, n)  # other jobs come and go: bracket them
            base = min(before, after, key=lambda r: r.seconds)
            base.note = (
                f"{before.seconds:.1f} s before, {after.seconds:.1f} s after the others: the faster kept"
            )
            baselines[n] = base
            series["baseline"].append(base)
            series["evaluate d2lv"].append(products[0])
            results += [base, *products]
            print(
                f"  {n:,} references: baseline {before.seconds:.1f} / {after.seconds:.1f} s, "
                + ", ".join(f"{r.name} {r.seconds:.1f} s" for r in products)
            )
        block = in_fresh_process(run_block, args, files)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\n{n_copies:,} of the {args.queries:,} queries copy a reference; all phases took {_duration(time.perf_counter() - started)}"
    )
    inherited = max(r.inherited_mb - r.base_mb for r in [*results, block])
    verdict = (
        "below every base: no peak is inherited" if inherited < 0 else "WARNING: a peak may be inherited"
    )
    print(
        f"(peak RSS inherited from the forkserver at fork, largest over a phase's base: {inherited:+,.0f} MB, {verdict})"
    )
    print_table(results, baselines)
    print_peaks_by_step(results)
    print_extrapolation(args, series)
    print_block(args, block)


if __name__ == "__main__":
    main()
