"""D2LV's test stage: multi-scale descriptors, local verification and ensembles, scored stage by stage.

One global descriptor per image misses the copies a model cannot see whole: a small crop, an image pasted
into a larger picture, a rotated screenshot. D2LV (ISC2021 winner) therefore describes every query by many
*views* (the original, rotations, five crops, selective-search proposals, detected overlays) and every
reference optionally by 19 crops, at several scales and with several models, and combines the view scores
(:mod:`isc.evaluation.aggregate`). This module runs that with the same post-processing as the global
path (PCA-whitening fitted on training descriptors of each scale, score normalisation against them), and
measures each stage on the same extraction: ``global`` (first model, first scale, original views), ``+
multi-scale``, ``+ local verification`` (query views), ``+ reference crops``, ``+ ensemble``.

Memory: per model, the post-processed query views (n_query_views x scales x dim floats) stay in memory;
the training set (score normalisation's, D2LV: about 1M images) and the references are extracted and
searched ``reference_block`` images at a time, each query view keeping its running top-k, so neither (nor
the references' 19 crops each) has to fit; the whitening is fitted on a sample of the training set
(``evaluation.whitening.samples``). The candidate rows are aggregated ``query_block`` queries at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from isc.evaluation.aggregate import (
    Candidates,
    PairScores,
    aggregate_pairs,
    keep_voted,
    mean_over_models,
    view_penalty,
)
from isc.evaluation.blocked import empty_topk, knn_into, searcher
from isc.evaluation.extract import Listing, ViewDescriptors, ViewsOf, whole_image
from isc.evaluation.faces import FaceSettings, detect_faces
from isc.evaluation.matching import fit_postprocessing
from isc.evaluation.metrics import evaluate
from isc.evaluation.postprocess import PostProcessing, bias_of_neighbours, l2_normalize
from isc.evaluation.results import EvaluationResult, Evidence, StageResult
from isc.evaluation.settings import Ensemble, EvaluationSettings
from isc.evaluation.views import View, query_views, reference_views, small_views
from isc.formats.pairs import GroundTruth, Predictions

__all__ = ["ConcatModel", "TestStageRows", "run_test_stage", "share_test_stage"]

log = logging.getLogger(__name__)

_SPLITS = ("queries", "references", "training")


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
class _Scored:
    """A stage's result and the aggregated pairs behind it (their best rows, for the evidence)."""

    stage: StageResult
    pairs: PairScores


@dataclass
class TestStageRows:
    """Every model's candidate rows, and what a row's indices point into (views, sizes, scale names).

    Kept on the result (``EvaluationResult.rows``) for the report's evidence and for inspection.
    """

    candidates: Candidates
    query_views: list[View]  # flat, indexed by Candidates.query_view
    reference_sizes: list[tuple[int, int]]
    scale_names: list[str]

    def evidence(self, scored: _Scored) -> dict[tuple[str, str], Evidence]:
        """For each predicted pair: the boxes of the query and reference views of its best row, and a label.

        Boxes only where a part of the image won: the whole frame needs none.
        """
        out: dict[tuple[str, str], Evidence] = {}
        p, c, predictions = scored.pairs, self.candidates, scored.stage.predictions
        for i in range(len(p)):
            row = int(p.row[i])
            qv = self.query_views[int(c.query_view[row])]
            w, h = self.reference_sizes[int(c.reference[row])]
            crop = int(c.reference_view[row]) - 1  # -1: the views' search; 0: the crop search's whole image
            rv = reference_views(w, h, crops=True)[crop] if crop > 0 else None  # most win whole: no 19 boxes
            where = "" if crop < 0 else f", reference crop {crop}"
            label = f"{qv.kind} view{where}, {self.scale_names[int(c.scale[row])]}, model {int(c.model[row])}"
            key = (str(predictions.query_ids[i]), str(predictions.reference_ids[i]))
            out[key] = Evidence(
                None if qv.kind == "original" else qv.box, None if rv is None else rv.box, label
            )
        return out


@dataclass(frozen=True)
class ReferenceCrops:
    """D2LV's 18 reference crops (index 0, the whole image, is searched with every scale), then, with
    ``faces.enabled``, one ``"face"`` view per face found on the reference (:mod:`isc.evaluation.faces`).

    The face views only mark the reference: they are not searched, and the crop search's rows of a marked
    reference are dropped after the search (seed ``Test/final/combine.py:47-48``). Detecting here, where
    the DataLoader worker has the reference open for its crops, costs no second decode, and the marks are
    cached with the crops' shards.
    """

    faces: FaceSettings = FaceSettings()

    def __call__(self, image: Image.Image) -> list[View]:
        crops = reference_views(image.width, image.height, crops=True)[1:]
        if not self.faces.enabled:
            return crops
        found = detect_faces(image, self.faces)
        return crops + [View("face", (int(x0), int(y0), int(x1), int(y1))) for x0, y0, x1, y1 in found]


