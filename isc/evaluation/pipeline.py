"""From descriptors to scored pairs and official metrics: the test stage of the ISC baselines and D2LV.

``query, reference (, training)`` descriptors -> optional PCA-whitening fitted on training ->
L2 normalisation -> kNN search -> optional score normalisation against training -> predictions
capped at the official 500,000 -> metrics.

:class:`EvaluationSettings` is the *one* description of how a model is evaluated. ``run.py`` parses the
``evaluation:`` config into it once, and ``task=evaluate``, ``task=predict``-style runs and the per-epoch
retrieval callback all pass it to :func:`match_descriptors`, so the number logged during training is the
number ``task=evaluate`` prints for the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isc.data.images import Disc21Layout
from isc.evaluation.matches import GroundTruth, Predictions
from isc.evaluation.metrics import Metrics, evaluate
from isc.evaluation.postprocess import PCAWhitening, l2_normalize, normalize_scores, query_bias
from isc.evaluation.search import Backend, knn, predictions_from_knn
from isc.evaluation.views import QueryExpansion

__all__ = [
    "Ensemble",
    "EvaluationSettings",
    "LocalVerification",
    "MatchingResult",
    "ScoreNormalization",
    "Whitening",
    "headline_metrics",
    "match_descriptors",
]

log = logging.getLogger(__name__)

METRIC_NAMES = ("uAP", "recall_at_p90", "recall_at_rank1", "recall_at_rank10")


@dataclass(frozen=True)
class Whitening:
    """PCA-whitening fitted on the training descriptors (D2LV: 256 dims, eigen power -0.5)."""

    enabled: bool = False
    dim: int = 256
    eigen_power: float = -0.5


@dataclass(frozen=True)
class ScoreNormalization:
    """``score = q.r - beta * mean(top-k q.t over training descriptors t)`` (D2LV: beta 2, k 10)."""

    enabled: bool = True
    beta: float = 1.0
    k: int = 3


@dataclass(frozen=True)
class LocalVerification:
    """D2LV's local verification: query views and reference crops, and how their scores combine.

    ``query`` holds :class:`isc.evaluation.views.QueryExpansion`'s keys (rotations, crops, proposals,
    overlays, ...). ``penalty`` is subtracted from rows of any view whose kind is not in ``penalty_free``
    (seed ``Test/final/combine.py``: 0.05 off everything but the original query and detected overlays);
    a pair's score is the mean of its ``top`` best distinct view scores (seed: 2).
    """

    enabled: bool = False
    query: QueryExpansion = field(default_factory=QueryExpansion)
    reference_crops: bool = False
    penalty: float = 0.05
    penalty_free: tuple[str, ...] = ("original", "overlay")
    top: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.query, Mapping):  # from the config: unknown keys fail here, before extraction
            object.__setattr__(self, "query", QueryExpansion.from_dict(self.query))


@dataclass(frozen=True)
class Ensemble:
    """Several models in one evaluation (D2LV: ResNet-50, ResNet-152 and ResNet-50-IBN-a).

    ``rule="vote"``: each model searches on its own and a view pair is kept when at least ``min_votes``
    models return it (``vote_on`` the view pair as the seed does, or the image pair); ``combine="pool"``
    keeps the agreeing models' rows for the max / top-2 aggregation (the seed), ``"mean"`` averages them.
    ``rule="concat"``: the models' unit descriptors are concatenated and PCA-whitened to ``concat_dim``.
    """

    models: tuple[str, ...] = ()
    rule: str = "vote"
    min_votes: int = 2
    vote_on: str = "view"
    combine: str = "pool"
    concat_dim: int = 256


@dataclass(frozen=True)
class EvaluationSettings:
    """How descriptors are extracted, post-processed, matched and capped; mirrors ``conf/evaluation/``.

    The defaults equal ``conf/evaluation/default.yaml`` (a test checks it), so code and config cannot drift.
    """

    image_size: int = 224
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    search_backend: Backend = "faiss"
    k: int = 10
    whitening: Whitening = field(default_factory=Whitening)
    score_normalization: ScoreNormalization = field(default_factory=ScoreNormalization)
    max_predictions: int = 500_000
    descriptor_track_max_dim: int | None = None
    descriptors: Any = None
    scales: tuple[int, ...] | None = None
    multiscale: str = "mean"
    local_verification: LocalVerification = field(default_factory=LocalVerification)
    ensemble: Ensemble = field(default_factory=Ensemble)
    reference_block: int = 25_000
    max_training: int | None = None
    cache_dir: Any = "auto"
    shard_size: int = 10_000

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvaluationSettings:
        """Parse the ``evaluation:`` config; an unknown key is an error naming the valid ones."""
        nested: dict[str, Any] = {
            "whitening": Whitening,
            "score_normalization": ScoreNormalization,
            "local_verification": LocalVerification,
            "ensemble": Ensemble,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown evaluation key(s) {sorted(unknown)}; valid keys: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in nested and isinstance(value, Mapping):
                sub = nested[key]
                sub_known = {f.name for f in dataclasses.fields(sub)}
                bad = set(value) - sub_known
                if bad:
                    raise ValueError(
                        f"unknown key(s) evaluation.{key}.{sorted(bad)}; valid: {sorted(sub_known)}"
                    )
                value = sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            elif key == "scales" and value is not None:
                value = tuple(int(v) for v in value)
            kwargs[key] = value
        settings = cls(**kwargs)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse values that cannot work, naming the config key to change (before any heavy work)."""
        if self.k < 1:
            raise ValueError(f"evaluation.k must be >= 1, got {self.k}")
        if self.search_backend not in ("faiss", "torch"):
            raise ValueError(f"evaluation.search_backend must be faiss or torch, got {self.search_backend!r}")
        if self.whitening.enabled and self.whitening.dim < 1:
            raise ValueError(f"evaluation.whitening.dim must be >= 1, got {self.whitening.dim}")
        if self.score_normalization.enabled and self.score_normalization.k < 1:
            raise ValueError(
                f"evaluation.score_normalization.k must be >= 1, got {self.score_normalization.k}"
            )

        if self.scales is not None and (not self.scales or min(self.scales) < 32):
            raise ValueError(
                f"evaluation.scales must be a non-empty list of sizes >= 32 px, got {self.scales}"
            )
        if self.multiscale not in ("mean", "max"):
            raise ValueError(f"evaluation.multiscale must be mean or max, got {self.multiscale!r}")
        lv, e = self.local_verification, self.ensemble
        if lv.top < 1:
            raise ValueError(f"evaluation.local_verification.top must be >= 1, got {lv.top}")
        if e.rule not in ("vote", "concat"):
            raise ValueError(f"evaluation.ensemble.rule must be vote or concat, got {e.rule!r}")
        if e.vote_on not in ("view", "image") or e.combine not in ("pool", "mean"):
            raise ValueError(
                "evaluation.ensemble.vote_on must be view or image and evaluation.ensemble.combine pool or "
                f"mean, got {e.vote_on!r} and {e.combine!r}"
            )
        if e.models and not 1 <= e.min_votes <= len(e.models):
            raise ValueError(
                f"evaluation.ensemble.min_votes={e.min_votes} must be between 1 and the "
                f"{len(e.models)} models of evaluation.ensemble.models"
            )
        if self.max_training is not None and self.max_training < 1:
            raise ValueError(f"evaluation.max_training must be >= 1 or null, got {self.max_training}")
        if self.shard_size < 1:
            raise ValueError(f"evaluation.shard_size must be >= 1, got {self.shard_size}")
        if self.reference_block < 1:
            raise ValueError(f"evaluation.reference_block must be >= 1, got {self.reference_block}")

    @property
    def test_stage(self) -> bool:
        """Whether anything beyond one global descriptor per image is asked for (see isc.evaluation.inference)."""
        return bool(
            self.scales is not None
            or self.local_verification.enabled
            or self.local_verification.reference_crops
            or self.ensemble.models
        )

    @property
    def whitening_dim(self) -> int | None:
        return self.whitening.dim if self.whitening.enabled else None

    @property
    def score_norm_beta(self) -> float | None:
        s = self.score_normalization
        return s.beta if s.enabled and s.beta else None

    @property
    def resolved_device(self) -> str | None:
        return None if self.device == "auto" else self.device

    def for_training_set(self, num_training: int) -> EvaluationSettings:
        """These settings on a dataset with ``num_training`` training images.

        Without training images, score normalisation is switched off with a warning (there is nothing to
        normalise against) and whitening is an error; too few of them for ``k`` or ``dim`` is an error.
        """
        s = self
        if num_training == 0:
            if s.whitening.enabled:
                raise ValueError(
                    "evaluation.whitening.enabled=true needs the dataset's training/ images to fit the PCA"
                )
            if s.score_norm_beta:
                log.warning("the dataset has no training/ images: score normalisation is switched off")
                s = dataclasses.replace(
                    s, score_normalization=dataclasses.replace(s.score_normalization, enabled=False)
                )
            return s
        if s.whitening.enabled and s.whitening.dim > num_training:
            raise ValueError(
                f"evaluation.whitening.dim={s.whitening.dim} exceeds the {num_training} training images "
                "the PCA is fitted on: lower it or add training images"
            )
        if s.score_norm_beta and s.score_normalization.k > num_training:
            raise ValueError(
                f"evaluation.score_normalization.k={s.score_normalization.k} exceeds the {num_training} "
                "training images: lower it"
            )
        return s

    def split_paths(self, layout: Disc21Layout) -> dict[str, list[Path]]:
        """The images each split evaluates on: all queries and references, the first ``max_training``
        training images by id (D2LV fits its PCA on 20k of the 1M), or none without ``training/``."""
        paths = {split: layout.paths(split) for split in ("queries", "references")}
        if layout.has_split("training"):
            paths["training"] = layout.paths("training")[: self.max_training]
        return paths

    def describe(self) -> str:
        """The post-processing in words, for the printed headline."""
        parts = []
        if self.whitening.enabled:
            parts.append(f"PCA-whitening {self.whitening.dim}")
        if self.score_norm_beta:
            s = self.score_normalization
            parts.append(f"score normalisation (beta {s.beta:g}, k {s.k})")
        return " + ".join(parts) or "no post-processing"


