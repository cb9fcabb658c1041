"""D2LV's test stage: multi-scale descriptors, local verification and ensembles, scored stage by stage.

One global descriptor per image misses the copies a model cannot see whole: a small crop, an image pasted
into a larger picture, a rotated screenshot. D2LV (ISC2021 winner) therefore describes every query by many
*views* (the original, rotations, five crops, selective-search proposals, detected overlays) and every
reference optionally by 19 crops, at several scales and with several models, and combines the view scores
(:mod:`isc.evaluation.aggregate`). This module runs that with the same post-processing as the global
path (PCA-whitening fitted on training descriptors of each scale, score normalisation against them), and
measures each stage on the same extraction: ``global`` (first model, first scale, original views), ``+
multi-scale``, ``+ local verification`` (query views), ``+ reference crops``, ``+ ensemble``.

Memory: per model, the post-processed query views (n_query_views x scales x dim floats) and the training
descriptors stay in memory; references are extracted and searched ``reference_block`` images at a time,
each query view keeping its running top-k, so the reference set (19 crops each) never has to fit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from isc.data.images import load_image
from isc.evaluation.aggregate import (
    Candidates,
    PairScores,
    aggregate_pairs,
    keep_voted,
    mean_over_models,
    merge_topk,
    view_penalty,
)
from isc.evaluation.extract import eval_transform, resolve_device
from isc.evaluation.matches import GroundTruth, Predictions
from isc.evaluation.metrics import Metrics, evaluate
from isc.evaluation.pipeline import Ensemble, EvaluationSettings
from isc.evaluation.postprocess import PCAWhitening, l2_normalize, query_bias
from isc.evaluation.search import knn
from isc.evaluation.shards import cached_arrays, listing_fingerprint, model_fingerprint, stable_repr
from isc.evaluation.views import View, apply_view, query_views, reference_views

__all__ = ["ConcatModel", "StageOutcome", "TestStageResult", "run_test_stage"]

log = logging.getLogger(__name__)

ViewsOf = Callable[[Image.Image], list[View]]


class ConcatModel(nn.Module):
    """Several descriptor models as one: their unit descriptors concatenated (and re-normalised).

    The ensemble's ``concat`` rule; PCA-whitening to ``ensemble.concat_dim`` then mixes the models.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.dim = int(sum(int(m.dim) for m in models))  # type: ignore[misc, arg-type]
        self.image_size = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.cat([F.normalize(m(images), dim=-1) for m in self.models], dim=1), dim=-1)


class _ViewImages(Dataset):
    """Each image's views resized to every scale: ``([tensor (n_views, 3, s, s) per scale], views, size, index)``."""

    def __init__(
        self, paths: Sequence[Path], scales: Sequence[int], views_of: ViewsOf | Sequence[list[View]]
    ) -> None:
        self.paths, self.views_of = list(paths), views_of
        self.transforms = [eval_transform(s) for s in scales]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], list[View], tuple[int, int], float, int]:
        image = load_image(self.paths[index])
        started = time.perf_counter()
        views = self.views_of(image) if callable(self.views_of) else self.views_of[index]
        view_seconds = time.perf_counter() - started if callable(self.views_of) else 0.0
        crops = [apply_view(image, v) for v in views]
        tensors = [torch.stack([t(c) for c in crops]) for t in self.transforms]
        return tensors, views, image.size, view_seconds, index


def _collate(
    batch: list,
) -> tuple[list[torch.Tensor], list[list[View]], list[tuple[int, int]], float, list[int]]:
    n_scales = len(batch[0][0])
    tensors = [torch.cat([b[0][s] for b in batch]) for s in range(n_scales)]
    return (
        tensors,
        [b[1] for b in batch],
        [b[2] for b in batch],
        sum(b[3] for b in batch),
        [b[4] for b in batch],
    )


@dataclass
class _Extracted:
    """Descriptors of every view of every image: per scale (n_views_total, d); ``owner`` (n_views_total,)."""

    per_scale: list[np.ndarray]
    views: list[list[View]]
    sizes: list[tuple[int, int]]
    owner: np.ndarray
    model_seconds: np.ndarray  # (n_scales,) forward seconds per scale
    view_seconds: float


@dataclass(frozen=True)
class _Cache:
    """Where one model's test-stage extractions go (``evaluation.cache_dir``), so a killed run resumes."""

    directory: Path
    model_key: str  # isc.evaluation.shards.model_fingerprint of the model


