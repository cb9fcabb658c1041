from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from isc.evaluation.metrics import evaluate
from isc.formats import descriptor_files, pair_csv
from isc.formats.descriptor_files import (
    Descriptors,
    check_descriptor_track,
    read_descriptors,
    read_split_descriptors,
    write_descriptors,
    write_split_descriptor_files,
    write_split_descriptors,
)
from isc.formats.files import atomic_write
from isc.formats.pair_csv import read_ground_truth, read_predictions, write_ground_truth, write_predictions
from isc.formats.pairs import GroundTruth, Predictions


def _predictions(n: int, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    queries = np.array([f"Q{i:05d}" for i in range(n)])
    references = np.array([f"R{i:06d}" for i in rng.permutation(n)])
    return Predictions(queries, references, rng.standard_normal(n) * 1e3)


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- predictions


def test_predictions_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    scores = np.concatenate(
        [rng.standard_normal(500), [0.1, 1 / 3, 1e-300, -2.5e300, np.nextafter(1.0, 2.0)]]
    )
    n = len(scores)
    preds = Predictions([f"Q{i:05d}" for i in range(n)], [f"R{(7 * i) % n:06d}" for i in range(n)], scores)
    path = tmp_path / "preds.csv"
    write_predictions(path, preds)
    assert path.read_text().splitlines()[0] == "query_id,reference_id,score"
    back = read_predictions(path)
    np.testing.assert_array_equal(back.query_ids, preds.query_ids)
    np.testing.assert_array_equal(back.reference_ids, preds.reference_ids)
    assert back.scores.dtype == np.float64
    assert np.array_equal(back.scores, preds.scores)  # bit-exact, not approximately equal


def test_read_predictions_accepts_crlf_blank_lines_and_quotes(tmp_path: Path) -> None:
    text = 'query_id,reference_id,score\r\nQ1,R1,0.5\r\n\r\n"Q2","R2",1e-3\r\n'
    preds = read_predictions(_write_text(tmp_path / "p.csv", text))
    assert preds.query_ids.tolist() == ["Q1", "Q2"]
    assert preds.reference_ids.tolist() == ["R1", "R2"]
    assert preds.scores.tolist() == [0.5, 1e-3]


def test_read_predictions_empty_body(tmp_path: Path) -> None:
    preds = read_predictions(_write_text(tmp_path / "p.csv", "query_id,reference_id,score\n"))
    assert len(preds) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("query,reference,score\nQ1,R1,0.5\n", "line 1: expected the header"),
        ("Q1,R1,0.5\n", "line 1: expected the header"),
        ("query_id,reference_id,score\nQ1,R1,0.5\nQ2,R2\n", "line 3: expected 3 columns"),
        ("query_id,reference_id,score\nQ1,R1,0.5,7\n", "line 2: expected 3 columns"),
        ("query_id,reference_id,score\nQ1,R1,0.5\n\nQ2,R2,nan\n", "line 4: score 'nan' is not finite"),
        ("query_id,reference_id,score\nQ1,R1,inf\n", "line 2: score 'inf' is not finite"),
        ("query_id,reference_id,score\nQ1,R1,0.5\nQ2,R2,abc\n", "line 3: score 'abc' is not a number"),
        ("query_id,reference_id,score\nQ1,R1,\n", "line 2: score '' is not a number"),
        ("query_id,reference_id,score\nQ1,R1,0.5\n,R2,0.1\n", "line 3: empty query_id"),
        ("query_id,reference_id,score\nQ1,,0.5\n", "line 2: empty reference_id"),
    ],
)
def test_read_predictions_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write_text(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=message) as info:
        read_predictions(path)
    assert str(path) in str(info.value)


def test_read_predictions_returns_duplicates(tmp_path: Path) -> None:
    path = _write_text(tmp_path / "p.csv", "query_id,reference_id,score\nQ1,R1,0.5\nQ1,R1,0.7\n")
    preds = read_predictions(path)
    assert len(preds) == 2
    assert preds.duplicate_pairs() == [("Q1", "R1")]


