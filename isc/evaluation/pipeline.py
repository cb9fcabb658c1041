"""From descriptors to scored pairs and official metrics: the test stage of the ISC baselines and D2LV.

``query, reference (, training)`` descriptors -> optional PCA-whitening fitted on training ->
L2 normalisation -> kNN search -> optional score normalisation against training -> predictions
capped at the official 500,000 -> metrics. Used by ``run.py task=evaluate`` and by the per-epoch
retrieval callback, so both report the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from isc.evaluation.matches import GroundTruth, Predictions
from isc.evaluation.metrics import Metrics, evaluate
from isc.evaluation.postprocess import PCAWhitening, l2_normalize, normalize_scores, query_bias
from isc.evaluation.search import Backend, knn, predictions_from_knn

__all__ = ["MatchingSettings", "MatchingResult", "match_descriptors"]


@dataclass(frozen=True)
class MatchingSettings:
    """How descriptors are matched; defaults follow D2LV's test stage where the data allows."""

    k: int = 10
    whitening_dim: int | None = None  # PCA-whitening output dims (None: off)
    eigen_power: float = -0.5
    score_norm_beta: float | None = None  # None or 0: no score normalisation
    score_norm_k: int = 10
    backend: Backend = "faiss"
    device: str | None = None
    max_predictions: int = 500_000


@dataclass
class MatchingResult:
    """Predictions (final and before score normalisation), their metrics, and the descriptors searched.

    ``query``, ``reference`` and ``training`` are post-processed (whitened when enabled, L2-normalised).
    """

    predictions: Predictions
    raw_predictions: Predictions
    query: np.ndarray
    reference: np.ndarray
    training: np.ndarray | None = None
    metrics: Metrics | None = None
    raw_metrics: Metrics | None = None
    whitening: PCAWhitening | None = field(default=None, repr=False)

    def metrics_dict(self) -> dict[str, object]:
        """Final metrics at the top level, plus those without score normalisation under ``raw``."""
        out: dict[str, object] = dict(self.metrics.to_dict()) if self.metrics else {}
        if self.raw_metrics is not None:
            out["raw"] = self.raw_metrics.to_dict()
        out["num_predictions"] = len(self.predictions)
        return out


def match_descriptors(
    query_ids: np.ndarray,
    query: np.ndarray,
    reference_ids: np.ndarray,
    reference: np.ndarray,
    training: np.ndarray | None = None,
    ground_truth: GroundTruth | None = None,
    settings: MatchingSettings | None = None,
) -> MatchingResult:
    """Match queries to references; evaluate against ``ground_truth`` when given.

    Shapes: query (nq, d), reference (nr, d), training (nt, d) or None. Descriptors need not be
    normalised: they are L2-normalised here (after whitening when enabled).
    """
    s = settings or MatchingSettings()
    whitening = None
    if s.whitening_dim:
        if training is None or len(training) == 0:
            raise ValueError("PCA-whitening needs training descriptors (the dataset's training/ folder)")
        whitening = PCAWhitening.fit(training, dim=s.whitening_dim, eigen_power=s.eigen_power)
        query, reference, training = (whitening.transform(x) for x in (query, reference, training))
    query, reference = np.asarray(l2_normalize(query)), np.asarray(l2_normalize(reference))
    if training is not None:
        training = np.asarray(l2_normalize(training))

    sims, idx = knn(query, reference, s.k, backend=s.backend, device=s.device)
    raw = predictions_from_knn(query_ids, reference_ids, sims, idx).top(s.max_predictions)
    final = raw
    if s.score_norm_beta:
        if training is None or len(training) == 0:
            raise ValueError(
                "score normalisation needs training descriptors (the dataset's training/ folder)"
            )
        bias = query_bias(
            query,
            training,
            k=s.score_norm_k,
            beta=s.score_norm_beta,
            backend=s.backend,
            device=s.device,
        )
        final = predictions_from_knn(query_ids, reference_ids, normalize_scores(sims, bias), idx)
        final = final.top(s.max_predictions)

    result = MatchingResult(final, raw, query, reference, training, whitening=whitening)
    if ground_truth is not None:
        result.metrics = evaluate(ground_truth, final)
        if final is not raw:
            result.raw_metrics = evaluate(ground_truth, raw)
    return result