def _views_key(views_of: ViewsOf | Sequence[list[View]]) -> str:
    """What decides the views: the function and its settings, or the precomputed views themselves."""
    if callable(views_of):
        return stable_repr(views_of)
    return hashlib.sha256(
        repr([[dataclasses.astuple(v) for v in vs] for vs in views_of]).encode()
    ).hexdigest()


def _pack(e: _Extracted) -> dict[str, np.ndarray]:
    flat = [v for vs in e.views for v in vs]
    return {
        **{f"scale{i}": x for i, x in enumerate(e.per_scale)},
        "view_kind": np.array([v.kind for v in flat], dtype="S16"),
        "view_box": np.array([v.box for v in flat], dtype=np.int64).reshape(-1, 4),
        "view_rotation": np.array([v.rotation for v in flat], dtype=np.int64),
        "views_per_image": np.array([len(vs) for vs in e.views], dtype=np.int64),
        "sizes": np.array(e.sizes, dtype=np.int64).reshape(-1, 2),
        "owner": e.owner,
        "model_seconds": e.model_seconds,
        "view_seconds": np.array(e.view_seconds),
    }


def _unpack(a: Mapping[str, np.ndarray]) -> _Extracted:
    flat = [
        View(kind.decode(), tuple(int(c) for c in box), int(rot))  # type: ignore[arg-type]
        for kind, box, rot in zip(a["view_kind"], a["view_box"], a["view_rotation"], strict=True)
    ]
    ends = np.cumsum(a["views_per_image"])
    views = [flat[end - n : end] for n, end in zip(a["views_per_image"], ends, strict=True)]
    return _Extracted(
        [a[f"scale{i}"] for i in range(len(a["model_seconds"]))],
        views,
        [(int(w), int(h)) for w, h in a["sizes"]],
        a["owner"],
        a["model_seconds"],
        float(a["view_seconds"]),
    )