def run_test_stage(
    models: Sequence[nn.Module],
    paths: Mapping[str, Sequence[Path]],
    ids: Mapping[str, Sequence[str]],
    settings: EvaluationSettings,
    ground_truth: GroundTruth | None = None,
    cache_dir: Path | None = None,
) -> EvaluationResult:
    """Score queries against references with every configured step; see the module docstring.

    ``cache_dir``: every extraction (training, query views, each reference block and its crops, per
    model) goes through the extraction engine's shard cache there, so a rerun with the same models,
    settings and images reads it back: a killed run resumes where it stopped, to the same outputs.

    ``paths`` / ``ids``: ``queries``, ``references`` and optionally ``training`` (already screened).
    ``models``: one model, or the ensemble's (already combined into one :class:`ConcatModel` by the
    caller when ``ensemble.rule == "concat"``). ``settings`` are resolved for the training set.
    """
    s = settings
    scales = list(s.scales or [s.image_size])
    if len(paths["queries"]) == 0 or len(paths["references"]) == 0:
        raise ValueError("the test stage needs at least one query and one reference image")
    if len(scales) == 1:
        names = [f"{scales[0]} px"]
    elif s.multiscale == "mean":
        names = [f"{scales[0]} px", "mean of " + "/".join(map(str, scales)) + " px"]
    else:
        names = [f"{x} px" for x in scales]
    views: ViewsOf | Sequence[list[View]] = _query_views(s)
    parts: list[Candidates] = []
    forward_seconds = np.zeros((len(models), len(names)))
    crop_seconds = np.zeros(len(models))
    view_seconds = 0.0
    first: _ModelPass | None = None
    for m, model in enumerate(models):
        tag = _tag(m, len(models), s)
        one = _search_model(model, m, paths, scales, views, s, tag, cache_dir)
        parts += one.candidates
        forward_seconds[m], crop_seconds[m] = one.forward_seconds, one.crop_seconds
        if first is None:  # views are a function of the image: compute them once, reuse them
            first, view_seconds = one, one.view_seconds
            views = one.views
    assert first is not None
    searched = TestStageRows(
        Candidates.concat(parts), [v for vs in first.views for v in vs], first.reference_sizes, names
    )
    scored = _stages(searched, s, ids, ground_truth, forward_seconds, view_seconds, crop_seconds)
    post = " + ".join([s.describe()] + [x.stage.name.removeprefix("+ ") for x in scored[1:]])
    q_ids, r_ids = np.asarray(ids["queries"]), np.asarray(ids["references"])
    return EvaluationResult(
        [x.stage for x in scored],
        post,
        q_ids,
        first.global_query,
        r_ids,
        first.global_reference,
        np.asarray(ids["training"]) if first.global_training is not None else None,
        first.global_training,
        evidence=searched.evidence(scored[-1]) if ground_truth is not None else None,
        rows=searched,
    )


def _query_views(s: EvaluationSettings) -> ViewsOf:
    config = s.local_verification.query if s.local_verification.enabled else None
    return functools.partial(query_views, config=config) if config is not None else whole_image


def share_test_stage(
    models: Sequence[nn.Module],
    paths: Mapping[str, Sequence[Path]],
    settings: EvaluationSettings,
    cache_dir: Path,
    rank: int,
    world: int,
    sync: Callable[[], None],
) -> None:
    """Process ``rank`` of ``world``'s share of every extraction :func:`run_test_stage` will make with
    these arguments, into ``cache_dir``; it then reads them all back. ``sync`` waits for every process
    (and raises when one failed): a second model takes the first one's query views, read back whole."""
    s = settings
    scales = list(s.scales or [s.image_size])
    views: ViewsOf | Sequence[list[View]] = _query_views(s)
    for m, model in enumerate(models):
        plan = _Plan.of(paths, scales, views, s, _tag(m, len(models), s), m)
        for listing in plan.listings():
            listing.extract_share(model, rank=rank, world=world, **s.engine(cache_dir))
        if m + 1 < len(models) and callable(views):  # views found per image: the first model's, read back
            sync()
            views = plan.queries.extract(model, **s.engine(cache_dir)).views


