"""Scoring of the per-epoch evaluation: the gathered benchmark descriptors -> matching -> metrics.

The same :func:`isc.evaluation.matching.match_descriptors` and settings object as ``task=evaluate``, so
the ``val/uAP`` logged for a checkpoint is the uAP evaluating it prints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from isc.data.images import Disc21Layout
from isc.evaluation.matching import match_descriptors
from isc.evaluation.results import EvaluationResult
from isc.evaluation.settings import EvaluationSettings

SPLITS = ("queries", "references", "training")
"""The order the callback lays the splits' images out in, before sharding them over the ranks."""


def score_benchmark(
    layout: Disc21Layout,
    paths: dict[str, list[Path]],
    descriptors: np.ndarray,
    settings: EvaluationSettings,
) -> EvaluationResult:
    """Match the descriptors of every split (concatenated in :data:`SPLITS` order) and score them."""
    ids, parts, start = {}, {}, 0
    for split in SPLITS:
        if split in paths:
            n = len(paths[split])
            ids[split] = np.asarray([p.stem for p in paths[split]])
            parts[split], start = descriptors[start : start + n], start + n
    return match_descriptors(
        ids["queries"],
        parts["queries"],
        ids["references"],
        parts["references"],
        parts.get("training"),
        layout.ground_truth(),
        settings,
        training_ids=ids.get("training"),
    )
