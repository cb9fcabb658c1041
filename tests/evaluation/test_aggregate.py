"""D2LV's aggregation rules on hand-built score tables, each checked against a slow per-pair loop."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from isc.evaluation.aggregate import (
    Candidates,
    aggregate_pairs,
    keep_voted,
    mean_over_models,
    merge_topk,
    view_penalty,
)


def table(rows: list[tuple[int, int, float, int, int, int, int]]) -> Candidates:
    """rows of (query, reference, score, query_view, reference_view, scale, model)."""
    cols = list(zip(*rows, strict=True)) if rows else [()] * 7
    return Candidates(*(np.array(c) for c in cols))


def test_max_and_mean_of_top_two_on_a_hand_built_table():
    c = table(
        [
            (0, 5, 0.9, 0, 0, 0, 0),  # pair (0, 5): 0.9, 0.7, 0.7, 0.2 -> top-2 distinct = (0.9 + 0.7) / 2
            (0, 5, 0.7, 1, 0, 0, 0),
            (0, 5, 0.7, 2, 0, 0, 0),
            (0, 5, 0.2, 3, 0, 0, 0),
            (0, 6, 0.4, 1, 0, 0, 0),  # found once: keeps its score
            (1, 5, 0.3, 4, 0, 0, 0),
            (1, 5, 0.3, 5, 0, 0, 0),  # equal scores count once (the seed's drop_duplicates)
        ]
    )
    top2 = aggregate_pairs(c, top=2)
    got = {(int(q), int(r)): float(s) for q, r, s in zip(top2.query, top2.reference, top2.score, strict=True)}
    assert got == pytest.approx({(0, 5): 0.8, (0, 6): 0.4, (1, 5): 0.3})
    top1 = aggregate_pairs(c, top=1)
    got1 = {
        (int(q), int(r)): float(s) for q, r, s in zip(top1.query, top1.reference, top1.score, strict=True)
    }
    assert got1 == pytest.approx({(0, 5): 0.9, (0, 6): 0.4, (1, 5): 0.3})
    # the evidence row is the best row of the pair
    best = dict(
        zip(zip(top2.query.tolist(), top2.reference.tolist(), strict=True), top2.row.tolist(), strict=True)
    )
    assert best[(0, 5)] == 0 and best[(0, 6)] == 4


@pytest.mark.parametrize("top", [1, 2, 3])
def test_aggregation_matches_a_per_pair_loop(top):
    rng = np.random.default_rng(top)
    n = 400
    c = Candidates(
        rng.integers(0, 6, n),
        rng.integers(0, 5, n),
        np.round(rng.random(n), 2).astype(np.float32),  # rounding makes ties
        rng.integers(0, 30, n),
        rng.integers(0, 19, n),
        rng.integers(0, 2, n),
        rng.integers(0, 3, n),
    )
    scores = defaultdict(set)
    for q, r, s in zip(c.query, c.reference, c.score, strict=True):
        scores[(int(q), int(r))].add(float(s))
    expected = {k: float(np.mean(sorted(v, reverse=True)[:top])) for k, v in scores.items()}
    pairs = aggregate_pairs(c, top=top)
    got = {
        (int(q), int(r)): float(s) for q, r, s in zip(pairs.query, pairs.reference, pairs.score, strict=True)
    }
    assert got == pytest.approx(expected, abs=1e-6)


def test_penalty_spares_the_original_and_overlay_views():
    kinds = np.array(["original", "rotation", "crop", "proposal", "overlay", "original"])
    ref_view = np.array([0, 0, 0, 0, 0, 3])
    pen = view_penalty(np.isin(kinds, ["original", "overlay"]), ref_view, 0.05)
    np.testing.assert_allclose(pen, [0, 0.05, 0.05, 0.05, 0, 0.05])


def test_two_of_three_voting_keeps_pairs_two_models_return():
    # key = (query view, reference, reference view, scale); models 0, 1, 2
    c = table(
        [
            (0, 1, 0.9, 0, 0, 0, 0),  # (view 0, ref 1) returned by models 0 and 1 -> kept, both rows
            (0, 1, 0.8, 0, 0, 0, 1),
            (0, 2, 0.7, 0, 0, 0, 0),  # only model 0 (twice: two rows of one model are one vote) -> dropped
            (0, 2, 0.6, 0, 0, 0, 0),
            (0, 2, 0.5, 1, 0, 0, 1),  # same image pair, another view: a different key under on="view"
            (1, 3, 0.4, 2, 0, 0, 0),  # all three models -> kept
            (1, 3, 0.3, 2, 0, 0, 1),
            (1, 3, 0.2, 2, 0, 0, 2),
        ]
    )
    np.testing.assert_array_equal(keep_voted(c, 2, on="view"), [1, 1, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(keep_voted(c, 3, on="view"), [0, 0, 0, 0, 0, 1, 1, 1])
    # voting on the image pair: (0, 2) now has models 0 and 1
    np.testing.assert_array_equal(keep_voted(c, 2, on="image"), [1, 1, 1, 1, 1, 1, 1, 1])
    assert keep_voted(c, 1).all()
    with pytest.raises(ValueError, match="min_votes"):
        keep_voted(c, 0)


def test_reference_crop_rows_need_their_own_number_of_votes():
    """D2LV: query views' rows 2 of 3 (V5_*/aggregate.py), reference-crop rows 3 of 3 (V5_baseline_CC_ref)."""
    c = table(
        [
            (0, 1, 0.9, 0, 0, 0, 0),  # views' search, two models -> kept at 2
            (0, 1, 0.8, 0, 0, 0, 1),
            (0, 1, 0.7, 0, 3, 0, 0),  # crop search (crop 2), two models -> dropped at 3
            (0, 1, 0.6, 0, 3, 0, 1),
            (0, 2, 0.5, 0, 1, 0, 0),  # crop search, whole reference, three models -> kept
            (0, 2, 0.4, 0, 1, 0, 1),
            (0, 2, 0.3, 0, 1, 0, 2),
        ]
    )
    need = np.where(c.reference_view > 0, 3, 2)
    np.testing.assert_array_equal(keep_voted(c, need, on="view"), [1, 1, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="min_votes"):
        keep_voted(c, np.where(c.reference_view > 0, 0, 2))


def test_mean_over_models_averages_each_models_best_score():
    c = table(
        [(0, 1, 0.9, 0, 0, 0, 0), (0, 1, 0.5, 0, 0, 0, 0), (0, 1, 0.7, 0, 0, 0, 1), (2, 3, 0.1, 4, 0, 0, 2)]
    )
    rows, representative = mean_over_models(c, on="view")
    got = {(int(q), int(r)): float(s) for q, r, s in zip(rows.query, rows.reference, rows.score, strict=True)}
    assert got == pytest.approx({(0, 1): 0.8, (2, 3): 0.1})
    assert set(representative.tolist()) <= set(range(len(c)))


def test_top_keeps_the_best_pairs_overall():
    rng = np.random.default_rng(0)
    n = 1000
    c = Candidates(
        np.arange(n) // 10,
        np.arange(n) % 10,
        rng.random(n).astype(np.float32),
        np.arange(n),
        np.zeros(n),
        np.zeros(n),
        np.zeros(n),
    )
    pairs = aggregate_pairs(c, top=1).top(300)
    assert len(pairs) == 300
    assert np.all(np.diff(pairs.score) <= 0)
    assert pairs.score.min() >= np.sort(c.score)[-300]
    assert len(set(zip(pairs.query.tolist(), pairs.reference.tolist(), strict=True))) == 300


def test_merge_topk_equals_a_search_over_all_blocks():
    rng = np.random.default_rng(1)
    sims = rng.random((7, 12)).astype(np.float32)
    blocks = [(sims[:, :5], np.arange(5)), (sims[:, 5:9], np.arange(5, 9)), (sims[:, 9:], np.arange(9, 12))]
    k = 4
    best = (np.full((7, k), -np.inf, np.float32), np.full((7, k), -1))
    for s, cols in blocks:
        order = np.argsort(-s, axis=1)[:, :k]
        best = merge_topk(*best, np.take_along_axis(s, order, 1), cols[order], k)
    expected = np.argsort(-sims, axis=1)[:, :k]
    np.testing.assert_array_equal(best[1], expected)
    np.testing.assert_allclose(best[0], np.take_along_axis(sims, expected, 1))


@pytest.mark.parametrize("wide", [False, True])
def test_group_ids_follow_the_keys_lexicographic_order(wide: bool) -> None:
    """The packed int64 grouping (and its fallback for keys too wide to pack) numbers the groups as
    ``np.unique`` over the stacked rows does."""
    from isc.evaluation.aggregate import _group

    rng = np.random.default_rng(0)
    high = 2**40 if wide else 50
    keys = [rng.integers(-3, high, 5000), rng.integers(0, 7, 5000), rng.integers(10**6, 10**6 + high, 5000)]
    ids, n = _group(keys)
    _, expected = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
    np.testing.assert_array_equal(ids, expected.reshape(-1))
    assert n == len(np.unique(np.stack(keys, axis=1), axis=0))
