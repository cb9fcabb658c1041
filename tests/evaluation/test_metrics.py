"""The official ISC metrics: hand-worked cases and a slow pure-Python reference on random sets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from isc.evaluation.metrics import check_prediction_queries, evaluate, main, match_ranks
from isc.formats.pairs import GroundTruth, Predictions


def gt(rows: list[tuple[str, str]]) -> GroundTruth:
    return GroundTruth([q for q, _ in rows], [r for _, r in rows])


def preds(rows: list[tuple[str, str, float]]) -> Predictions:
    return Predictions([q for q, _, _ in rows], [r for _, r, _ in rows], [s for _, _, s in rows])


# --- hand-worked cases -------------------------------------------------------------------------------

GT3 = gt([("Q0", "R0"), ("Q1", "R1"), ("Q2", "R2"), ("Q3", "")])


def test_perfect_ranking() -> None:
    m = evaluate(GT3, preds([("Q0", "R0", 0.9), ("Q1", "R1", 0.8), ("Q2", "R2", 0.7), ("Q3", "R5", 0.1)]))
    assert m.uAP == pytest.approx(1.0)
    assert m.recall_at_p90 == pytest.approx(1.0)
    assert m.threshold_at_p90 == pytest.approx(0.7)
    assert m.recall_at_rank1 == pytest.approx(1.0)


def test_hand_worked_interleaved() -> None:
    # Ranked: TP, FP, TP, FP  with P = 3 ground-truth pairs (Q2 never predicted).
    # precision: 1, 1/2, 2/3, 2/4 ; recall: 1/3, 1/3, 2/3, 2/3
    # uAP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    m = evaluate(GT3, preds([("Q0", "R0", 0.9), ("Q3", "R0", 0.8), ("Q1", "R1", 0.7), ("Q0", "R9", 0.6)]))
    assert m.uAP == pytest.approx(5 / 9, abs=1e-15)
    assert m.recall_at_p90 == pytest.approx(1 / 3)  # only the first point reaches precision 0.9
    assert m.threshold_at_p90 == pytest.approx(0.9)
    # Q0: true match is its best prediction; Q1: rank 0; Q2: never predicted.
    assert m.recall_at_rank1 == pytest.approx(2 / 3)
    assert m.recall_at_rank10 == pytest.approx(2 / 3)


def test_ties_are_pessimistic() -> None:
    # A true and a wrong pair share the top score: the wrong one is ranked first.
    m = evaluate(gt([("Q0", "R0")]), preds([("Q0", "R0", 0.5), ("Q0", "R1", 0.5)]))
    assert m.uAP == pytest.approx(0.5)  # precision at the true match is 1/2
    assert m.recall_at_p90 is None and m.threshold_at_p90 is None
    assert m.recall_at_rank1 == 0.0  # rank counts every prediction with score >= the true one
    assert m.recall_at_rank10 == 1.0


def test_all_scores_equal_gives_worst_case() -> None:
    # 2 true among 6 predictions, constant score: both true pairs are ranked last.
    ground_truth = gt([("Q0", "R0"), ("Q1", "R1")])
    rows = [("Q0", "R0", 1.0), ("Q1", "R1", 1.0)] + [(f"Q{i}", "R7", 1.0) for i in range(2, 6)]
    m = evaluate(ground_truth, preds(rows))
    # points: ... TP at 5 (prec 1/5, rec 1/2), TP at 6 (prec 2/6, rec 1)
    assert m.uAP == pytest.approx(0.5 * 1 / 5 + 0.5 * 2 / 6)
    assert m.recall_at_p90 is None


def test_no_match_found() -> None:
    m = evaluate(GT3, preds([("Q0", "R1", 0.9), ("Q3", "R3", 0.5)]))
    assert m.uAP == 0.0
    assert m.recall_at_p90 is None and m.threshold_at_p90 is None
    assert m.recall_at_rank1 == 0.0 and m.recall_at_rank10 == 0.0


def test_empty_predictions() -> None:
    m = evaluate(GT3, preds([]))
    assert m.uAP == 0.0 and m.recall_at_p90 is None and m.recall_at_rank10 == 0.0


def test_query_never_predicted_counts_against_recall() -> None:
    m = evaluate(GT3, preds([("Q0", "R0", 0.9)]))
    assert m.uAP == pytest.approx(1 / 3)
    assert m.recall_at_p90 == pytest.approx(1 / 3)
    assert m.recall_at_rank1 == pytest.approx(1 / 3)


def test_duplicate_prediction_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"duplicate.*\(Q0, R0\)"):
        evaluate(GT3, preds([("Q0", "R0", 0.9), ("Q1", "R1", 0.8), ("Q0", "R0", 0.1)]))


def test_duplicate_ground_truth_is_an_error() -> None:
    with pytest.raises(ValueError, match="more than once"):
        gt([("Q0", "R0"), ("Q0", "R0")])


def test_nan_score_is_an_error() -> None:
    with pytest.raises(ValueError, match="NaN"):
        preds([("Q0", "R0", float("nan"))])


def test_ground_truth_without_matches_gives_none() -> None:
    m = evaluate(gt([("Q0", ""), ("Q1", "")]), preds([("Q0", "R0", 1.0)]))
    assert m.uAP is None and m.recall_at_rank1 is None


def test_rank_counts_predictions_of_the_same_query_only() -> None:
    ground_truth = gt([("Q0", "R0"), ("Q1", "R1")])
    p = preds(
        [("Q1", "R5", 0.99), ("Q0", "R3", 0.95), ("Q0", "R0", 0.9), ("Q1", "R1", 0.95), ("Q0", "R4", 0.9)]
    )
    # Q0: R3 (0.95) above, R4 ties at 0.9 -> rank 2. Q1: R5 above -> rank 1.
    assert match_ranks(ground_truth, p).tolist() == [2, 1]


# --- slow reference: a literal transcription of the definitions with Python loops --------------------


def slow_metrics(gt_pairs: list[tuple[str, str]], rows: list[tuple[str, str, float]]) -> dict:
    positives = set(gt_pairs)
    labelled = [(score, (q, r) in positives) for q, r, score in rows]
    # sort by score ascending then "not a match" ascending, and reverse: decreasing score, wrong first
    ranked = sorted(labelled, key=lambda t: (t[0], not t[1]))[::-1]
    tp = 0
    ap = 0.0
    prev_recall = 0.0
    best_recall, best_threshold = None, None
    for i, (score, ok) in enumerate(ranked, start=1):
        tp += ok
        precision, recall = tp / i, tp / len(gt_pairs)
        ap += (recall - prev_recall) * precision
        prev_recall = recall
        if precision >= 0.9 and (best_recall is None or recall > best_recall):
            best_recall, best_threshold = recall, score
    by_query: dict[str, list[tuple[str, float]]] = {}
    for q, r, score in rows:
        by_query.setdefault(q, []).append((r, score))
    r1 = r10 = 0
    for q, r in gt_pairs:
        mine = by_query.get(q, [])
        true_scores = [s for ref, s in mine if ref == r]
        if not true_scores:
            continue
        rank = sum(1 for _, s in mine if s >= true_scores[0]) - 1
        r1 += rank < 1
        r10 += rank < 10
    return {
        "uAP": ap,
        "recall_at_p90": best_recall,
        "threshold_at_p90": best_threshold,
        "recall_at_rank1": r1 / len(gt_pairs),
        "recall_at_rank10": r10 / len(gt_pairs),
    }


def random_case(rng: np.random.Generator):
    n_queries = int(rng.integers(1, 30))
    n_refs = int(rng.integers(1, 30))
    gt_rows = []
    for q in range(n_queries):
        if rng.random() < 0.5:
            gt_rows.append((f"Q{q}", f"R{rng.integers(n_refs)}"))
        else:
            gt_rows.append((f"Q{q}", ""))
    if all(r == "" for _, r in gt_rows):
        gt_rows[0] = ("Q0", "R0")
    all_pairs = [(f"Q{q}", f"R{r}") for q in range(n_queries + 3) for r in range(n_refs)]
    n_pred = int(rng.integers(0, min(len(all_pairs), 60) + 1))
    chosen = rng.choice(len(all_pairs), size=n_pred, replace=False)
    # Coarse scores make ties frequent, which is where implementations differ.
    scale = [2, 5, 1000][int(rng.integers(3))]
    rows = [(*all_pairs[i], float(rng.integers(scale)) / scale) for i in chosen]
    # Give some true pairs a chance of being predicted.
    for q, r in gt_rows:
        if r and rng.random() < 0.6 and (q, r) not in {(a, b) for a, b, _ in rows}:
            rows.append((q, r, float(rng.integers(scale)) / scale))
    return gt_rows, rows


def test_matches_slow_reference_on_random_sets() -> None:
    rng = np.random.default_rng(2021)
    for _ in range(1000):
        gt_rows, rows = random_case(rng)
        fast = evaluate(gt(gt_rows), preds(rows)).to_dict()
        slow = slow_metrics([(q, r) for q, r in gt_rows if r], rows)
        for key, expected in slow.items():
            got = fast[key]
            if expected is None:
                assert got is None, (key, gt_rows, rows)
            else:
                assert got is not None and math.isclose(got, expected, rel_tol=0, abs_tol=1e-12), (
                    key,
                    got,
                    expected,
                )


# --- command line ------------------------------------------------------------------------------------


def test_cli_prints_one_json_object(tmp_path, capsys) -> None:
    (tmp_path / "gt.csv").write_text("query_id,reference_id\nQ0,R0\nQ1,R1\nQ2,\n")
    (tmp_path / "pred.csv").write_text("query_id,reference_id,score\nQ0,R0,0.9\nQ2,R1,0.8\nQ1,R1,0.7\n")
    assert main([str(tmp_path / "gt.csv"), str(tmp_path / "pred.csv")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"uAP", "recall_at_p90", "threshold_at_p90", "recall_at_rank1", "recall_at_rank10"}
    assert out["uAP"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert out["recall_at_p90"] == pytest.approx(0.5)
    assert out["threshold_at_p90"] == pytest.approx(0.9)


def test_cli_reports_duplicates(tmp_path, capsys) -> None:
    (tmp_path / "gt.csv").write_text("query_id,reference_id\nQ0,R0\n")
    (tmp_path / "pred.csv").write_text("query_id,reference_id,score\nQ0,R0,0.9\nQ0,R0,0.8\n")
    assert main([str(tmp_path / "gt.csv"), str(tmp_path / "pred.csv")]) == 2
    assert "duplicate" in capsys.readouterr().err


def test_swapped_id_columns_are_an_error_not_a_zero(tmp_path):
    from isc.evaluation.metrics import main
    from isc.formats.pair_csv import read_ground_truth, read_predictions

    (tmp_path / "gt.csv").write_text("query_id,reference_id\nQ00000,R000001\nQ00001,\nQ00002,R000002\n")
    (tmp_path / "swapped.csv").write_text(
        "query_id,reference_id,score\nR000001,Q00000,0.9\nR000002,Q00002,0.8\n"
    )
    gt, swapped = read_ground_truth(tmp_path / "gt.csv"), read_predictions(tmp_path / "swapped.csv")
    with pytest.raises(ValueError, match="columns look swapped"):
        check_prediction_queries(gt, swapped)
    assert main([str(tmp_path / "gt.csv"), str(tmp_path / "swapped.csv")]) == 2  # not uAP 0.0 and exit 0
    other = Predictions(["X1", "X2"], ["R000001", "R000002"], [0.9, 0.8])  # ids of another dataset
    with pytest.raises(ValueError, match="none of the 2 predictions names a query"):
        check_prediction_queries(gt, other)


def test_predictions_for_unknown_queries_are_counted_and_named(caplog):
    gt = GroundTruth(["Q00000", "Q00001"], ["R000001", ""])
    predictions = Predictions(
        ["Q00000", "Q09999", "Q09999"], ["R000001", "R000001", "R000002"], [0.9, 0.8, 0.7]
    )
    with caplog.at_level("WARNING", logger="isc.evaluation.metrics"):
        check_prediction_queries(gt, predictions)
    metrics = evaluate(gt, predictions)
    assert "2 of 3 predictions (1 queries, e.g. Q09999) name queries absent" in caplog.text
    assert metrics.uAP == pytest.approx(1.0)  # the known query's match still ranks first


def test_the_row_limit_error_names_the_command_line_flag(tmp_path, capsys):
    (tmp_path / "gt.csv").write_text("query_id,reference_id\nQ0,R0\n")
    (tmp_path / "pred.csv").write_text("query_id,reference_id,score\nQ0,R0,0.9\nQ0,R1,0.8\nQ0,R2,0.7\n")
    assert main([str(tmp_path / "gt.csv"), str(tmp_path / "pred.csv"), "--max-rows", "2"]) == 2
    assert "--max-rows 0" in capsys.readouterr().err
    assert main([str(tmp_path / "gt.csv"), str(tmp_path / "pred.csv"), "--max-rows", "0"]) == 0