def test_max_rows_cap_and_lift(tmp_path: Path) -> None:
    preds = _predictions(30)
    path = tmp_path / "p.csv"
    with pytest.raises(ValueError, match="max_rows=None"):
        write_predictions(path, preds, max_rows=20)
    assert not path.exists()
    write_predictions(path, preds, max_rows=None)
    with pytest.raises(ValueError, match=r"30 prediction rows exceed max_rows=20.*max_rows=None"):
        read_predictions(path, max_rows=20)
    assert len(read_predictions(path, max_rows=None)) == 30
    assert len(read_predictions(path, max_rows=30)) == 30


def test_default_cap_is_the_official_500k() -> None:
    assert pair_csv.MAX_PREDICTIONS == 500_000
    assert read_predictions.__defaults__ == (500_000,)
    assert write_predictions.__defaults__ == (500_000,)


def test_writer_refuses_duplicates(tmp_path: Path) -> None:
    preds = Predictions(["Q1", "Q1", "Q2"], ["R1", "R1", "R1"], [0.1, 0.2, 0.3])
    path = tmp_path / "p.csv"
    with pytest.raises(ValueError, match=r"duplicate.*\(Q1, R1\)"):
        write_predictions(path, preds)
    assert not path.exists()


def test_writer_refuses_ids_that_break_the_csv(tmp_path: Path) -> None:
    preds = Predictions(["Q1", "Q,2"], ["R1", "R2"], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"'Q,2'"):
        write_predictions(tmp_path / "p.csv", preds)


def test_read_500k_predictions_quickly(tmp_path: Path) -> None:
    preds = _predictions(500_000)
    path = tmp_path / "big.csv"
    write_predictions(path, preds)
    start = time.perf_counter()
    back = read_predictions(path)
    elapsed = time.perf_counter() - start
    assert np.array_equal(back.scores, preds.scores)
    assert elapsed < 2.5, f"reading 500,000 rows took {elapsed:.2f} s"  # about 0.5 s on a slow 2-core box


# ---------------------------------------------------------------------------------------------- ground truth