def _extract(
    model: nn.Module,
    paths: Sequence[Path],
    scales: Sequence[int],
    views_of: ViewsOf | Sequence[list[View]],
    settings: EvaluationSettings,
    views_per_image: int,
    desc: str,
    cache: _Cache | None = None,
    name: str = "",
) -> _Extracted:
    """Every view of every image at every scale; through ``cache`` when given (read back if it matches)."""
    compute = functools.partial(_extract_now, model, paths, scales, views_of, settings, views_per_image, desc)
    if cache is None:
        return compute()
    key = {
        "format": "isc-test-stage-v1",
        "model": cache.model_key,
        "images": listing_fingerprint(paths, image_size=None),
        "settings": json.dumps(
            {
                "scales": list(scales),
                "views": _views_key(views_of),
                "batch_size": settings.batch_size,
                "views_per_image": views_per_image,
                "device": str(resolve_device(settings.device).type),
                "torch": torch.__version__,
            },
            sort_keys=True,
        ),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = cache.directory / cache.model_key[:16] / f"{name}-{digest}.h5"
    return _unpack(cached_arrays(path, key, lambda: _pack(compute())))


@torch.no_grad()
def _extract_now(
    model: nn.Module,
    paths: Sequence[Path],
    scales: Sequence[int],
    views_of: ViewsOf | Sequence[list[View]],
    settings: EvaluationSettings,
    views_per_image: int,
    desc: str,
) -> _Extracted:
    device = resolve_device(settings.device)
    model = model.to(device).eval()
    dataset = _ViewImages(paths, scales, views_of)
    loader = DataLoader(
        dataset,
        batch_size=max(1, settings.batch_size // views_per_image),
        num_workers=min(settings.num_workers, os.cpu_count() or 1),
        collate_fn=_collate,
    )
    per_scale: list[list[np.ndarray]] = [[] for _ in scales]
    views: list[list[View]] = []
    sizes: list[tuple[int, int]] = []
    owner: list[np.ndarray] = []
    model_seconds = np.zeros(len(scales))
    view_seconds = 0.0
    for tensors, batch_views, batch_sizes, vs, indices in tqdm(loader, desc=desc, unit="batch", leave=False):
        for s, x in enumerate(tensors):
            started = time.perf_counter()
            out = model(x.to(device)).float().cpu().numpy()
            model_seconds[s] += time.perf_counter() - started
            if not np.isfinite(out).all():
                raise ValueError(f"non-finite descriptor in a batch starting at image {paths[indices[0]]}")
            if not out.any(axis=1).all():
                raise ValueError(
                    f"all-zero descriptor in a batch starting at image {paths[indices[0]]}: it would match "
                    "nothing (a collapsed model, or views too small for the backbone?)"
                )
            per_scale[s].append(out)
        views += batch_views
        sizes += batch_sizes
        owner += [np.full(len(v), i, dtype=np.int64) for v, i in zip(batch_views, indices, strict=True)]
        view_seconds += vs
    return _Extracted(
        [np.concatenate(p) for p in per_scale],
        views,
        sizes,
        np.concatenate(owner),
        model_seconds,
        view_seconds,
    )


def _entries(per_scale: list[np.ndarray], multiscale: str) -> list[np.ndarray]:
    """The descriptor sets searched separately: entry 0 is the first scale alone (the global stage);
    then the mean over scales (``mean``) or every other scale (``max``)."""
    if len(per_scale) == 1:
        return per_scale
    if multiscale == "mean":
        mean = sum(np.asarray(l2_normalize(x), dtype=np.float64) for x in per_scale)
        return [per_scale[0], np.asarray(l2_normalize(np.asarray(mean, dtype=np.float32)))]
    return per_scale


@dataclass
class _PostProcess:
    """Whitening and score-normalisation state of one descriptor entry (fitted on training)."""

    whitening: PCAWhitening | None
    training: np.ndarray | None

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = self.whitening.transform(x) if self.whitening is not None else x
        return np.asarray(l2_normalize(np.ascontiguousarray(x, dtype=np.float32)))

    @classmethod
    def fit(cls, training: np.ndarray | None, settings: EvaluationSettings) -> _PostProcess:
        whitening = None
        if settings.whitening_dim and training is not None:
            if settings.whitening_dim > training.shape[1]:
                raise ValueError(
                    f"evaluation.whitening.dim={settings.whitening_dim} exceeds the descriptor's "
                    f"{training.shape[1]} dims"
                )
            whitening = PCAWhitening.fit(
                training, dim=settings.whitening_dim, eigen_power=settings.whitening.eigen_power
            )
        pp = cls(whitening, None)
        if training is not None:
            pp.training = pp.apply(training)
        return pp


@dataclass
class StageOutcome:
    """One row of the per-stage table: what the stage adds, its predictions and metrics."""

    name: str
    predictions: Predictions
    metrics: Metrics | None
    seconds_per_query: float
    pairs: PairScores = field(repr=False)


@dataclass
class TestStageResult:
    """Every stage's outcome (the last is final), and what the report needs to show where a copy is."""

    stages: list[StageOutcome]
    candidates: Candidates = field(repr=False)
    query_views: list[View] = field(repr=False)  # flat, indexed by Candidates.query_view
    reference_sizes: list[tuple[int, int]] = field(repr=False)
    query_descriptors: np.ndarray = field(repr=False)  # global stage, post-processed, one per query
    reference_descriptors: np.ndarray = field(repr=False)
    training_descriptors: np.ndarray | None = field(repr=False)
    scale_names: list[str] = field(default_factory=list)

    @property
    def final(self) -> StageOutcome:
        return self.stages[-1]

    def evidence(self, stage: StageOutcome | None = None) -> dict[tuple[str, str], tuple[View, View, str]]:
        """For each predicted pair: the query view and reference view of its best row, and a label."""
        stage = stage or self.final
        out: dict[tuple[str, str], tuple[View, View, str]] = {}
        p, c = stage.pairs, self.candidates
        for i in range(len(p)):
            row = int(p.row[i])
            qv = self.query_views[int(c.query_view[row])]
            w, h = self.reference_sizes[int(c.reference[row])]
            crop = int(c.reference_view[row])  # most winners are whole references: skip the 19 boxes
            rv = reference_views(w, h, crops=True)[crop] if crop else View("original", (0, 0, w, h))
            label = f"{qv.kind} view, {self.scale_names[int(c.scale[row])]}, model {int(c.model[row])}"
            key = (str(stage.predictions.query_ids[i]), str(stage.predictions.reference_ids[i]))
            out[key] = (qv, rv, label)
        return out


def _original(image: Image.Image) -> list[View]:
    return [View("original", (0, 0, image.width, image.height))]


def _reference_crops(image: Image.Image) -> list[View]:
    """D2LV's 18 reference crops (index 0, the whole image, is searched with every scale)."""
    return reference_views(image.width, image.height, crops=True)[1:]


def run_test_stage(
    models: Sequence[nn.Module],
    paths: Mapping[str, Sequence[Path]],
    ids: Mapping[str, Sequence[str]],
    settings: EvaluationSettings,
    ground_truth: GroundTruth | None = None,
    cache_dir: Path | None = None,
) -> TestStageResult:
    """Score queries against references with every configured step; see the module docstring.

    ``cache_dir``: every extraction (training, query views, each reference block and its crops, per
    model) is kept there as it finishes, and a rerun with the same models, settings and images reads
    it back instead: a killed run resumes where it stopped, to the same predictions and descriptors.

    ``paths`` / ``ids``: ``queries``, ``references`` and optionally ``training`` (already filtered of bad
    images). ``models``: one model, or the ensemble's (already combined into one :class:`ConcatModel` by
    the caller when ``ensemble.rule == "concat"``).
    """
    s = settings.for_training_set(len(paths.get("training", ())))
    scales = list(s.scales or [s.image_size])
    if len(paths["queries"]) == 0 or len(paths["references"]) == 0:
        raise ValueError("the test stage needs at least one query and one reference image")
    if len(scales) == 1:
        names = [f"{scales[0]} px"]
    elif s.multiscale == "mean":
        names = [f"{scales[0]} px", "mean of " + "/".join(map(str, scales)) + " px"]
    else:
        names = [f"{x} px" for x in scales]
    expansion = s.local_verification.query if s.local_verification.enabled else None
    views_of: ViewsOf | Sequence[list[View]] = (
        functools.partial(query_views, expansion=expansion) if expansion is not None else _original
    )
    parts: list[Candidates] = []
    forward_seconds = np.zeros((len(models), len(names)))
    view_seconds = 0.0
    searched: _Searched | None = None
    for m, model in enumerate(models):
        tag = f"model {m + 1}/{len(models)}: " if len(models) > 1 else ""
        cache = (
            None if cache_dir is None else _Cache(Path(cache_dir) / "test-stage", model_fingerprint(model))
        )
        one = _search_model(model, m, paths, scales, views_of, s, tag, cache)
        parts += one.candidates
        forward_seconds[m] = one.forward_seconds
        if searched is None:  # views are a function of the image: compute them once, reuse them
            searched, view_seconds = one, one.view_seconds
            views_of = one.views
    assert searched is not None
    flat_views = [v for views in searched.views for v in views]
    result = TestStageResult(
        [],
        Candidates.concat(parts),
        flat_views,
        searched.reference_sizes,
        searched.global_query,
        searched.global_reference,
        searched.global_training,
        names,
    )
    result.stages = _stages(result, s, ids, ground_truth, forward_seconds, view_seconds)
    return result


@dataclass
class _Searched:
    """What one model's pass produced: candidate rows, the views it used, timings, global descriptors."""

    candidates: list[Candidates]
    views: list[list[View]]
    reference_sizes: list[tuple[int, int]]
    forward_seconds: np.ndarray
    view_seconds: float
    global_query: np.ndarray
    global_reference: np.ndarray
    global_training: np.ndarray | None


def _knn_into(
    best: tuple[np.ndarray, np.ndarray],
    queries: np.ndarray,
    refs: np.ndarray,
    rows: np.ndarray,
    s: EvaluationSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``refs`` (whose global row numbers are ``rows``) and merge into the running top-k ``best``."""
    sims, idx = knn(queries, refs, s.k, backend=s.search_backend, device=s.resolved_device)
    idx = np.where(idx >= 0, rows[np.maximum(idx, 0)], -1)
    return merge_topk(*best, sims, idx, s.k)


def _search_model(
    model: nn.Module,
    m: int,
    paths: Mapping[str, Sequence[Path]],
    scales: list[int],
    views_of: ViewsOf | Sequence[list[View]],
    s: EvaluationSettings,
    tag: str,
    cache: _Cache | None = None,
) -> _Searched:
    """One model: training -> post-processing per entry -> query views -> references block by block."""
    lv = s.local_verification
    training = None
    if len(paths.get("training", ())):
        training = _entries(
            _extract(
                model, paths["training"], scales, _original, s, 1, f"{tag}training", cache, "training"
            ).per_scale,
            s.multiscale,
        )
    per_image = 1 if views_of is _original else 20
    q = _extract(model, paths["queries"], scales, views_of, s, per_image, f"{tag}queries", cache, "queries")
    q_entries = _entries(q.per_scale, s.multiscale)
    post = [_PostProcess.fit(training[e] if training else None, s) for e in range(len(q_entries))]
    queries = [pp.apply(x) for pp, x in zip(post, q_entries, strict=True)]
    n_entries = len(q_entries)
    del q_entries
    q.per_scale = []  # raw views are not needed past post-processing: free them before the reference loop
    biases = [
        query_bias(
            x, pp.training, k=s.score_normalization.k, beta=s.score_norm_beta, backend=s.search_backend
        )
        if s.score_norm_beta and pp.training is not None
        else None
        for pp, x in zip(post, queries, strict=True)
    ]
    t = q.model_seconds  # forward seconds per scale; a mean entry costs every scale
    forward = np.r_[t[0], t.sum()] if n_entries == 2 and s.multiscale == "mean" else t[:n_entries]
    original = np.flatnonzero([v.kind == "original" for views in q.views for v in views])
    n_views = len(q.owner)

    def empty(n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((n, s.k), -np.inf, np.float32), np.full((n, s.k), -1, np.int64)

    whole = [empty(n_views) for _ in queries]
    crops = empty(len(original))
    ref_paths = list(paths["references"])
    ref_tables: list[np.ndarray] = []  # (image, crop index) of every reference row searched
    sizes: list[tuple[int, int]] = []
    global_refs: list[np.ndarray] = []
    n_ref_views = 0
    for start in range(0, len(ref_paths), s.reference_block):
        block = ref_paths[start : start + s.reference_block]
        where = f"{tag}references {start}-{start + len(block)} of {len(ref_paths)}"
        r = _extract(model, block, scales, _original, s, 1, where, cache, f"references-{start:09d}")
        sizes += r.sizes
        rows = n_ref_views + np.arange(len(block))
        ref_tables.append(np.stack([r.owner + start, np.zeros(len(block), dtype=np.int64)], axis=1))
        n_ref_views += len(block)
        for e, (pp, x) in enumerate(zip(post, _entries(r.per_scale, s.multiscale), strict=True)):
            ref = pp.apply(x)
            if e == 0:
                global_refs.append(ref)
            whole[e] = _knn_into(whole[e], queries[e], ref, rows, s)
        if lv.reference_crops:
            # D2LV matches the original query against the 19 crops at its first scale only (Test/README.md:
            # "OQ+AR should NOT be repeated" at 200 / 320 px)
            rc = _extract(
                model,
                block,
                scales[:1],
                _reference_crops,
                s,
                18,
                f"{where}: 18 crops each",
                cache,
                f"references-{start:09d}-crops",
            )
            crop_index = np.concatenate([np.arange(1, len(v) + 1) for v in rc.views])
            crop_rows = n_ref_views + np.arange(len(crop_index))
            ref_tables.append(np.stack([rc.owner + start, crop_index], axis=1))
            n_ref_views += len(crop_index)
            ref = np.concatenate([global_refs[-1], post[0].apply(rc.per_scale[0])])
            crops = _knn_into(crops, queries[0][original], ref, np.r_[rows, crop_rows], s)
    ref_table = np.concatenate(ref_tables).astype(np.int32)  # (n_reference_views, 2): image, crop index
    searches = [(e, sims, idx, np.arange(n_views)) for e, (sims, idx) in enumerate(whole)]
    if lv.reference_crops:
        # whole references found here are already in the first search: keep the crops' rows only
        sims, idx = crops
        searches.append((0, sims, np.where(ref_table[np.maximum(idx, 0), 1] > 0, idx, -1), original))
    candidates = []
    for e, sims, idx, view_rows in searches:
        bias = biases[e]
        if bias is not None:
            sims = sims - bias[view_rows][:, None]
        i, j = np.nonzero(idx >= 0)
        hit = idx[i, j]
        candidates.append(
            Candidates(
                query=q.owner[view_rows[i]],
                reference=ref_table[hit, 0],
                score=sims[i, j],
                query_view=view_rows[i],
                reference_view=ref_table[hit, 1],
                scale=np.full(len(i), e),
                model=np.full(len(i), m),
            )
        )
    return _Searched(
        candidates,
        q.views,
        sizes,
        forward,
        q.view_seconds,
        queries[0][original],
        np.concatenate(global_refs),
        post[0].training,
    )


def _stages(
    result: TestStageResult,
    s: EvaluationSettings,
    ids: Mapping[str, Sequence[str]],
    ground_truth: GroundTruth | None,
    forward_seconds: np.ndarray,
    view_seconds: float,
) -> list[StageOutcome]:
    """Cumulative stages over the same candidate rows: each adds one step to the previous one.

    ``forward_seconds`` (n_models, n_entries): model time spent on the query views of each descriptor
    entry; a stage is charged the share of the views it uses (plus the view computation once it uses
    query views), divided by the number of queries.
    """
    c, lv, e = result.candidates, s.local_verification, s.ensemble
    is_original = np.array([v.kind == "original" for v in result.query_views])
    original = is_original[c.query_view]
    whole = c.reference_view == 0
    n_entries = len(result.scale_names)
    n_models = forward_seconds.shape[0]
    view_share = float(np.mean(is_original))
    if n_entries == 1:
        entries = [0]
    elif s.multiscale == "mean":
        entries = [1]
    else:
        entries = list(range(n_entries))
    multi = np.isin(c.scale, entries)

    def seconds(models: int, entry_ids: list[int], share: float, local: bool) -> float:
        spent = forward_seconds[:models, entry_ids].sum() * share + (view_seconds if local else 0.0)
        return float(spent) / max(1, len(ids["queries"]))

    # (name, rows without the model condition, local rows penalised / top-k, seconds per query)
    steps = [("global", (c.scale == 0) & original & whole, False, seconds(1, [0], view_share, False))]
    if n_entries > 1:
        steps.append(
            ("+ multi-scale", multi & original & whole, False, seconds(1, entries, view_share, False))
        )
    rows, local = steps[-1][1], False
    if lv.enabled:
        rows, local = multi & whole, True
        steps.append(("+ local verification", rows, local, seconds(1, entries, 1.0, True)))
    if lv.reference_crops:
        rows, local = rows | (original & ~whole), True  # crops are searched at the first scale only
        steps.append(("+ reference crops", rows, local, steps[-1][3]))
    first_model = c.model == 0
    outcomes = [
        _score(name, rows & first_model, local, result, s, ids, ground_truth, t)
        for name, rows, local, t in steps
    ]
    if n_models > 1:
        t = seconds(n_models, entries, 1.0 if lv.enabled else view_share, lv.enabled)
        outcomes.append(_score("+ ensemble", rows, local, result, s, ids, ground_truth, t, ensemble=e))
    return outcomes


def _score(
    name: str,
    rows: np.ndarray,
    local: bool,
    result: TestStageResult,
    s: EvaluationSettings,
    ids: Mapping[str, Sequence[str]],
    ground_truth: GroundTruth | None,
    seconds_per_query: float,
    ensemble: Ensemble | None = None,
) -> StageOutcome:
    """Penalise, vote (ensembles), aggregate and cap the selected rows, then score them."""
    c, lv = result.candidates, s.local_verification
    index = np.flatnonzero(rows)
    subset = c.take(index)
    if local:
        free = np.array([v.kind in lv.penalty_free for v in result.query_views])  # per view, not per row
        penalty = view_penalty(free[subset.query_view], subset.reference_view, lv.penalty)
        subset = subset.with_scores(subset.score - penalty)
    if ensemble is not None and ensemble.rule == "vote":
        keep = keep_voted(subset, ensemble.min_votes, on=ensemble.vote_on)  # type: ignore[arg-type]
        index, subset = index[keep], subset.take(keep)
        if ensemble.combine == "mean":
            subset, representative = mean_over_models(subset, on=ensemble.vote_on)  # type: ignore[arg-type]
            index = index[representative]
    pairs = aggregate_pairs(subset, top=lv.top if local else 1).top(s.max_predictions)
    pairs = dataclasses.replace(pairs, row=index[pairs.row])
    q_ids, r_ids = np.asarray(ids["queries"]), np.asarray(ids["references"])
    predictions = Predictions(q_ids[pairs.query], r_ids[pairs.reference], pairs.score)
    metrics = evaluate(ground_truth, predictions) if ground_truth is not None else None
    return StageOutcome(name, predictions, metrics, seconds_per_query, pairs)
