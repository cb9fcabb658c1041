"""Searches that see the database a block at a time: the test stage's references and training set.

A block is extracted, post-processed, searched and dropped, so 1M references with 19 crops each (or D2LV's
1M training images) never have to fit. Two rules collect candidates over the blocks:
:class:`TopK` (``evaluation.candidates=topk``: each query view keeps its running top-k) and :class:`Range`
(``candidates=range``: the official capped range rule, :class:`isc.evaluation.search.CappedRange`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from isc.evaluation.aggregate import merge_topk
from isc.evaluation.postprocess import fold_score_normalization
from isc.evaluation.search import CappedRange, knn
from isc.evaluation.settings import EvaluationSettings

__all__ = ["Range", "TopK", "empty_topk", "knn_into", "searcher"]


def empty_topk(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A running top-k of ``n`` queries before any block: similarities -inf, indices -1."""
    return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)


def knn_into(
    best: tuple[np.ndarray, np.ndarray],
    queries: np.ndarray,
    refs: np.ndarray,
    rows: np.ndarray,
    k: int,
    search: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``refs`` (whose global row numbers are ``rows``) and merge into the running top-k ``best``;
    ``search``: :func:`isc.evaluation.search.knn`'s backend and device."""
    sims, idx = knn(queries, refs, k, **search)
    idx = np.where(idx >= 0, rows[np.maximum(idx, 0)], -1)
    return merge_topk(*best, sims, idx, k)


class TopK:
    """``evaluation.candidates=topk``: each query view's ``k`` best reference rows over the blocks,
    scores score-normalised at the end (minus the view's ``bias``)."""

    def __init__(self, queries: np.ndarray, bias: np.ndarray | None, s: EvaluationSettings) -> None:
        self.queries, self.bias, self.k, self.search = queries, bias, s.k, s.search
        self.best = empty_topk(len(queries), s.k)

    def add(self, refs: np.ndarray, rows: np.ndarray) -> None:
        self.best = knn_into(self.best, self.queries, refs, rows, self.k, self.search)

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query view, reference row, score) of every neighbour found."""
        sims, idx = self.best
        if self.bias is not None:
            sims = sims - self.bias[:, None]
        view, j = np.nonzero(idx >= 0)
        return view, idx[view, j], sims[view, j]


class Range:
    """``evaluation.candidates=range``: the official rule over the blocks, at most ``max_results`` pairs a
    model and search (D2LV: 1M), on score-normalised scores (the bias folded into the vectors)."""

    def __init__(self, queries: np.ndarray, bias: np.ndarray | None, s: EvaluationSettings) -> None:
        self.bias = bias
        folded = queries if bias is None else fold_score_normalization(queries, queries[:0], bias)[0]
        self.capped = CappedRange(folded, s.max_results, **s.search)

    def add(self, refs: np.ndarray, rows: np.ndarray) -> None:
        if self.bias is not None:
            refs = fold_score_normalization(refs[:0], refs, self.bias[:0])[1]
        self.capped.add(refs, rows)

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query view, reference row, score) of every pair kept."""
        return self.capped.result()


def searcher(queries: np.ndarray, bias: np.ndarray | None, s: EvaluationSettings) -> TopK | Range:
    """The configured rule's search of ``queries`` (post-processed) with their score-normalisation bias."""
    return TopK(queries, bias, s) if s.candidates == "topk" else Range(queries, bias, s)
