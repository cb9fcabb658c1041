"""The evaluation settings: the one immutable description of how descriptors are extracted and matched.

:class:`EvaluationSettings` mirrors ``conf/evaluation/`` (its defaults equal ``default.yaml``, a test
checks it). A task parses the ``evaluation:`` config into it once (:meth:`EvaluationSettings.from_dict`
refuses unknown keys and impossible values before any work), resolves it once for its dataset
(:func:`isc.evaluation.runner.resolve_settings`), and hands that object to every step: extraction,
matching, the test stage and the per-epoch callback, so the number logged during training is the number
``task=evaluate`` prints for the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from isc.evaluation.faces import FaceSettings
from isc.evaluation.families import Family
from isc.evaluation.search import Backend
from isc.evaluation.views import QueryViews

__all__ = [
    "GRID_STEPS",
    "Ensemble",
    "EvaluationSettings",
    "LocalVerification",
    "ScoreNormalization",
    "Whitening",
]

log = logging.getLogger(__name__)

GRID_STEPS: dict[str, tuple[bool, bool]] = {
    "raw": (False, False),
    "whitening": (True, False),
    "score_normalization": (False, True),
    "both": (True, True),
}
"""``evaluation.grid``'s names: (whitening on, score normalisation on), each with the configured parameters."""


@dataclass(frozen=True)
class Whitening:
    """PCA-whitening fitted on the training descriptors (D2LV's matching track: 1500 dims, eigen power -0.5,
    on the raw BN-neck output; the descriptor track's limit: 256).

    ``samples``: fit on that many training images drawn as D2LV draws them (``np.random.RandomState(seed)
    .choice(n, samples, replace=False)``, seed ``Test/final/V5_baseline_CC/extract_features.py:181-184``),
    in index order; ``None``: on every training image. ``raw``: fit and apply it on the model's output
    before its L2 norm, as the seed does (``extract_features.py:220-266``: BN neck -> PCA -> L2); ``False``:
    on unit descriptors. The whitened vectors are L2-normalised either way.
    """

    enabled: bool = False
    dim: int = 256
    eigen_power: float = -0.5
    samples: int | None = None
    seed: int = 123
    raw: bool = False


@dataclass(frozen=True)
class ScoreNormalization:
    """``score = q.r - beta * mean(top-k q.t over training descriptors t)`` (D2LV: beta 2, k 10)."""

    enabled: bool = True
    beta: float = 1.0
    k: int = 3


@dataclass(frozen=True)
class LocalVerification:
    """D2LV's local verification: query views and reference crops, and how their scores combine.

    ``query`` holds :class:`isc.evaluation.views.QueryViews`' keys (rotations, crops, min_size, and the
    nested ``proposals`` / ``overlays`` detector settings). ``penalty`` is subtracted from rows of any
    view whose kind is not in ``penalty_free`` (seed ``Test/final/combine.py``: 0.05 off everything but
    the original query and detected overlays); a pair's score is the mean of its ``top`` best distinct
    view scores (seed: 2). ``reference_faces`` (:class:`isc.evaluation.faces.FaceSettings`): drop the
    reference-crop search's rows of references with a face (seed ``Test/final/combine.py:47-48``); it
    does nothing without ``reference_crops``.
    """

    enabled: bool = False
    query: QueryViews = field(default_factory=QueryViews)
    reference_crops: bool = False
    reference_faces: FaceSettings = field(default_factory=FaceSettings)
    penalty: float = 0.05
    penalty_free: tuple[str, ...] = ("original", "overlay")
    top: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.query, Mapping):  # from the config: unknown keys fail here, before extraction
            object.__setattr__(self, "query", QueryViews.from_dict(self.query))
        faces = self.reference_faces
        if isinstance(faces, Mapping):
            known = {f.name for f in dataclasses.fields(FaceSettings)}
            unknown = sorted(set(faces) - known)
            if unknown:
                raise ValueError(
                    f"unknown key(s) {', '.join(f'{FaceSettings.KEY}.{k}' for k in unknown)}; valid keys: "
                    + ", ".join(f"{FaceSettings.KEY}.{k}" for k in sorted(known))
                )
            object.__setattr__(self, "reference_faces", FaceSettings(**dict(faces)))
        elif not isinstance(faces, FaceSettings):
            raise ValueError(
                f"{FaceSettings.KEY} must be a mapping (switch it off with {FaceSettings.KEY}.enabled=false), "
                f"got {faces!r}"
            )