def test_ground_truth_round_trip_with_unmatched_queries(tmp_path: Path) -> None:
    gt = GroundTruth(["Q00000", "Q00001", "Q00002", "Q00002"], ["R000010", "", "R000001", "R000002"])
    path = tmp_path / "gt.csv"
    write_ground_truth(path, gt)
    assert path.read_text().splitlines() == [
        "query_id,reference_id",
        "Q00000,R000010",
        "Q00001,",
        "Q00002,R000001",
        "Q00002,R000002",
    ]
    back = read_ground_truth(path)
    assert back.query_ids.tolist() == gt.query_ids.tolist()
    assert back.reference_ids.tolist() == gt.reference_ids.tolist()
    assert back.num_positives == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("query_id,reference_id,score\nQ1,R1,1\n", "line 1: expected the header 'query_id,reference_id'"),
        ("query_id,reference_id\nQ1,R1\nQ2\n", "line 3: expected 2 columns"),
        ("query_id,reference_id\nQ1,R1\n,R2\n", "line 3: empty query_id"),
        ("query_id,reference_id\nQ1,R1\nQ1,R1\n", "more than once"),
        ("query_id,reference_id\nQ1,R1\nQ1,\n", "both without a match and with a match"),
    ],
)
def test_ground_truth_errors_name_file(tmp_path: Path, text: str, message: str) -> None:
    path = _write_text(tmp_path / "gt.csv", text)
    with pytest.raises(ValueError, match=message) as info:
        read_ground_truth(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------- descriptors


def test_descriptors_round_trip_sorted_and_aligned(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    query_ids = ["Q3", "Q1", "Q2"]
    query = rng.standard_normal((3, 16))  # float64 in, float32 out
    reference_ids = np.array(["R9", "R0", "R5", "R2"])
    reference = rng.standard_normal((4, 16)).astype(np.float32)
    path = tmp_path / "d.h5"
    write_descriptors(path, query_ids, query, reference_ids, reference)

    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"query", "reference", "query_ids", "reference_ids"}
        assert f["query"].dtype == np.float32
        assert f["reference"].dtype == np.float32
        assert f["query_ids"].dtype.kind == "S"
        assert f["reference_ids"][()].tolist() == [b"R0", b"R2", b"R5", b"R9"]

    back = read_descriptors(path)
    assert back.query_ids.tolist() == ["Q1", "Q2", "Q3"]
    assert back.reference_ids.tolist() == ["R0", "R2", "R5", "R9"]
    assert back.query.dtype == np.float32
    np.testing.assert_array_equal(back.query, query[[1, 2, 0]].astype(np.float32))
    np.testing.assert_array_equal(back.reference, reference[[1, 3, 2, 0]])
    assert back.training is None and back.training_ids is None
    check_descriptor_track(path)  # the official constraints hold


def test_descriptors_training_split_round_trip(tmp_path: Path) -> None:
    x = np.eye(4, dtype=np.float32)
    path = tmp_path / "d.h5"
    write_descriptors(path, ["Q0"], x[:1], ["R0"], x[1:2], training_ids=["T1", "T0"], training=x[2:])
    back = read_descriptors(path)
    assert back.training_ids.tolist() == ["T0", "T1"]
    np.testing.assert_array_equal(back.training, x[[3, 2]])


def test_descriptor_dimension_cap(tmp_path: Path) -> None:
    x = np.arange(2 * 257, dtype=np.float32).reshape(2, 257)
    path = tmp_path / "d.h5"
    with pytest.raises(ValueError, match=r"257 dimensions.*max_dim=256"):
        write_descriptors(path, ["Q0", "Q1"], x, ["R0", "R1"], x)
    assert not path.exists()
    write_descriptors(path, ["Q0", "Q1"], x, ["R0", "R1"], x, max_dim=None)
    assert read_descriptors(path).dim == 257
    with pytest.raises(ValueError, match="257 dimensions, more than 256"):
        check_descriptor_track(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query": np.array([[1.0, 2.0], [np.nan, 0.0]])}, "NaN or inf.*'Qb'"),
        ({"reference": np.array([[1.0, np.inf]])}, "NaN or inf.*'R0'"),
        ({"reference": np.array([[1e39, 0.0]])}, "NaN or inf.*'R0'"),  # overflows float32
        ({"query_ids": ["Qa", "Qa"]}, "duplicate.*'Qa'"),
        ({"query_ids": ["Qa"]}, "1 query_ids but 2 query descriptor rows"),
        ({"reference": np.ones((1, 3))}, "dimensions differ"),
        ({"query_ids": [1, 2]}, "must be strings"),
        ({"query_ids": ["Qa", ""]}, "empty id"),
    ],
)
def test_write_descriptors_refuses_bad_input(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {
        "query_ids": ["Qa", "Qb"],
        "query": np.array([[1.0, 2.0], [3.0, 1.0]]),
        "reference_ids": ["R0"],
        "reference": np.ones((1, 2)),
    } | kwargs
    path = tmp_path / "d.h5"
    with pytest.raises(ValueError, match=message):
        write_descriptors(path, **args)
    assert not path.exists()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]], r"2 of 3 query descriptor\(s\) are all zeros.*'Qb', 'Qc'"),
        ([[0.6, 0.8]] * 3, "all 3 query descriptors are the same vector"),
    ],
)
def test_zero_and_constant_descriptors_are_refused(tmp_path: Path, query: list, message: str) -> None:
    """Such files scored uAP 0.07 with exit 0; now they name the ids and stop."""
    path = tmp_path / "d.h5"
    with pytest.raises(ValueError, match=message):
        write_descriptors(path, ["Qa", "Qb", "Qc"], np.array(query), ["R0", "R1"], np.eye(2))
    assert not path.exists()
    with h5py.File(path, "w") as f:  # a file written by other code is refused when read, naming it
        f["query"] = np.array(query, dtype=np.float32)
        f["query_ids"] = np.array([b"Qa", b"Qb", b"Qc"])
        f["reference"] = np.eye(2, dtype=np.float32)
        f["reference_ids"] = np.array([b"R0", b"R1"])
    with pytest.raises(ValueError, match=rf"d\.h5.*{message}"):
        read_descriptors(path)
    one = Descriptors(["Q0"], [[0.6, 0.8]], ["R0"], [[0.6, 0.8]])  # one image per split is not "constant"
    assert one.dim == 2