def _tag(m: int, n_models: int, s: EvaluationSettings) -> str:
    """The progress bars' prefix: which model (and family) is extracting."""
    if n_models == 1:
        return ""
    family = s.ensemble.family(m)
    return f"model {m + 1}/{n_models}{'' if family is None else f' ({family.name})'}: "


@dataclass(frozen=True)
class _Block:
    start: int
    whole: Listing
    crops: Listing | None


@dataclass(frozen=True)
class _Plan:
    """What one model's pass extracts: the whitening's training sample (when the training set spans
    several blocks), the query views, the training set and the references, ``evaluation.reference_block``
    images at a time (references with their 18 crops when configured). Model ``m``'s family (if any)
    decides how its images are changed first; only the first family searches the reference crops, as
    only the seed's baseline trio does (``Test/final/V5_baseline_CC_ref/``)."""

    whitening: Listing | None
    training: list[Listing]
    queries: Listing
    blocks: list[_Block]
    crops: bool

    @classmethod
    def of(
        cls,
        paths: Mapping[str, Sequence[Path]],
        scales: list[int],
        views: ViewsOf | Sequence[list[View]],
        s: EvaluationSettings,
        tag: str,
        m: int = 0,
    ) -> _Plan:
        family = s.ensemble.family(m)
        prep = {split: None if family is None else family.prep(split) for split in _SPLITS}
        with_crops = s.local_verification.reference_crops and (
            family is None or family == s.ensemble.families[0]
        )
        train, size = list(paths.get("training", ())), s.reference_block
        training = [
            Listing(
                train[start : start + size],
                scales,
                name=f"training-{start:09d}",
                desc=f"{tag}training {start}-{start + len(train[start : start + size])} of {len(train)}",
                prepare=prep["training"],
            )
            for start in range(0, len(train), size)
        ]
        whitening = None
        if len(training) > 1 and s.whitening.enabled:  # one block holds its own sample
            rows = s.whitening_sample(len(train))
            sample = train if rows is None else [train[i] for i in rows]
            whitening = Listing(
                sample,
                scales,
                name="training-whitening",
                desc=f"{tag}training: the whitening's {len(sample)}",
                prepare=prep["training"],
            )
        per_image = 1 if views is whole_image else 20
        queries = Listing(
            paths["queries"], scales, views, per_image, "queries", f"{tag}queries", prep["queries"]
        )
        refs = list(paths["references"])
        blocks = []
        for start in range(0, len(refs), size):
            block = refs[start : start + size]
            where = f"{tag}references {start}-{start + len(block)} of {len(refs)}"
            crops = None
            if with_crops:
                # D2LV matches the original query against the 19 crops at its first scale only
                # (Test/README.md: "OQ+AR should NOT be repeated" at 200 / 320 px)
                crops = Listing(
                    block,
                    scales[:1],
                    ReferenceCrops(s.local_verification.reference_faces),
                    18,
                    f"references-{start:09d}-crops",
                    f"{where}: 18 crops each",
                    prep["references"],
                )
            whole = Listing(
                block, scales, name=f"references-{start:09d}", desc=where, prepare=prep["references"]
            )
            blocks.append(_Block(start, whole, crops))
        return cls(whitening, training, queries, blocks, with_crops)

    def listings(self) -> list[Listing]:
        first = [self.whitening] if self.whitening is not None else []
        refs = [x for b in self.blocks for x in (b.whole, b.crops) if x is not None]
        return [*first, *self.training, self.queries, *refs]


@dataclass
class _ModelPass:
    """What one model's pass produced: candidate rows, the views it used, timings, global descriptors."""

    candidates: list[Candidates]
    views: list[list[View]]
    reference_sizes: list[tuple[int, int]]
    forward_seconds: np.ndarray
    view_seconds: float
    crop_seconds: float  # making and embedding the reference crops
    global_query: np.ndarray
    global_reference: np.ndarray
    global_training: np.ndarray | None


def _fit_whitening(
    plan: _Plan, run: Callable[[Listing], ViewDescriptors], s: EvaluationSettings
) -> tuple[list[PostProcessing] | None, list[np.ndarray] | None]:
    """Each descriptor entry's post-processing, whitening fitted on the training sample (``None`` without
    training images), and the raw entries of the training set when it is one block (searched next)."""
    if plan.whitening is not None:
        sample = _entries(run(plan.whitening).per_scale, s.multiscale)
        return [fit_postprocessing(x, s, sampled=True) for x in sample], None
    if not plan.training:
        return None, None
    raw = _entries(run(plan.training[0]).per_scale, s.multiscale)
    rows = s.whitening_sample(len(raw[0]))
    return [fit_postprocessing(x if rows is None else x[rows], s, sampled=True) for x in raw], raw