@dataclass(frozen=True)
class Ensemble:
    """Several models in one evaluation (D2LV: ResNet-50, ResNet-152 and ResNet-50-IBN-a).

    ``rule="vote"``: each model searches on its own and a view pair is kept when at least ``min_votes``
    models return it (``vote_on`` the view pair as the seed does, or the image pair); ``combine="pool"``
    keeps the agreeing models' rows for the max / top-2 aggregation (the seed), ``"mean"`` averages them.
    ``rule="concat"``: the models' unit descriptors are concatenated and PCA-whitened to ``concat_dim``.
    ``families`` (:class:`isc.evaluation.families.Family`, D2LV's 33 models): the models are listed by
    family instead, each family's rows vote among its own models only, every family's agreeing rows are
    pooled, and each family sees its test images through its own changes (grey, blurred references).
    """

    models: tuple[str, ...] = ()
    rule: str = "vote"
    min_votes: int = 2
    crop_min_votes: int | None = None  # the reference-crop search's rows (D2LV: 3 of 3); None: min_votes
    vote_on: str = "view"
    combine: str = "pool"
    concat_dim: int = 256
    families: tuple[Family, ...] = ()  # D2LV's 11 x 3 models: each family votes apart, then rows concat

    def __post_init__(self) -> None:
        if not self.families:
            return
        families = tuple(f if isinstance(f, Family) else Family.from_dict(f) for f in self.families)
        names = [f.name for f in families]
        if len(set(names)) != len(names):
            raise ValueError(f"{Family.KEY}: family names must be unique, got {names}")
        if self.models and self.models != tuple(m for f in families for m in f.models):  # replace() re-runs
            raise ValueError(
                f"evaluation.ensemble.models and {Family.KEY} both given: list the models in their families "
                "only (evaluation.ensemble.models=[])"
            )
        if self.rule != "vote" or self.combine != "pool":
            raise ValueError(
                f"{Family.KEY} vote within each family and pool the agreeing rows: evaluation.ensemble.rule "
                f"must be vote and combine pool, got {self.rule!r} and {self.combine!r}"
            )
        object.__setattr__(self, "families", families)
        object.__setattr__(self, "models", tuple(m for f in families for m in f.models))

    @property
    def crop_votes(self) -> int:
        return self.min_votes if self.crop_min_votes is None else self.crop_min_votes

    @property
    def voters(self) -> int:
        """The fewest models a vote is taken among: a family's (the smallest), else every model."""
        return min(len(f.models) for f in self.families) if self.families else len(self.models)

    def family_of_model(self, n_models: int) -> np.ndarray:
        """(n_models,) int64: each model's family index (all 0 without families)."""
        if not self.families:
            return np.zeros(n_models, dtype=np.int64)
        return np.repeat(np.arange(len(self.families)), [len(f.models) for f in self.families])

    def family(self, model: int) -> Family | None:
        """The family of model index ``model``, or None without families."""
        if not self.families:
            return None
        return self.families[int(self.family_of_model(len(self.models))[model])]


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
    gpu_index: str = "replicate"  # faiss on several GPUs: replicate the database on each, or shard it
    gpu_float16: bool = False  # faiss on GPUs: the database in float16 (half the memory, ~1e-3 rounding)
    index: str = (
        "Flat"  # a faiss index-factory string: Flat is exact, IVF/HNSW/PQ approximate (global matching)
    )
    index_parameters: str = ""  # faiss search parameters of an approximate index: "nprobe=64", "efSearch=128"
    recall_queries: int = 1000  # queries an approximate index is checked on against exact search
    candidates: str = "topk"  # topk: each query's k nearest; range: the official rule, a global cap
    max_results: int = 1_000_000  # candidates=range: pairs kept over all queries (D2LV: 1M; ISC scorer: 500k)
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
    query_block: int = 5_000
    max_training: int | None = None
    gem_p: float | None = None  # replace the model's pooling by a fresh GeM with this p at test (D2LV: 3)
    cache_dir: Any = "auto"
    shard_size: int = 10_000
    grid: tuple[str, ...] = ("raw",)  # post-processing settings also scored, every stage (GRID_STEPS)

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
            elif key == "grid":
                value = tuple(str(v) for v in (value or ()))
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
        voters = "models of the smallest family" if e.families else "models of evaluation.ensemble.models"
        if e.models and not 1 <= e.min_votes <= e.voters:
            raise ValueError(
                f"evaluation.ensemble.min_votes={e.min_votes} must be between 1 and the {e.voters} {voters}"
            )
        if e.models and not 1 <= e.crop_votes <= e.voters:
            raise ValueError(
                f"evaluation.ensemble.crop_min_votes={e.crop_min_votes} must be null or between 1 and the "
                f"{e.voters} {voters}"
            )
        if self.whitening.samples is not None and self.whitening.samples < 1:
            raise ValueError(
                f"evaluation.whitening.samples must be >= 1 or null, got {self.whitening.samples}"
            )
        if self.max_training is not None and self.max_training < 1:
            raise ValueError(f"evaluation.max_training must be >= 1 or null, got {self.max_training}")
        if self.gem_p is not None and not self.gem_p > 0:
            raise ValueError(f"evaluation.gem_p must be > 0 or null, got {self.gem_p}")
        if self.shard_size < 1:
            raise ValueError(f"evaluation.shard_size must be >= 1, got {self.shard_size}")
        if self.gpu_index not in ("replicate", "shard"):
            raise ValueError(f"evaluation.gpu_index must be replicate or shard, got {self.gpu_index!r}")
        if self.candidates not in ("topk", "range"):
            raise ValueError(f"evaluation.candidates must be topk or range, got {self.candidates!r}")
        if self.max_results < 1:
            raise ValueError(f"evaluation.max_results must be >= 1, got {self.max_results}")
        if self.candidates == "range" and self.index != "Flat":
            raise ValueError("evaluation.candidates=range is an exact search: it takes evaluation.index=Flat")
        if self.recall_queries < 0:
            raise ValueError(f"evaluation.recall_queries must be >= 0, got {self.recall_queries}")
        if not self.index.strip():
            raise ValueError("evaluation.index is empty: Flat (exact) or a faiss index-factory string")
        if self.index != "Flat" and self.test_stage:
            raise ValueError(
                f"evaluation.index={self.index}: approximate indexes serve global matching; the test stage "
                "(scales, local_verification, ensemble) searches exactly: use evaluation.index=Flat"
            )
        if self.reference_block < 1:
            raise ValueError(f"evaluation.reference_block must be >= 1, got {self.reference_block}")
        if self.query_block < 1:
            raise ValueError(f"evaluation.query_block must be >= 1, got {self.query_block}")
        unknown_steps = [g for g in self.grid if g not in GRID_STEPS]
        if unknown_steps or len(set(self.grid)) != len(self.grid):
            raise ValueError(
                f"evaluation.grid must list distinct names of {list(GRID_STEPS)}, got {list(self.grid)}"
            )

    def as_grid_entry(self) -> EvaluationSettings:
        """These settings as a grid entry compares: without the grid and the descriptor track's limit
        (what :meth:`variant` returns for the configured post-processing)."""
        return dataclasses.replace(self, grid=(), descriptor_track_max_dim=None)

    def variant(self, name: str) -> EvaluationSettings:
        """These settings with the post-processing of grid entry ``name`` (:data:`GRID_STEPS`): each step
        on or off, its parameters as configured; the extraction (models, scales, views) is unchanged. Only
        the configured setting's descriptors are written: the descriptor track's limit is not a grid's."""
        whiten, normalise = GRID_STEPS[name]
        return dataclasses.replace(
            self,
            # whitening.raw only where the models were built for it (evaluated_model): the same extraction
            whitening=dataclasses.replace(
                self.whitening, enabled=whiten, raw=self.whitening.raw and self.whitening.enabled
            ),
            score_normalization=dataclasses.replace(self.score_normalization, enabled=normalise),
            grid=(),
            descriptor_track_max_dim=None,
        )

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
    def search(self) -> dict[str, Any]:
        """The exact search's keyword arguments (:func:`isc.evaluation.search.knn`): backend and device."""
        return {
            "backend": self.search_backend,
            "device": None if self.device == "auto" else self.device,
            "gpu_shard": self.gpu_index == "shard",
            "gpu_float16": self.gpu_float16,
        }

    def engine(self, cache_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
        """The extraction engine's keyword arguments (:func:`isc.evaluation.extract.extract`) for every
        listing of a run: the same in each process of a group, so their shards are one cache."""
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "device": self.device,
            "cache_dir": cache_dir,
            "shard_size": self.shard_size,
        }

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
        if (
            s.test_stage
            and s.whitening.enabled
            and s.whitening.samples is None
            and num_training > s.reference_block
        ):
            log.warning(
                "the test stage fits the whitening on all %d training images, held at once and extracted "
                "apart from the score normalisation's blocks: set evaluation.whitening.samples (D2LV: 20000)",
                num_training,
            )
        fitted_on = min(num_training, s.whitening.samples or num_training)
        if s.whitening.enabled and s.whitening.dim > fitted_on:
            raise ValueError(
                f"evaluation.whitening.dim={s.whitening.dim} exceeds the {fitted_on} training images "
                "the PCA is fitted on: lower it, or raise evaluation.whitening.samples or add training images"
            )
        if s.score_norm_beta and s.score_normalization.k > num_training:
            raise ValueError(
                f"evaluation.score_normalization.k={s.score_normalization.k} exceeds the {num_training} "
                "training images: lower it"
            )
        return s

    def whitening_sample(self, num_training: int) -> np.ndarray | None:
        """The training rows the PCA is fitted on (increasing), or ``None`` for all of them."""
        n = self.whitening.samples
        if not self.whitening.enabled or n is None or n >= num_training:
            return None
        return np.sort(np.random.RandomState(self.whitening.seed).choice(num_training, size=n, replace=False))

    def describe(self) -> str:
        """The post-processing in words, for the printed headline."""
        parts = []
        if self.whitening.enabled:
            parts.append(f"PCA-whitening {self.whitening.dim}" + (" (raw)" if self.whitening.raw else ""))
        if self.gem_p is not None:
            parts.insert(0, f"GeM p {self.gem_p:g}")
        if self.score_norm_beta:
            s = self.score_normalization
            parts.append(f"score normalisation (beta {s.beta:g}, k {s.k})")
        return " + ".join(parts) or "no post-processing"