@dataclass
class MatchingResult:
    """Final predictions and their metrics, the plain-descriptor ("raw") metrics, and what was searched.

    ``query``, ``reference`` and ``training`` are post-processed (whitened when enabled, L2-normalised).
    ``raw_metrics`` score the L2-normalised descriptors without whitening or score normalisation; it is
    ``None`` when no post-processing is configured (then it would equal ``metrics``).
    """

    predictions: Predictions
    query: np.ndarray
    reference: np.ndarray
    training: np.ndarray | None = None
    metrics: Metrics | None = None
    raw_metrics: Metrics | None = None
    whitening: PCAWhitening | None = field(default=None, repr=False)


def headline_metrics(result: MatchingResult, prefix: str = "") -> dict[str, float]:
    """``<prefix>uAP`` etc. with the configured post-processing and ``<prefix>uAP_raw`` etc. without it.

    The one key naming every task uses (``task=evaluate`` with no prefix, the callback with ``val/``).
    Undefined figures (recall at P90 never reached) are reported as 0 so curves stay continuous.
    """
    if result.metrics is None:
        return {}
    final = result.metrics.to_dict()
    raw = (result.raw_metrics or result.metrics).to_dict()
    out = {f"{prefix}{k}": float(final[k] or 0.0) for k in METRIC_NAMES}
    out.update({f"{prefix}{k}_raw": float(raw[k] or 0.0) for k in METRIC_NAMES})
    return out