def _score_normalisation(
    plan: _Plan,
    run: Callable[[Listing], ViewDescriptors],
    post: list[PostProcessing],
    queries: list[np.ndarray],
    first_block: list[np.ndarray] | None,
    s: EvaluationSettings,
) -> tuple[list[np.ndarray | None], np.ndarray | None]:
    """Each query view's bias against the whole training set, searched block by block as the references
    are (each view keeps its running top-k), and the first entry's post-processed training descriptors."""
    beta, k = s.score_norm_beta, s.score_normalization.k
    if not plan.training:
        return [None] * len(queries), None
    tops = [empty_topk(len(x), k) for x in queries]
    kept, start = [], 0
    for i, listing in enumerate(plan.training):
        if i == 0 and first_block is not None:
            raw, first_block = first_block, None
        else:
            raw = _entries(run(listing).per_scale, s.multiscale)
        for e, (pp, x) in enumerate(zip(post, raw, strict=True)):
            t = pp.apply(x)
            if e == 0:
                kept.append(t)
            if beta:
                tops[e] = knn_into(tops[e], queries[e], t, start + np.arange(len(t)), k, s.search)
        start += len(raw[0])
        del raw
    biases = [bias_of_neighbours(sims, beta) if beta else None for sims, _ in tops]
    return biases, np.concatenate(kept)


def _search_model(
    model: nn.Module,
    m: int,
    paths: Mapping[str, Sequence[Path]],
    scales: list[int],
    views: ViewsOf | Sequence[list[View]],
    s: EvaluationSettings,
    tag: str,
    cache_dir: Path | None = None,
) -> _ModelPass:
    """One model: training -> post-processing per entry -> query views -> references block by block."""
    plan = _Plan.of(paths, scales, views, s, tag, m)

    def run(listing: Listing) -> ViewDescriptors:
        return listing.extract(model, **s.engine(cache_dir))

    fitted, first_block = _fit_whitening(plan, run, s)
    q = run(plan.queries)
    q_entries = _entries(q.per_scale, s.multiscale)
    post = fitted or [fit_postprocessing(None, s) for _ in q_entries]
    queries = [pp.apply(x) for pp, x in zip(post, q_entries, strict=True)]
    n_entries = len(q_entries)
    del q_entries
    q.per_scale = []  # raw views are not needed past post-processing: free them before the reference loop
    biases, global_training = _score_normalisation(plan, run, post, queries, first_block, s)
    del first_block
    t = q.model_seconds  # forward seconds per scale; a mean entry costs every scale
    forward = np.r_[t[0], t.sum()] if n_entries == 2 and s.multiscale == "mean" else t[:n_entries]
    original = np.flatnonzero([v.kind == "original" for views in q.views for v in views])
    n_views = len(q.owner)

    whole = [searcher(x, bias, s) for x, bias in zip(queries, biases, strict=True)]
    crops = searcher(queries[0][original], None if biases[0] is None else biases[0][original], s)
    ref_tables: list[np.ndarray] = []  # (image, crop index) of every reference row searched
    sizes: list[tuple[int, int]] = []
    global_refs: list[np.ndarray] = []
    face_refs: list[np.ndarray] = []  # references with a face (their crop-search rows are dropped)
    n_ref_views, crop_seconds = 0, 0.0
    for block in plan.blocks:
        start, n_block = block.start, len(block.whole.paths)
        r = run(block.whole)
        sizes += [(int(w), int(h)) for w, h in r.sizes]
        rows = n_ref_views + np.arange(n_block)
        ref_tables.append(np.stack([r.owner + start, np.zeros(n_block, dtype=np.int64)], axis=1))
        n_ref_views += n_block
        for e, (pp, x) in enumerate(zip(post, _entries(r.per_scale, s.multiscale), strict=True)):
            ref = pp.apply(x)
            if e == 0:
                global_refs.append(ref)
            whole[e].add(ref, rows)
        if block.crops is not None:
            rc = run(block.crops)
            crop_seconds += float(np.sum(rc.model_seconds)) + rc.view_seconds
            face = np.array([v.kind == "face" for vs in rc.views for v in vs], dtype=bool)
            face_refs.append(np.unique(rc.owner[face]) + start)
            crop_index = np.concatenate([np.arange(1, len(v) + 1) for v in rc.views])[~face]
            crop_rows = n_ref_views + np.arange(len(crop_index))
            ref_tables.append(np.stack([rc.owner[~face] + start, crop_index], axis=1))
            n_ref_views += len(crop_index)
            crops.add(
                np.concatenate([global_refs[-1], post[0].apply(rc.per_scale[0][~face])]),
                np.r_[rows, crop_rows],
            )
    ref_table = np.concatenate(ref_tables).astype(np.int32)  # (n_reference_views, 2): image, crop index
    # (entry, view, hit, score, query view of each searched row, reference view offset)
    searches = [(e, *search.pairs(), np.arange(n_views), 0) for e, search in enumerate(whole)]
    if plan.crops:
        # every row of the crop search is kept, its whole-reference rows (crop _0) too, and marked as the
        # crop search's (reference view 1 + crop index) so they are penalised and voted as the seed does
        # (Test/final/combine.py:47-48 strips the crop suffixes, so :85-92 penalises every crop-search row)
        view, hit, score = crops.pairs()
        # faces: after the search, as the seed cleans its result CSV
        if s.local_verification.reference_faces.enabled:
            faces = np.concatenate(face_refs) if face_refs else np.zeros(0, dtype=np.int64)
            keep = ~np.isin(ref_table[hit, 0], faces)
            log.info(
                "%sreference faces: %d of %d references hold a face; %d of their crop-search rows dropped",
                tag,
                len(faces),
                len(sizes),
                int(np.sum(~keep)),
            )
            view, hit, score = view[keep], hit[keep], score[keep]
        searches.append((0, view, hit, score, original, 1))
    candidates = [
        Candidates(
            query=q.owner[view_rows[view]],
            reference=ref_table[hit, 0],
            score=score,
            query_view=view_rows[view],
            reference_view=ref_table[hit, 1] + offset,
            scale=np.full(len(view), e),
            model=np.full(len(view), m),
        )
        for e, view, hit, score, view_rows, offset in searches
    ]
    return _ModelPass(
        candidates,
        q.views,
        sizes,
        forward,
        q.view_seconds,
        crop_seconds,
        queries[0][original],
        np.concatenate(global_refs),
        global_training,
    )


