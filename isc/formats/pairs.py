"""Containers for scored (query, reference) pairs and ground truth.

Both hold plain numpy arrays of ids so that metrics and I/O stay vectorised: a DISC21 run has up to
500,000 predictions and 50,000 ground-truth rows, far too many for per-pair Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GroundTruth", "Predictions", "pair_codes"]


def _as_str_array(values: object, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype="<U1")
    if array.dtype.kind == "S":
        array = np.char.decode(array, "ascii")
    elif array.dtype.kind != "U":
        array = array.astype(str)
    return array


@dataclass(frozen=True)
class Predictions:
    """Scored candidate pairs, one row per (query, reference); higher score = more confident copy.

    Shapes: ``query_ids`` (N,), ``reference_ids`` (N,), ``scores`` (N,) float64.
    """

    query_ids: np.ndarray
    reference_ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        query_ids = _as_str_array(self.query_ids, "query_ids")
        reference_ids = _as_str_array(self.reference_ids, "reference_ids")
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if not (len(query_ids) == len(reference_ids) == len(scores)):
            raise ValueError(
                f"predictions columns differ in length: {len(query_ids)} query ids, "
                f"{len(reference_ids)} reference ids, {len(scores)} scores"
            )
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{bad.size} prediction score(s) are NaN or infinite, first at row {i} "
                f"({query_ids[i]}, {reference_ids[i]}): {scores[i]}"
            )
        empty = np.flatnonzero((np.char.str_len(query_ids) == 0) | (np.char.str_len(reference_ids) == 0))
        if empty.size:
            raise ValueError(
                f"{empty.size} prediction(s) have an empty query or reference id, first at row {empty[0]}"
            )
        object.__setattr__(self, "query_ids", query_ids)
        object.__setattr__(self, "reference_ids", reference_ids)
        object.__setattr__(self, "scores", scores)

    def __len__(self) -> int:
        return len(self.scores)

    def duplicate_pairs(self) -> list[tuple[str, str]]:
        """The (query, reference) pairs that occur more than once (the official evaluation rejects them)."""
        codes = pair_codes(self.query_ids, self.reference_ids)
        _, first, counts = np.unique(codes, return_index=True, return_counts=True)
        rows = np.sort(first[counts > 1])
        return [(str(self.query_ids[i]), str(self.reference_ids[i])) for i in rows]

    def check_no_duplicates(self) -> None:
        dups = self.duplicate_pairs()
        if dups:
            shown = ", ".join(f"({q}, {r})" for q, r in dups[:5])
            raise ValueError(f"predictions contain {len(dups)} duplicate (query, reference) pair(s): {shown}")

    def top(self, n: int) -> Predictions:
        """The ``n`` highest-scoring rows (the official cap keeps 500,000)."""
        if n >= len(self):
            return self
        keep = np.sort(np.argsort(-self.scores, kind="stable")[:n])
        return Predictions(self.query_ids[keep], self.reference_ids[keep], self.scores[keep])


@dataclass(frozen=True)
class GroundTruth:
    """DISC21 ground truth: every listed query, and its reference id or ``""`` when it has no match.

    Shapes: ``query_ids`` (M,), ``reference_ids`` (M,). A query may appear once per matching reference.
    """

    query_ids: np.ndarray
    reference_ids: np.ndarray

    def __post_init__(self) -> None:
        query_ids = _as_str_array(self.query_ids, "query_ids")
        reference_ids = _as_str_array(self.reference_ids, "reference_ids")
        if len(query_ids) != len(reference_ids):
            raise ValueError(
                f"ground truth has {len(query_ids)} query ids but {len(reference_ids)} reference ids"
            )
        if np.any(np.char.str_len(query_ids) == 0):
            raise ValueError("ground truth has a row with an empty query id")
        object.__setattr__(self, "query_ids", query_ids)
        object.__setattr__(self, "reference_ids", reference_ids)
        codes = pair_codes(query_ids, reference_ids)
        uniq, counts = np.unique(codes, return_counts=True)
        if np.any(counts > 1):
            first = int(np.flatnonzero(np.isin(codes, uniq[counts > 1]))[0])
            raise ValueError(
                f"ground truth lists the pair ({query_ids[first]}, {reference_ids[first] or '<no match>'}) "
                "more than once"
            )
        matched_queries = np.unique(query_ids[self.matched])
        conflicting = np.isin(query_ids[~self.matched], matched_queries)
        if np.any(conflicting):
            q = query_ids[~self.matched][conflicting][0]
            raise ValueError(f"ground truth lists query {q} both without a match and with a match")

    @property
    def matched(self) -> np.ndarray:
        """Boolean mask (M,) of rows that name a reference."""
        return np.char.str_len(self.reference_ids) > 0

    @property
    def num_positives(self) -> int:
        return int(self.matched.sum())

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The matched (query, reference) pairs, each as an id array (P,)."""
        mask = self.matched
        return self.query_ids[mask], self.reference_ids[mask]

    def __len__(self) -> int:
        return len(self.query_ids)


def pair_codes(query_ids: np.ndarray, reference_ids: np.ndarray) -> np.ndarray:
    """Encode (query, reference) id pairs as int64 codes (N,) that are equal iff the pairs are equal."""
    _, q_inv = np.unique(np.asarray(query_ids), return_inverse=True)
    r_vocab, r_inv = np.unique(np.asarray(reference_ids), return_inverse=True)
    return q_inv.astype(np.int64) * max(len(r_vocab), 1) + r_inv.astype(np.int64)