def test_read_descriptors_validates_and_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["query"] = np.array([[np.nan, 1.0]], dtype=np.float32)
        f["query_ids"] = np.array([b"Q0"])
        f["reference"] = np.ones((1, 2), dtype=np.float32)
        f["reference_ids"] = np.array([b"R0"])
    with pytest.raises(ValueError, match=r"bad\.h5.*NaN or inf.*'Q0'"):
        read_descriptors(path)

    with h5py.File(path, "w") as f:
        f["query"] = np.ones((1, 2), dtype=np.float32)
        f["query_ids"] = np.array([b"Q0"])
    with pytest.raises(ValueError, match=r"bad\.h5.*missing dataset"):
        read_descriptors(path)

    path.write_text("not hdf5")
    with pytest.raises(ValueError, match=r"bad\.h5.*not a readable HDF5"):
        read_descriptors(path)


def test_check_descriptor_track_flags_unsorted_and_float64(tmp_path: Path) -> None:
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["query"] = np.array([[1.0, 2.0], [3.0, 1.0]])  # float64
        f["query_ids"] = np.array([b"Q1", b"Q0"])
        f["reference"] = np.ones((1, 2), dtype=np.float32)
        f["reference_ids"] = np.array([b"R0"])
    assert read_descriptors(path).query.dtype == np.float32  # the reader itself is lenient
    with pytest.raises(ValueError, match=r"'query' is stored as float64.*not sorted by id") as info:
        check_descriptor_track(path)
    assert str(path) in str(info.value)


def test_descriptors_dataclass_is_frozen_and_sorts() -> None:
    d = Descriptors(["Q1", "Q0"], [[1, 1], [0, 1]], ["R0"], [[2, 2]])
    with pytest.raises(AttributeError):
        d.query = None  # type: ignore[misc]
    s = d.sorted()
    assert s.query_ids.tolist() == ["Q0", "Q1"]
    assert s.query.tolist() == [[0, 1], [1, 1]]


# ---------------------------------------------------------------------------------------------- atomic writes


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_atomic_write_keeps_old_file_when_body_raises(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(path) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert _leftovers(tmp_path, {"out.txt"}) == []

    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent
        tmp.write_text("new")
        assert path.read_text() == "old"  # not visible until the body finishes
    assert path.read_text() == "new"
    assert _leftovers(tmp_path, {"out.txt"}) == []


def test_atomic_write_requires_the_body_to_write(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="never created"), atomic_write(tmp_path / "x.txt"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_write_predictions_interrupted_midway_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.csv"
    write_predictions(path, _predictions(5))
    before = path.read_bytes()

    class Interrupted(Exception):
        pass

    real_open = open

    class HalfFile:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.f = real_open(*args, **kwargs)  # type: ignore[call-overload]

        def __enter__(self) -> HalfFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, text: str) -> int:
            self.f.write(text[: len(text) // 2])
            raise Interrupted

    monkeypatch.setattr(pair_csv, "open", HalfFile, raising=False)
    with pytest.raises(Interrupted):
        write_predictions(path, _predictions(9, seed=3))
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, {"p.csv"}) == []


def test_write_descriptors_interrupted_midway_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.eye(3, dtype=np.float32)
    path = tmp_path / "d.h5"
    write_descriptors(path, ["Q0", "Q1", "Q2"], x, ["R0", "R1", "R2"], x)
    before = path.read_bytes()

    calls = []
    real_create = h5py.Group.create_dataset

    def failing_create(self: h5py.Group, name: str, *args: object, **kwargs: object) -> h5py.Dataset:
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create)
    with pytest.raises(OSError, match="disk full"):
        write_descriptors(path, ["Q9"], x[:1], ["R9"], x[:1])
    assert len(calls) == 3  # it really failed midway
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, {"d.h5"}) == []
    assert read_descriptors(path).query_ids.tolist() == ["Q0", "Q1", "Q2"]