def _search(
    query_ids: np.ndarray,
    query: np.ndarray,
    reference_ids: np.ndarray,
    reference: np.ndarray,
    s: EvaluationSettings,
    bias: np.ndarray | None = None,
) -> Predictions:
    sims, idx = knn(query, reference, s.k, backend=s.search_backend, device=s.resolved_device)
    if bias is not None:
        sims = normalize_scores(sims, bias)
    return predictions_from_knn(query_ids, reference_ids, sims, idx).top(s.max_predictions)


def match_descriptors(
    query_ids: np.ndarray,
    query: np.ndarray,
    reference_ids: np.ndarray,
    reference: np.ndarray,
    training: np.ndarray | None = None,
    ground_truth: GroundTruth | None = None,
    settings: EvaluationSettings | None = None,
) -> MatchingResult:
    """Match queries to references with ``settings``; evaluate against ``ground_truth`` when given.

    Shapes: query (nq, d), reference (nr, d), training (nt, d) or None. Descriptors need not be
    normalised: they are L2-normalised here (after whitening when enabled).
    """
    s = (settings or EvaluationSettings()).for_training_set(0 if training is None else len(training))
    plain_query, plain_reference = np.asarray(l2_normalize(query)), np.asarray(l2_normalize(reference))
    whitening = None
    if s.whitening_dim:
        assert training is not None  # for_training_set refused whitening without training images
        if s.whitening_dim > query.shape[1]:
            raise ValueError(
                f"evaluation.whitening.dim={s.whitening_dim} exceeds the descriptor's {query.shape[1]} dims"
            )
        whitening = PCAWhitening.fit(training, dim=s.whitening_dim, eigen_power=s.whitening.eigen_power)
        query, reference, training = (whitening.transform(x) for x in (query, reference, training))
        query, reference = np.asarray(l2_normalize(query)), np.asarray(l2_normalize(reference))
    else:
        query, reference = plain_query, plain_reference
    if training is not None:
        training = np.asarray(l2_normalize(training))

    bias = None
    if s.score_norm_beta:
        assert training is not None
        bias = query_bias(
            query,
            training,
            k=s.score_normalization.k,
            beta=s.score_norm_beta,
            backend=s.search_backend,
            device=s.resolved_device,
        )
    predictions = _search(query_ids, query, reference_ids, reference, s, bias)
    result = MatchingResult(predictions, query, reference, training, whitening=whitening)
    if ground_truth is not None:
        result.metrics = evaluate(ground_truth, predictions)
        if whitening is not None or bias is not None:
            raw = _search(query_ids, plain_query, reference_ids, plain_reference, s)
            result.raw_metrics = evaluate(ground_truth, raw)
    return result