def _stages(
    result: TestStageRows,
    s: EvaluationSettings,
    ids: Mapping[str, Sequence[str]],
    ground_truth: GroundTruth | None,
    forward_seconds: np.ndarray,
    view_seconds: float,
    crop_seconds: np.ndarray | None = None,
) -> list[_Scored]:
    """Cumulative stages over the same candidate rows: each adds one step to the previous one.

    ``forward_seconds`` (n_models, n_entries): model time spent on the query views of each descriptor
    entry; a stage is charged the share of the views it uses (plus the view computation once it uses
    query views), divided by the number of queries; the reference-crop stage adds the time its models spent
    making and embedding the crops (paid once per reference, ``crop_seconds`` (n_models,)), spread over the
    queries.
    """
    c, lv, e = result.candidates, s.local_verification, s.ensemble
    named = {split: np.asarray(names) for split, names in ids.items()}  # once, not once a stage
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

    def seconds(models: int, entry_ids: list[int], share: float, local: bool, crops: bool = False) -> float:
        spent = forward_seconds[:models, entry_ids].sum() * share + (view_seconds if local else 0.0)
        spent += crop_seconds[:models].sum() if crops and crop_seconds is not None else 0.0
        return float(spent) / max(1, len(ids["queries"]))

    # (name, rows without the model condition, local rows penalised / top-k, seconds per query)
    steps = [("global", (c.scale == 0) & original & whole, False, seconds(1, [0], view_share, False))]
    if n_entries > 1:
        steps.append(
            ("+ multi-scale", multi & original & whole, False, seconds(1, entries, view_share, False))
        )
    rows, local = steps[-1][1], False
    if lv.enabled:
        # rows of small views (the original's too) are dropped after the search, as the seed's
        # clean_small_query* drop them from the query-view families' CSVs (combine.py:4-26, :45-78); the
        # reference-crop search's rows are not (combine.py:47-48 cleans that CSV of faces only); each
        # family has its own limit (evaluation.ensemble.families[*].min_size)
        limits = np.array([_min_size(s, m) for m in range(n_models)])
        unique, limit_of_model = np.unique(limits, return_inverse=True)
        small = np.stack([small_views(result.query_views, int(x)) for x in unique])  # (limits, views)
        for x, mask in zip(unique, small, strict=True):
            if mask.any():
                log.info(
                    "%d of %d query views are under %d px (evaluation.local_verification.query.min_size "
                    "or the family's min_size): their rows are dropped",
                    int(mask.sum()),
                    len(mask),
                    int(x),
                )
        rows, local = multi & whole & ~small[limit_of_model[c.model], c.query_view], True
        steps.append(("+ local verification", rows, local, seconds(1, entries, 1.0, True)))
    if lv.reference_crops:
        rows, local = rows | (original & ~whole), True  # crops are searched at the first scale only
        t = seconds(1, entries, 1.0 if lv.enabled else view_share, lv.enabled, crops=True)
        steps.append(("+ reference crops", rows, local, t))
    first_model = c.model == 0
    outcomes = [
        _score(name, rows & first_model, local, result, s, named, ground_truth, t)
        for name, rows, local, t in steps
    ]
    if n_models > 1:
        t = seconds(n_models, entries, 1.0 if lv.enabled else view_share, lv.enabled, lv.reference_crops)
        outcomes.append(_score("+ ensemble", rows, local, result, s, named, ground_truth, t, ensemble=e))
    return outcomes


