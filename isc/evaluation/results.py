"""The one result type of matching: what ``metrics.json``, the report, wandb and the callback all read.

Global matching (:func:`isc.evaluation.matching.match_descriptors`) and D2LV's test stage
(:func:`isc.evaluation.inference.run_test_stage`) both return an :class:`EvaluationResult`: a list of
cumulative stages (the last is final), the plain-descriptor figures beside them, and the post-processed
descriptors that go into ``descriptors.h5``. Nothing downstream reshapes it into another type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from isc.evaluation.metrics import Metrics
from isc.formats.pairs import Predictions

__all__ = ["METRIC_NAMES", "EvaluationResult", "Evidence", "GridResult", "StageResult"]

METRIC_NAMES = ("uAP", "recall_at_p90", "recall_at_rank1", "recall_at_rank10")
"""The headline figures, in the order every table shows them."""


@dataclass(frozen=True)
class Evidence:
    """Where the winning score of a pair came from, so a reader can see *what* the detector matched.

    Boxes are ``(x0, y0, x1, y1)`` in the pixels of the original image; ``None`` means the whole frame.
    """

    query_box: tuple[int, int, int, int] | None = None
    reference_box: tuple[int, int, int, int] | None = None
    label: str = ""


@dataclass(frozen=True)
class StageResult:
    """One step of the pipeline: its predictions, their official metrics (``None`` without ground truth)
    and its cost per query, so a table can show what each step adds."""

    name: str
    predictions: Predictions
    metrics: Metrics | None = None
    seconds_per_query: float | None = None

    @property
    def figures(self) -> dict[str, float | None]:
        """The headline figures by name; ``None`` where undefined or unscored."""
        values = self.metrics.to_dict() if self.metrics is not None else {}
        return {k: values.get(k) for k in METRIC_NAMES}


@dataclass(frozen=True)
class GridResult:
    """Every stage under one ``evaluation.grid`` post-processing setting, scored on the run's extraction;
    ``seconds``: what scoring it added (post-processing fits, searches, aggregation; no extraction)."""

    name: str
    postprocessing: str
    stages: list[StageResult]
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "postprocessing": self.postprocessing,
            "seconds": self.seconds,
            "stages": {st.name: st.figures for st in self.stages},
        }


@dataclass
class EvaluationResult:
    """Every stage (the last is final), the raw figures, and the post-processed descriptors.

    ``raw_metrics`` score L2-normalised descriptors without whitening or score normalisation (``None``
    when nothing is configured: they would equal the final ones). ``query`` / ``reference`` /
    ``training`` are the post-processed global descriptors (one per image, ids beside them) that the
    descriptor-track file holds. ``evidence`` maps a predicted pair to the views behind its score.
    """

    stages: list[StageResult]
    postprocessing: str
    query_ids: np.ndarray
    query: np.ndarray
    reference_ids: np.ndarray
    reference: np.ndarray
    training_ids: np.ndarray | None = None
    training: np.ndarray | None = None
    raw_metrics: Metrics | None = None
    evidence: Mapping[tuple[str, str], Evidence] | None = field(default=None, repr=False)
    rows: Any = field(default=None, repr=False)  # the test stage's candidate rows (inference.TestStageRows)
    search: dict[str, Any] | None = None  # an approximate index: its string and measured recall@k
    grid: list[GridResult] = field(default_factory=list)  # evaluation.grid, in its order

    @property
    def final(self) -> StageResult:
        return self.stages[-1]

    @property
    def predictions(self) -> Predictions:
        return self.final.predictions

    @property
    def metrics(self) -> Metrics | None:
        return self.final.metrics

    def headline(self, prefix: str = "") -> dict[str, float]:
        """``<prefix>uAP`` etc. with the configured post-processing and ``<prefix>uAP_raw`` without it.

        The one key naming every task uses (``task=evaluate`` with no prefix, the callback with ``val/``).
        Undefined figures (recall at P90 never reached) are reported as 0 so curves stay continuous.
        """
        if self.metrics is None:
            return {}
        final = self.metrics.to_dict()
        raw = (self.raw_metrics or self.metrics).to_dict()
        out = {f"{prefix}{k}": float(final[k] or 0.0) for k in METRIC_NAMES}
        out.update({f"{prefix}{k}_raw": float(raw[k] or 0.0) for k in METRIC_NAMES})
        return out

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` holds: the headline, the post-processing, and every stage when several."""
        staged = len(self.stages) > 1 or self.stages[0].seconds_per_query is not None
        out: dict[str, Any] = {
            k: v for k, v in self.headline().items() if not (staged and k.endswith("_raw"))
        }  # the test stage's plain-descriptor figure is its first stage
        out["postprocessing"] = self.postprocessing
        if staged:
            out["stages"] = {
                st.name: {
                    **(st.figures if st.metrics is not None else {}),
                    "seconds_per_query": st.seconds_per_query,
                    "num_predictions": len(st.predictions),
                }
                for st in self.stages
            }
        out["num_predictions"] = len(self.predictions)
        if self.search is not None:
            out["search"] = self.search
        if self.grid:
            out["grid"] = {g.name: g.summary() for g in self.grid}
        return out