# ---------------------------------------------------------------------------------------------- whitespace in ids


def _scored_set(seed: int = 5) -> tuple[GroundTruth, Predictions]:
    """A small matching problem with hits, misses and unmatched queries, so uAP is neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    q_ids = [f"Q{i:05d}" for i in range(40)]
    truth = {q: f"R{rng.integers(100):06d}" for q in q_ids[:25]}
    gt = GroundTruth(q_ids, [truth.get(q, "") for q in q_ids])
    rows = []
    for q in q_ids:
        refs = {f"R{r:06d}" for r in rng.choice(100, size=3, replace=False)}
        if q in truth and rng.random() < 0.7:
            refs.add(truth[q])
        rows += [(q, r, float(np.round(rng.random(), 2))) for r in sorted(refs)]
    return gt, Predictions([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def _pad(path: Path, pads: list[str], newline: str = "\n") -> Path:
    """Rewrite a CSV with whitespace around every field (and the header), cycling through ``pads``."""
    lines = path.read_text().splitlines()
    out = []
    for n, line in enumerate(lines):
        fields = line.split(",")
        out.append(
            ",".join(
                f"{pads[(n + k) % len(pads)]}{v}{pads[(n + k + 1) % len(pads)]}" for k, v in enumerate(fields)
            )
        )
    out.insert(len(out) // 2, "   \t")  # a whitespace-only line counts as blank
    padded = path.with_name("padded_" + path.name)
    padded.write_text(newline.join(out) + newline, encoding="utf-8", newline="")
    return padded


@pytest.mark.parametrize(
    ("pads", "newline"),
    [
        ([" ", "", "\t", "  "], "\n"),
        ([" ", "\t "], "\r\n"),
        (["\u00a0", " ", "\u3000"], "\n"),
    ],  # NBSP: regex path
)
def test_padded_ids_score_like_clean_ids(tmp_path: Path, pads: list[str], newline: str) -> None:
    gt, preds = _scored_set()
    write_ground_truth(tmp_path / "gt.csv", gt)
    write_predictions(tmp_path / "p.csv", preds)
    clean = evaluate(read_ground_truth(tmp_path / "gt.csv"), read_predictions(tmp_path / "p.csv"))
    assert clean.uAP is not None and 0.1 < clean.uAP < 0.9

    padded_gt = read_ground_truth(_pad(tmp_path / "gt.csv", pads, newline))
    padded_preds = read_predictions(_pad(tmp_path / "p.csv", pads, newline))
    assert padded_preds.query_ids.tolist() == preds.query_ids.tolist()
    assert padded_preds.reference_ids.tolist() == preds.reference_ids.tolist()
    assert np.array_equal(padded_preds.scores, preds.scores)
    assert padded_gt.reference_ids.tolist() == gt.reference_ids.tolist()  # "  " reference = no match
    assert evaluate(padded_gt, padded_preds) == clean


def test_padded_ids_as_reported_no_longer_miss(tmp_path: Path) -> None:
    gt = read_ground_truth(_write_text(tmp_path / "gt.csv", "query_id,reference_id\n Q1,R1 \nQ2 , \n"))
    preds = read_predictions(_write_text(tmp_path / "p.csv", "query_id,reference_id,score\n Q1,R1 ,0.9\n"))
    assert gt.query_ids.tolist() == ["Q1", "Q2"] and gt.reference_ids.tolist() == ["R1", ""]
    assert evaluate(gt, preds).uAP == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "query_id,reference_id,score\nQ1,R1,0.5\nQ 2,R2,0.1\n",
            r"line 3: query_id 'Q 2' contains whitespace",
        ),
        ("query_id,reference_id,score\nQ1,R\t1,0.5\n", r"line 2: reference_id 'R\\t1' contains whitespace"),
        (
            "query_id,reference_id,score\nQ1,R1,0.5\n  ,R2,0.1\n",
            r"line 3: empty query_id$",
        ),
        ("query_id,reference_id,score\nQ1, ,0.5\n", r"line 2: empty reference_id$"),
        (
            "query_id,reference_id,score\n\nQ1,R 1,0.5\n ,R2,0.1\n",
            r"line 3: reference_id 'R 1'",
        ),  # earliest line
        ("query_id,reference_id,score\nQ1,R1,0.5 x\n", r"line 2: score '0.5 x' is not a number"),
    ],
)
def test_read_predictions_whitespace_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write_text(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=message) as info:
        read_predictions(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("query_id,reference_id\nQ1,R1\nQ2,R 2\n", r"line 3: reference_id 'R 2' contains whitespace"),
        ("query_id,reference_id\nQ1,R1\n\u00a0,R2\n", r"line 3: empty query_id$"),
        ("query_id,reference_id\nQ\u00a01,R1\n", r"line 2: query_id 'Q\\xa01' contains whitespace"),
    ],
)
def test_read_ground_truth_whitespace_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write_text(tmp_path / "gt.csv", text)
    with pytest.raises(ValueError, match=message) as info:
        read_ground_truth(path)
    assert str(path) in str(info.value)


def test_writers_refuse_ids_the_reader_would_change(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'R1 ' \(row 1\) contains whitespace"):
        write_predictions(tmp_path / "p.csv", Predictions(["Q1", "Q2"], ["R0", "R1 "], [0.1, 0.2]))
    with pytest.raises(ValueError, match=r"'Q 1' \(row 0\) contains whitespace"):
        write_ground_truth(tmp_path / "gt.csv", GroundTruth(["Q 1"], [""]))
    with pytest.raises(ValueError, match=r"contains whitespace"):  # a line break splitlines would honour
        write_ground_truth(tmp_path / "gt.csv", GroundTruth(["Q1\x0c"], [""]))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- per-split files


def _official_write_hdf5_descriptors(vectors: np.ndarray, image_names: list[str], fname: Path) -> None:
    """facebookresearch/isc2021 isc/io.py write_hdf5_descriptors, line for line."""
    vectors = np.ascontiguousarray(vectors, dtype="float32")
    names = np.array([bytes(name, "ascii") for name in image_names])
    with h5py.File(fname, "w") as f:
        f.create_dataset("vectors", data=vectors)
        f.create_dataset("image_names", data=names)


def _official_read_descriptors(filenames: list[Path]) -> tuple[list[str], np.ndarray]:
    """facebookresearch/isc2021 isc/io.py read_descriptors (files closed, otherwise line for line)."""
    descs = []
    names: list[str] = []
    for filename in filenames:
        with h5py.File(filename, "r") as hh:
            descs.append(np.array(hh["vectors"]))
            names += np.array(hh["image_names"][:], dtype=object).astype(str).tolist()
    names = [name.split("/")[-1] for name in names]
    names = [name[:-4] if name.endswith(".jpg") or name.endswith(".png") else name for name in names]
    return names, np.vstack(descs)


def _official_split_files(
    tmp_path: Path,
) -> tuple[dict[str, object], dict[str, tuple[list[str], np.ndarray]]]:
    """Queries, references in two shards and training, named as GeM_baseline.py stores them (paths)."""
    rng = np.random.default_rng(7)
    expected = {
        "query": ([f"Q{i:05d}" for i in (3, 0, 2)], rng.standard_normal((3, 8))),
        "reference": ([f"R{i:06d}" for i in (9, 1, 4, 7, 5)], rng.standard_normal((5, 8))),
        "training": ([f"T{i:06d}" for i in (2, 0)], rng.standard_normal((2, 8))),
    }
    q_ids, q = expected["query"]
    r_ids, r = expected["reference"]
    t_ids, t = expected["training"]
    _official_write_hdf5_descriptors(
        q, [f"images/queries/{i}.jpg" for i in q_ids], tmp_path / "dev_queries.hdf5"
    )
    _official_write_hdf5_descriptors(
        r[:2], [f"/data/references/{i}.jpg" for i in r_ids[:2]], tmp_path / "r_0.hdf5"
    )
    _official_write_hdf5_descriptors(r[2:], [f"{i}.png" for i in r_ids[2:]], tmp_path / "r_1.hdf5")
    _official_write_hdf5_descriptors(t, t_ids, tmp_path / "train.hdf5")  # bare ids work too
    spec = {
        "queries": str(tmp_path / "dev_queries.hdf5"),
        "references": [tmp_path / "r_0.hdf5", tmp_path / "r_1.hdf5"],
        "training": tmp_path / "train.hdf5",
    }
    return spec, expected


def _assert_descriptors(d: Descriptors, expected: dict[str, tuple[list[str], np.ndarray]]) -> None:
    for split, (ids, x) in expected.items():
        assert getattr(d, f"{split}_ids").tolist() == ids  # the files' order, not re-sorted
        got = getattr(d, split)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, x.astype(np.float32))


def test_read_official_per_split_files(tmp_path: Path) -> None:
    spec, expected = _official_split_files(tmp_path)
    _assert_descriptors(read_descriptors(spec), expected)
    # the same as a list [queries, references, training], and without training
    _assert_descriptors(read_descriptors([spec["queries"], spec["references"], spec["training"]]), expected)
    no_training = read_descriptors({"query": spec["queries"], "db": spec["references"], "training": None})
    assert no_training.training is None and no_training.training_ids is None
    ids, x = read_split_descriptors(spec["references"])
    assert ids.tolist() == expected["reference"][0] and x.shape == (5, 8)


def test_read_per_split_files_from_a_hydra_config(tmp_path: Path) -> None:
    """run.py hands over ``cfg.evaluation.descriptors`` as a DictConfig / ListConfig."""
    omegaconf = pytest.importorskip("omegaconf")
    spec, expected = _official_split_files(tmp_path)
    plain = {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in spec.items()}
    cfg = omegaconf.OmegaConf.create({"as_map": plain, "as_list": list(plain.values())})
    _assert_descriptors(read_descriptors(cfg.as_map), expected)
    _assert_descriptors(read_descriptors(cfg.as_list), expected)


def test_read_per_split_variable_length_names(tmp_path: Path) -> None:
    path = tmp_path / "q.hdf5"
    with h5py.File(path, "w") as f:
        f["vectors"] = np.eye(2, dtype=np.float32)
        f.create_dataset("image_names", data=["a/Q1.jpg", "Q2.jpeg"], dtype=h5py.string_dtype())
    ids, _ = read_split_descriptors(path)
    assert ids.tolist() == ["Q1", "Q2.jpeg"] == _official_read_descriptors([path])[0]  # only .jpg/.png go


def test_our_split_files_read_by_the_official_reader(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    d = Descriptors(
        ["Q2", "Q0"],
        rng.standard_normal((2, 4)),
        ["R1", "R3", "R0"],
        rng.standard_normal((3, 4)),
        ["T0"],
        rng.standard_normal((1, 4)),
    )
    paths = write_split_descriptor_files(tmp_path / "out", d)
    assert {k: p.name for k, p in paths.items()} == descriptor_files.SPLIT_FILE_NAMES
    for split, path in paths.items():
        with h5py.File(path, "r") as f:
            assert set(f.keys()) == {"vectors", "image_names"}
            assert f["vectors"].dtype == np.float32 and f["image_names"].dtype.kind == "S"
        names, x = _official_read_descriptors([path])
        assert names == getattr(d, f"{split}_ids").tolist()
        np.testing.assert_array_equal(x, getattr(d, split))
    back = read_descriptors(
        {"queries": paths["query"], "references": paths["reference"], "training": paths["training"]}
    )
    _assert_descriptors(
        back,
        {s: (getattr(d, f"{s}_ids").tolist(), getattr(d, s)) for s in ("query", "reference", "training")},
    )


def test_submission_converted_by_the_official_script_reads_back(tmp_path: Path) -> None:
    """scripts/convert_track2_format.py: per-split files -> one submission file (ids as ASCII bytes)."""
    spec, expected = _official_split_files(tmp_path)
    q_ids, xq = _official_read_descriptors([Path(spec["queries"])])
    r_ids, xr = _official_read_descriptors(list(spec["references"]))
    with h5py.File(tmp_path / "sub.hdf5", "w") as f:
        f.create_dataset("query", data=xq)
        f.create_dataset("reference", data=xr)
        f.create_dataset("query_ids", data=np.array([bytes(n, "ascii") for n in q_ids]))
        f.create_dataset("reference_ids", data=np.array([bytes(n, "ascii") for n in r_ids]))
    back = read_descriptors(tmp_path / "sub.hdf5")
    assert back.query_ids.tolist() == expected["query"][0]
    np.testing.assert_array_equal(back.reference, expected["reference"][1].astype(np.float32))


def test_per_split_errors_are_clear(tmp_path: Path) -> None:
    spec, _ = _official_split_files(tmp_path)
    with pytest.raises(ValueError, match=r"dev_queries\.hdf5: missing dataset.*per-split layout.*'queries'"):
        read_descriptors(spec["queries"])  # one per-split file is not a submission
    write_descriptors(tmp_path / "sub.h5", ["Q0"], np.ones((1, 2)), ["R0"], np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"sub\.h5: missing dataset.*submission file"):
        read_descriptors({"queries": tmp_path / "sub.h5", "references": spec["references"]})
    with pytest.raises(ValueError, match=r"unknown descriptor split 'refs'"):
        read_descriptors({"queries": spec["queries"], "refs": spec["references"]})
    with pytest.raises(ValueError, match=r"missing \['reference'\]"):
        read_descriptors({"queries": spec["queries"], "training": spec["training"]})
    with pytest.raises(ValueError, match=r"given twice"):
        read_descriptors(
            {"queries": spec["queries"], "query": spec["queries"], "references": spec["training"]}
        )
    with pytest.raises(ValueError, match=r"\[queries, references\].*got 1 entries"):
        read_descriptors([spec["queries"]])
    with pytest.raises(FileNotFoundError, match="nope.hdf5"):
        read_descriptors({"queries": spec["queries"], "references": tmp_path / "nope.hdf5"})
    _official_write_hdf5_descriptors(np.ones((1, 3)), ["R000009"], tmp_path / "r_2.hdf5")
    with pytest.raises(ValueError, match=r"shards differ in dimension.*r_2\.hdf5: 3"):
        read_split_descriptors([spec["references"][0], tmp_path / "r_2.hdf5"], "reference")
    _official_write_hdf5_descriptors(np.ones((1, 8)), ["x/R000009.jpg"], tmp_path / "r_3.hdf5")
    with pytest.raises(
        ValueError, match=r"r_0\.hdf5 \(\+1 more shard\(s\)\): reference_ids has 1 duplicate.*'R000009'"
    ):
        read_split_descriptors([spec["references"][0], tmp_path / "r_3.hdf5"], "reference")
    with pytest.raises(ValueError, match=r"per-split descriptors .*dimensions differ"):
        read_descriptors({"queries": spec["queries"], "references": tmp_path / "r_2.hdf5"})


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["a/Q1"], r"'a/Q1' \(row 0\) would be read back by the official reader as 'Q1'"),
        (["Q0", "Q1.png"], r"'Q1.png' \(row 1\) would be read back .* as 'Q1'"),
        (["Q\u00e9"], "must be ASCII"),
        (["Q0", "Q0"], "duplicate"),
    ],
)
def test_write_split_descriptors_refuses_what_the_official_reader_would_change(
    tmp_path: Path, ids: list[str], message: str
) -> None:
    path = tmp_path / "s.hdf5"
    with pytest.raises(ValueError, match=message):
        write_split_descriptors(path, ids, np.arange(2.0 * len(ids)).reshape(-1, 2) + 1)
    assert not path.exists()


def test_whitespace_lookup_covers_every_isspace_character() -> None:
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    ids = np.array([f"Q{c}1" for c in spaces] + ["Q1", "R\u00e9", "\U0001f600", "T\u30001"])
    expected = [*range(len(spaces)), len(spaces) + 3]
    assert pair_csv._rows_with_whitespace(ids).tolist() == expected
