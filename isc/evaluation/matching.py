"""Global matching: one descriptor per image -> post-processing -> kNN search -> predictions -> metrics.

The ISC baselines' test stage, and the first stage of D2LV's: ``query, reference (, training)``
descriptors -> :class:`~isc.evaluation.postprocess.PostProcessing` fitted on training (PCA-whitening,
L2 normalisation, score normalisation) -> kNN search -> predictions capped at the official 500,000 ->
metrics. ``task=evaluate``, ``task=predict`` and the per-epoch retrieval callback all call
:func:`match_descriptors` with the run's one settings object, so the number logged during training is
the number ``task=evaluate`` prints for the same checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from isc.evaluation.metrics import evaluate
from isc.evaluation.postprocess import PostProcessing, fold_score_normalization, normalize_scores
from isc.evaluation.results import EvaluationResult, StageResult
from isc.evaluation.search import (
    approximate_knn,
    capped_range_search,
    knn,
    predictions_from_knn,
    predictions_from_range,
    recall_at_k,
)
from isc.evaluation.settings import EvaluationSettings
from isc.formats.pairs import GroundTruth, Predictions

__all__ = ["fit_postprocessing", "match_descriptors"]


def fit_postprocessing(
    training: np.ndarray | None, s: EvaluationSettings, *, sampled: bool = False
) -> PostProcessing:
    """The run's post-processing (``evaluation.whitening`` / ``score_normalization``) fitted on ``training``:
    every training descriptor (the whitening on its ``evaluation.whitening.samples`` sample), or with
    ``sampled`` only the sample's, which the whitening is fitted on whole and nothing is kept of."""
    rows = None if sampled or training is None else s.whitening_sample(len(training))
    return PostProcessing.fit(
        training,
        whitening_dim=s.whitening_dim,
        eigen_power=s.whitening.eigen_power,
        beta=s.score_norm_beta,
        k=s.score_normalization.k,
        search=s.search,
        whitening_rows=rows,
        keep_training=not sampled,
    )


def _neighbours(
    query: np.ndarray, reference: np.ndarray, training: np.ndarray | None, s: EvaluationSettings
) -> tuple[np.ndarray, np.ndarray]:
    if s.index == "Flat":
        return knn(query, reference, s.k, **s.search)
    return approximate_knn(
        query, reference, s.k, index=s.index, training=training, parameters=s.index_parameters
    )


def _search(
    query_ids: np.ndarray,
    query: np.ndarray,
    reference_ids: np.ndarray,
    reference: np.ndarray,
    s: EvaluationSettings,
    bias: np.ndarray | None = None,
    training: np.ndarray | None = None,
) -> tuple[Predictions, np.ndarray]:
    """The capped predictions, and the neighbours' indices (nq, k) they came from (``candidates=topk``)."""
    if s.candidates == "range":  # score normalisation folded into the vectors: q'.r' = q.r - bias
        q, r = (query, reference) if bias is None else fold_score_normalization(query, reference, bias)
        qi, ri, sims_ = capped_range_search(q, r, s.max_results)
        pairs = predictions_from_range(query_ids, reference_ids, qi, ri, sims_)
        return pairs.top(s.max_predictions), np.zeros((len(query), 0), np.int64)
    sims, idx = _neighbours(query, reference, training, s)
    if bias is not None:
        sims = normalize_scores(sims, bias)
    return predictions_from_knn(query_ids, reference_ids, sims, idx).top(s.max_predictions), idx


def _index_recall(q: np.ndarray, r: np.ndarray, found: np.ndarray, s: EvaluationSettings) -> dict[str, Any]:
    """An approximate index's recall@k against exact search, on the first ``recall_queries`` queries."""
    n = min(len(q), s.recall_queries)
    _, exact = knn(q[:n], r, s.k, **s.search)
    return {
        "index": s.index,
        "parameters": s.index_parameters,
        "k": s.k,
        "queries_checked": n,
        "recall_at_k": recall_at_k(found[:n], exact),
    }


def match_descriptors(
    query_ids: np.ndarray,
    query: np.ndarray,
    reference_ids: np.ndarray,
    reference: np.ndarray,
    training: np.ndarray | None = None,
    ground_truth: GroundTruth | None = None,
    settings: EvaluationSettings | None = None,
    training_ids: np.ndarray | None = None,
) -> EvaluationResult:
    """Match queries to references with ``settings``; score against ``ground_truth`` when given.

    Shapes: query (nq, d), reference (nr, d), training (nt, d) or None. Descriptors need not be
    normalised. ``settings`` should already be resolved for the training set
    (:meth:`EvaluationSettings.for_training_set`); without training, post-processing is off.
    """
    s = settings or EvaluationSettings()
    if training is None:
        s = s.for_training_set(0)
    post = fit_postprocessing(training, s)
    q, r = post.apply(query), post.apply(reference)
    predictions, found = _search(query_ids, q, reference_ids, r, s, post.bias(q), post.training)
    search = None if s.index == "Flat" else _index_recall(q, r, found, s)
    metrics = evaluate(ground_truth, predictions) if ground_truth is not None else None
    raw_metrics = None
    if metrics is not None and (post.whitening is not None or post.beta):
        plain = PostProcessing()
        plain_training = None if training is None else plain.apply(training)
        raw, _ = _search(
            query_ids, plain.apply(query), reference_ids, plain.apply(reference), s, None, plain_training
        )
        raw_metrics = evaluate(ground_truth, raw)  # type: ignore[arg-type]
    return EvaluationResult(
        [StageResult("global", predictions, metrics)],
        s.describe(),
        np.asarray(query_ids),
        q,
        np.asarray(reference_ids),
        r,
        None if training_ids is None else np.asarray(training_ids),
        post.training,
        raw_metrics,
        search=search,
    )
