"""Combining many view-level scores into one score per (query, reference): D2LV's aggregation rules.

D2LV's test stage scores every *view* of a query (original, rotations, crops, region proposals, overlay
regions) against every view of a reference (whole image, or its 19 crops), at several scales and with
several models, then combines those rows. The rules, from the seed's code
(``WangWenhao0716/ISC-Track1-Submission``, ``Test/``):

- ``Test/final/combine.py``: rows of non-original views lose a fixed ``penalty`` (0.05) so a crop only
  wins when it is clearly better than the whole query;
- ``Test/final/V5_*/aggregate.py``: an ensemble keeps the rows whose (query view, reference view) pair at
  least 2 of the 3 models return, pooling the rows of the models that agree;
- ``Test/aggnew_1.py`` + the script writing ``final_50k.csv`` + ``Test/aggnew_2.py``: per image pair, the
  mean of its best and second-best distinct scores (the best alone when there is one);
- ``Test/submit.py``: the 500,000 best pairs overall.

Everything here is vectorised numpy over a :class:`Candidates` table (one row per scored view pair);
there is no per-pair Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

__all__ = [
    "Candidates",
    "PairScores",
    "aggregate_pairs",
    "keep_voted",
    "mean_over_models",
    "merge_topk",
    "view_penalty",
]

VoteKey = Literal["view", "image"]


@dataclass(frozen=True)
class Candidates:
    """Scored (query view, reference view) rows; all columns (n,).

    ``query`` / ``reference``: image indices (int32, like every index column); ``query_view``: index into the run's table of query views
    (shared by every model and scale, so it also identifies the query); ``reference_view``: 0 for a row of
    the query views' search against whole references, ``1 + i`` for a row of the reference-crop search
    against crop ``i`` of the reference's 19 (``i = 0``: the whole image; seed ``dividing.py``'s ``_i``);
    ``scale`` and ``model``: small integers naming where the row came from.
    """

    query: np.ndarray
    reference: np.ndarray
    score: np.ndarray
    query_view: np.ndarray
    reference_view: np.ndarray
    scale: np.ndarray
    model: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.score)
        for f in fields(self):
            column = np.asarray(getattr(self, f.name))
            if column.shape != (n,):
                raise ValueError(f"candidate column {f.name} has shape {column.shape}, expected ({n},)")
            dtype = np.float32 if f.name == "score" else np.int32  # 28 bytes a row: tens of millions fit
            object.__setattr__(self, f.name, column.astype(dtype, copy=False))

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def empty(cls) -> Candidates:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, np.zeros(0, dtype=np.float32), z, z, z, z)

    @classmethod
    def concat(cls, parts: Sequence[Candidates]) -> Candidates:
        if not parts:
            return cls.empty()
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def take(self, rows: np.ndarray) -> Candidates:
        """The rows selected by a boolean mask or an index array."""
        return Candidates(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def with_scores(self, score: np.ndarray) -> Candidates:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["score"] = score
        return Candidates(**values)


def _group(keys: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """A dense group id per row for the tuple of integer ``keys``, and the number of groups; ids follow the
    keys' lexicographic order. The keys are packed into one int64 (mixed radix over each key's range)
    when their ranges allow, so the sort is a 1-d one: 6x faster than ``np.unique(axis=0)`` on rows."""
    columns = [np.asarray(k, dtype=np.int64) for k in keys]
    if len(columns[0]) == 0:
        return np.zeros(0, dtype=np.int64), 0
    packed, span = np.zeros(len(columns[0]), dtype=np.int64), 1
    for column in columns:
        low, width = int(column.min()), int(column.max()) - int(column.min()) + 1
        span *= width
        if span >= 2**62:  # too wide to pack: sort the rows themselves
            _, inverse = np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            return inverse, int(inverse.max()) + 1
        packed = packed * width + (column - low)
    _, inverse = np.unique(packed, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def _vote_keys(c: Candidates, on: VoteKey) -> list[np.ndarray]:
    if on == "view":
        return [c.query_view, c.reference, c.reference_view, c.scale]
    if on == "image":
        return [c.query, c.reference]
    raise ValueError(f"evaluation.ensemble.vote_on must be view or image, got {on!r}")


def keep_voted(
    candidates: Candidates,
    min_votes: int | np.ndarray,
    on: VoteKey = "view",
    family: np.ndarray | None = None,
) -> np.ndarray:
    """A (n,) mask of the rows whose pair at least ``min_votes`` distinct models return (D2LV: 2 of 3 for
    the query views' rows, ``Test/final/V5_*/aggregate.py``; 3 of 3 for the reference crops' rows,
    ``Test/final/V5_baseline_CC_ref/aggregate.py:38-40``). ``min_votes``: one number, or one per row.
    ``family`` (n,): each row's model family; models vote only with their own family's (D2LV's 11
    families each vote 2 of 3, ``Test/final/V5_*/aggregate.py``, and ``combine.py`` pools the results).

    ``on="view"`` votes on (query view, reference, reference view, scale) as the seed does (its ids carry
    the crop suffix); ``on="image"`` votes on the image pair whatever view produced it. The seed keeps
    every agreeing model's row and lets the later max / top-2 decide (``combine: pool``).
    """
    if np.any(np.asarray(min_votes) < 1):
        raise ValueError(f"evaluation.ensemble.min_votes must be >= 1, got {min_votes}")
    c = candidates
    if len(c) == 0:
        return np.zeros(0, dtype=bool)
    keys = _vote_keys(c, on) + ([] if family is None else [np.asarray(family)])
    group, n_groups = _group(keys)
    model_group, _ = _group([group, c.model])  # one id per (key, model)
    first_of_model = np.unique(model_group, return_index=True)[1]
    votes = np.bincount(group[first_of_model], minlength=n_groups)
    return votes[group] >= min_votes


def mean_over_models(candidates: Candidates, on: VoteKey = "view") -> tuple[Candidates, np.ndarray]:
    """One row per vote key scored by the mean over models of each model's best score for it.

    Returns the new rows and, for each, the index of the input row it stands for (``combine: mean``).
    """
    c = candidates
    if len(c) == 0:
        return c, np.zeros(0, dtype=np.int64)
    group, n_groups = _group(_vote_keys(c, on))
    per_model, n_pm = _group([group, c.model])
    best = np.full(n_pm, -np.inf)
    np.maximum.at(best, per_model, c.score.astype(np.float64))
    pm_group = group[np.unique(per_model, return_index=True)[1]]
    mean = np.bincount(pm_group, weights=best, minlength=n_groups) / np.bincount(pm_group, minlength=n_groups)
    representative = np.unique(group, return_index=True)[1]
    rows = c.take(representative)
    return rows.with_scores(mean[group[representative]].astype(np.float32)), representative


def view_penalty(penalty_free_view: np.ndarray, reference_view: np.ndarray, penalty: float) -> np.ndarray:
    """(n,) float32: ``penalty`` for rows whose query view is not penalty-free or that come from the
    reference-crop search (``reference_view > 0``, its whole-image rows too), else 0 (seed
    ``Test/final/combine.py:85-92``: 0.05 off every row whose query id is not ``_0`` or a detection).

    ``penalty_free_view`` (n,) bool: the row's query view is of a penalty-free kind.
    """
    penalised = ~np.asarray(penalty_free_view, dtype=bool) | (np.asarray(reference_view) != 0)
    return np.where(penalised, np.float32(penalty), np.float32(0.0))


@dataclass(frozen=True)
class PairScores:
    """One score per (query, reference) image pair; ``row`` is the candidate row of its best view pair."""

    query: np.ndarray
    reference: np.ndarray
    score: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def concat(cls, parts: Sequence[PairScores]) -> PairScores:
        if not parts:
            z = np.zeros(0, dtype=np.int64)
            return cls(z, z, np.zeros(0, dtype=np.float32), z)
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def top(self, n: int) -> PairScores:
        """The ``n`` best pairs overall (the official 500,000 cap), best first, ties by (query, reference)."""
        order = np.lexsort((self.reference, self.query, -self.score.astype(np.float64)))[:n]
        return PairScores(self.query[order], self.reference[order], self.score[order], self.row[order])


def aggregate_pairs(candidates: Candidates, top: int = 2) -> PairScores:
    """Per image pair: the mean of its ``top`` best *distinct* row scores.

    ``top=1`` is a plain max over views, scales and models; ``top=2`` is the seed's rule (a pair found
    once keeps its score). Equal scores count once, as the seed's ``drop_duplicates`` does. ``row`` of
    each pair is the input row of its best score.
    """
    if top < 1:
        raise ValueError(f"evaluation.local_verification.top must be >= 1, got {top}")
    c = candidates
    if len(c) == 0:
        z = np.zeros(0, dtype=np.int64)
        return PairScores(z, z, np.zeros(0, dtype=np.float32), z)
    score = c.score.astype(np.float64)
    order = np.lexsort((-score, c.reference, c.query))  # by pair, best first
    q, r, s = c.query[order], c.reference[order], score[order]
    new_pair = np.r_[True, (q[1:] != q[:-1]) | (r[1:] != r[:-1])]
    distinct = new_pair | np.r_[True, s[1:] != s[:-1]]
    pair = np.cumsum(new_pair) - 1
    # rank of each distinct score inside its pair: 0 = best
    distinct_rank = np.cumsum(distinct) - 1
    pair_start_rank = distinct_rank[np.flatnonzero(new_pair)]
    rank = distinct_rank - pair_start_rank[pair]
    use = distinct & (rank < top)
    n_pairs = int(pair[-1]) + 1
    total = np.bincount(pair[use], weights=s[use], minlength=n_pairs)
    count = np.bincount(pair[use], minlength=n_pairs)
    first = np.flatnonzero(new_pair)
    return PairScores(q[first], r[first], (total / count).astype(np.float32), order[first])


def merge_topk(
    sims: np.ndarray, idx: np.ndarray, new_sims: np.ndarray, new_idx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two (n, *) kNN results into the ``k`` best per row: searching references block by block."""
    all_sims = np.concatenate([sims, new_sims], axis=1)
    all_idx = np.concatenate([idx, new_idx], axis=1)
    if all_sims.shape[1] > k:
        part = np.argpartition(-all_sims, k - 1, axis=1)[:, :k]
        all_sims = np.take_along_axis(all_sims, part, axis=1)
        all_idx = np.take_along_axis(all_idx, part, axis=1)
    order = np.lexsort((all_idx, -all_sims), axis=1)
    return np.take_along_axis(all_sims, order, axis=1), np.take_along_axis(all_idx, order, axis=1)