def _min_size(s: EvaluationSettings, model: int) -> int:
    """The smallest query view side model ``model``'s rows keep: its family's, else the query settings'."""
    family = s.ensemble.family(model)
    if family is not None and family.min_size is not None:
        return family.min_size
    return s.local_verification.query.min_size


def _score(
    name: str,
    rows: np.ndarray,
    local: bool,
    result: TestStageRows,
    s: EvaluationSettings,
    ids: Mapping[str, np.ndarray],
    ground_truth: GroundTruth | None,
    seconds_per_query: float,
    ensemble: Ensemble | None = None,
) -> _Scored:
    """Penalise, vote (ensembles), aggregate and cap the selected rows, then score them.

    Every step groups rows of one query, so queries are taken ``evaluation.query_block`` at a time: the
    working set is one block's rows, not the stage's, and the result is the same (each block keeps its
    best ``max_predictions`` pairs, which hold the best overall; ties break on ids either way)."""
    c = result.candidates
    index = np.flatnonzero(rows)
    query = c.query[index]
    free = np.array([v.kind in s.local_verification.penalty_free for v in result.query_views])
    parts = []
    for lo in range(0, len(ids["queries"]), s.query_block):
        block = index[(query >= lo) & (query < lo + s.query_block)]
        parts.append(_aggregate(c, block, free if local else None, s, ensemble))
    del query
    pairs = PairScores.concat(parts).top(s.max_predictions)
    predictions = Predictions(ids["queries"][pairs.query], ids["references"][pairs.reference], pairs.score)
    metrics = evaluate(ground_truth, predictions) if ground_truth is not None else None
    return _Scored(StageResult(name, predictions, metrics, seconds_per_query), pairs)


def _aggregate(
    c: Candidates,
    index: np.ndarray,
    penalty_free: np.ndarray | None,
    s: EvaluationSettings,
    ensemble: Ensemble | None,
) -> PairScores:
    """The best ``max_predictions`` pairs of the candidate rows ``index`` (whole queries); ``row`` of each
    pair is its row of ``c``. ``penalty_free`` (per query view): penalise the local views' rows."""
    lv = s.local_verification
    subset = c.take(index)
    if penalty_free is not None:
        penalty = view_penalty(penalty_free[subset.query_view], subset.reference_view, lv.penalty)
        subset = subset.with_scores(subset.score - penalty)
    if ensemble is not None and ensemble.rule == "vote":
        votes = np.where(subset.reference_view > 0, ensemble.crop_votes, ensemble.min_votes)
        family = ensemble.family_of_model(len(ensemble.models))[subset.model] if ensemble.families else None
        keep = keep_voted(subset, votes, on=ensemble.vote_on, family=family)  # type: ignore[arg-type]
        index, subset = index[keep], subset.take(keep)
        if ensemble.combine == "mean":
            subset, representative = mean_over_models(subset, on=ensemble.vote_on)  # type: ignore[arg-type]
            index = index[representative]
    pairs = aggregate_pairs(subset, top=lv.top if penalty_free is not None else 1).top(s.max_predictions)
    return dataclasses.replace(pairs, row=index[pairs.row])
