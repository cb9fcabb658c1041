"""Official ISC2021 file formats: matching-track CSV, ground-truth CSV and descriptor HDF5 files.

Readers validate everything the official evaluation would trip over (and name the file and line), so a
bad submission fails here rather than after an hour of search. Writers go through :func:`atomic_write`,
so a run killed halfway never leaves a truncated file that looks like a finished one.

Whitespace around CSV ids is stripped, as the official reader strips its lines (``line.strip()`` in
facebookresearch/isc2021 ``isc/io.py``); an id that is empty after stripping or holds inner whitespace is
an error naming the line. Descriptors come in two official layouts: the descriptor-track submission (one
file with ``query``/``reference``/``query_ids``/``reference_ids``) and the baselines' per-split files
(``vectors`` + ``image_names``, possibly sharded). See docs/formats.md.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import h5py
import numpy as np

from isc.evaluation.matches import GroundTruth, Predictions

__all__ = [
    "DESCRIPTOR_TRACK_MAX_DIM",
    "GROUND_TRUTH_HEADER",
    "MAX_PREDICTIONS",
    "PREDICTIONS_HEADER",
    "SPLIT_FILE_NAMES",
    "DescriptorSource",
    "Descriptors",
    "SplitFiles",
    "atomic_write",
    "check_descriptor_track",
    "read_descriptors",
    "read_ground_truth",
    "read_predictions",
    "read_split_descriptors",
    "write_descriptors",
    "write_ground_truth",
    "write_predictions",
    "write_split_descriptors",
    "write_split_descriptor_files",
]

PREDICTIONS_HEADER = ("query_id", "reference_id", "score")
GROUND_TRUTH_HEADER = ("query_id", "reference_id")
MAX_PREDICTIONS = 500_000
"""The official matching-track cap on the number of rows."""
DESCRIPTOR_TRACK_MAX_DIM = 256
"""The official descriptor-track cap on the descriptor dimension."""

_SPLITS = ("query", "reference", "training")
_CSV_SPECIAL = (",", '"', "\n", "\r")
_WHITESPACE = re.compile(r"\s")  # exactly the characters of str.isspace (and of str.strip)
_INLINE_WHITESPACE = re.compile(r"[^\S\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")  # minus line breaks
_ASCII_INLINE_WHITESPACE = " \t\x1f"  # the ASCII whitespace that str.splitlines does not break at
_ASCII_WHITESPACE = _ASCII_INLINE_WHITESPACE + "\n\r\x0b\x0c\x1c\x1d\x1e"
_IS_WHITESPACE = np.array([chr(c).isspace() for c in range(0x3002)])  # U+3000 is the last; last entry False


# --------------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step.

    The temporary file lives in the same directory so that ``os.replace`` is an atomic rename. If the
    body raises (or the process is interrupted by an exception), the temporary file is deleted and any
    previous ``path`` is left untouched. ``durable=False`` skips the fsync: still atomic for a killed
    process, not for a power cut; for bulk outputs (millions of generated images). The caller creates the temporary file itself (with ``open`` or
    ``h5py.File``), so it gets the usual permissions. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic_write: the body never created {tmp} for {path}")
        if durable:  # flush to disk before the rename makes the file visible (survives power loss)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# CSV helpers


def _has_whitespace(text: str, inline_only: bool = False) -> bool:
    """Whether ``text`` holds any ``str.isspace`` character (``inline_only``: other than line breaks).

    ASCII text (the usual case) is checked with a few ``in`` scans, about 100x faster than a regex.
    """
    if text.isascii():
        return any(c in text for c in (_ASCII_INLINE_WHITESPACE if inline_only else _ASCII_WHITESPACE))
    return (_INLINE_WHITESPACE if inline_only else _WHITESPACE).search(text) is not None


def _rows_with_whitespace(ids: np.ndarray) -> np.ndarray:
    """Indices of the ids (a ``str`` array) holding whitespace: a look-up of every code point, vectorised."""
    if ids.size == 0:
        return np.zeros(0, dtype=np.intp)
    codes = np.ascontiguousarray(ids).view(np.uint32).reshape(len(ids), -1)  # UCS-4, 0-padded
    return np.flatnonzero(_IS_WHITESPACE[np.minimum(codes, len(_IS_WHITESPACE) - 1)].any(axis=1))


def _read_csv(
    path: Path, header: tuple[str, ...], max_rows: int | None, what: str
) -> tuple[list[list[str]], np.ndarray, bool]:
    """Read a headed CSV into columns of strings, the 1-based file line number of every row, and
    whether any field may carry whitespace (then the caller strips and checks its id columns).

    Fast path: split the whole text at once (about 10x faster than ``csv.reader`` for 500,000 rows);
    files with quoted fields go through the ``csv`` module instead. Blank lines (also whitespace-only
    ones) are skipped. Lines are stripped as the official reader does only when the text holds
    whitespace other than line breaks, so clean files pay one fast scan.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e})") from e
    lines = text.splitlines()
    expected = ",".join(header)
    if not lines:
        raise ValueError(f"{path}: empty file, expected the header line '{expected}'")
    padded = _has_whitespace(text, inline_only=True)
    if padded:
        lines = list(map(str.strip, lines))  # the official reader's line.strip(), before splitting
    if lines[0] != expected and [c.strip().strip('"').strip() for c in lines[0].split(",")] != list(header):
        raise ValueError(f"{path}, line 1: expected the header '{expected}', found '{lines[0][:200]}'")
    body = lines[1:]
    line_numbers = np.arange(2, len(body) + 2)
    if "" in body:
        lengths = np.fromiter(map(len, body), dtype=np.int64, count=len(body))
        keep = np.flatnonzero(lengths > 0)
        body = [body[i] for i in keep]
        line_numbers = line_numbers[keep]
    if max_rows is not None and len(body) > max_rows:
        raise ValueError(
            f"{path}: {len(body)} {what} rows exceed max_rows={max_rows} (the official matching-track limit "
            f"is {MAX_PREDICTIONS:,}); to read them anyway pass --max-rows 0 on the command line "
            "(max_rows=None in Python)"
        )
    ncol = len(header)
    if '"' in text:
        rows = list(csv.reader(body))
        counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    else:
        rows = None
        counts = np.fromiter(map(str.count, body, repeat(",")), dtype=np.int64, count=len(body)) + 1
    bad = np.flatnonzero(counts != ncol)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{path}, line {line_numbers[i]}: expected {ncol} columns ({expected}), found {counts[i]}"
            + (f" ({bad.size} bad lines in all)" if bad.size > 1 else "")
        )
    if rows is not None:
        columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in header]
    else:
        flat = ",".join(body).split(",") if body else []
        columns = [flat[k::ncol] for k in range(ncol)]
    return columns, line_numbers, padded


def _id_columns(
    columns: list[tuple[list[str], str, bool]], path: Path, line_numbers: np.ndarray, strip: bool
) -> list[np.ndarray]:
    """Id arrays of CSV columns given as ``(values, name, allow_empty)``.

    ``strip``: drop surrounding whitespace and refuse inner whitespace. Of all problems in all columns
    the one on the earliest line is reported, so the message points at the first bad line of the file.
    """
    arrays = []
    problems: list[tuple[int, str]] = []
    for values, name, allow_empty in columns:
        array = np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")
        if strip and array.size:
            array = np.char.strip(array)
            rows = _rows_with_whitespace(array)
            if rows.size:
                i = int(rows[0])
                problems.append(
                    (
                        i,
                        f"{name} {str(array[i])!r} contains whitespace, which no ISC id (an image name) holds",
                    )
                )
        if not allow_empty:
            empty = np.flatnonzero(np.char.str_len(array) == 0)
            if empty.size:
                problems.append((int(empty[0]), f"empty {name}"))
        arrays.append(array)
    if problems:
        i, message = min(problems)
        raise ValueError(f"{path}, line {line_numbers[i]}: {message}")
    return arrays


def _check_csv_safe(ids: np.ndarray, name: str) -> None:
    """Refuse ids the CSV cannot hold or the reader would change: ISC ids are file names without
    extension, so no CSV quoting characters and no whitespace (the reader strips or refuses it)."""
    joined = "".join(ids.tolist())
    for char in _CSV_SPECIAL:
        if char in joined:
            i = int(np.flatnonzero(np.char.find(ids, char) >= 0)[0])
            raise ValueError(
                f"{name} {str(ids[i])!r} (row {i}) contains {char!r}, which the ISC CSV format cannot hold"
            )
    if _has_whitespace(joined):
        i = int(_rows_with_whitespace(ids)[0])
        raise ValueError(
            f"{name} {str(ids[i])!r} (row {i}) contains whitespace, which the reader would strip or refuse"
        )


# --------------------------------------------------------------------------------------------------
# matching-track predictions


def read_predictions(path: str | os.PathLike[str], max_rows: int | None = MAX_PREDICTIONS) -> Predictions:
    """Read a matching-track CSV (``query_id,reference_id,score``).

    Surrounding whitespace of every field is ignored (as the official reader strips its lines, so
    ``" Q1"`` and ``"R1 "`` do not silently score as misses); inner whitespace in an id is an error.
    Duplicate pairs are returned as they are: the metrics reject them with their own message.
    ``max_rows`` is the official 500,000 cap; ``max_rows=None`` lifts it (e.g. for pre-filtering dumps).
    """
    path = Path(path)
    columns, line_numbers, padded = _read_csv(path, PREDICTIONS_HEADER, max_rows, "prediction")
    queries, references, scores = columns
    query_ids, reference_ids = _id_columns(
        [(queries, "query_id", False), (references, "reference_id", False)], path, line_numbers, padded
    )
    try:
        values = np.array(scores, dtype=np.float64) if scores else np.zeros(0)
    except ValueError:
        for i, s in enumerate(scores):
            try:
                float(s)
            except ValueError:
                raise ValueError(f"{path}, line {line_numbers[i]}: score {s!r} is not a number") from None
        raise
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{path}, line {line_numbers[i]}: score {scores[i]!r} is not finite")
    return Predictions(query_ids, reference_ids, values)


def write_predictions(
    path: str | os.PathLike[str], predictions: Predictions, max_rows: int | None = MAX_PREDICTIONS
) -> None:
    """Write a matching-track CSV atomically; refuse duplicate pairs and more than ``max_rows`` rows.

    Scores are written with ``repr`` (shortest string that round-trips), so reading back gives the
    identical float64 values.
    """
    if max_rows is not None and len(predictions) > max_rows:
        raise ValueError(
            f"{len(predictions)} predictions exceed max_rows={max_rows} (the official matching-track limit is "
            f"{MAX_PREDICTIONS:,}): keep the best with predictions.top({max_rows}), or raise "
            "evaluation.max_predictions (max_rows=None in Python)"
        )
    predictions.check_no_duplicates()
    _check_csv_safe(predictions.query_ids, "query id")
    _check_csv_safe(predictions.reference_ids, "reference id")
    rows = zip(
        predictions.query_ids.tolist(),
        predictions.reference_ids.tolist(),
        predictions.scores.tolist(),
        strict=True,
    )
    text = ",".join(PREDICTIONS_HEADER) + "\n" + "".join(f"{q},{r},{s!r}\n" for q, r, s in rows)
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------------
# ground truth


def read_ground_truth(path: str | os.PathLike[str]) -> GroundTruth:
    """Read a DISC21 ground-truth CSV (``query_id,reference_id``; empty reference = no match).

    Whitespace is handled as in :func:`read_predictions`; a whitespace-only reference means no match.
    """
    path = Path(path)
    (queries, references), line_numbers, padded = _read_csv(path, GROUND_TRUTH_HEADER, None, "ground-truth")
    query_ids, reference_ids = _id_columns(
        [(queries, "query_id", False), (references, "reference_id", True)], path, line_numbers, padded
    )
    try:
        return GroundTruth(query_ids, reference_ids)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def write_ground_truth(path: str | os.PathLike[str], ground_truth: GroundTruth) -> None:
    """Write a DISC21 ground-truth CSV atomically (queries without a match get an empty reference)."""
    _check_csv_safe(ground_truth.query_ids, "query id")
    _check_csv_safe(ground_truth.reference_ids, "reference id")
    rows = zip(ground_truth.query_ids.tolist(), ground_truth.reference_ids.tolist(), strict=True)
    text = ",".join(GROUND_TRUTH_HEADER) + "\n" + "".join(f"{q},{r}\n" for q, r in rows)
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------------
# descriptors


def _check_block(name: str, ids: object, x: object) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"{name}_ids must be one-dimensional, got shape {ids.shape}")
    if ids.size == 0:
        ids = np.zeros(0, dtype="<U1")
    elif ids.dtype.kind == "S":
        try:
            ids = np.char.decode(ids, "ascii")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}_ids are not ASCII: {e}") from e
    elif ids.dtype.kind == "O" and all(isinstance(v, (str, bytes)) for v in ids.tolist()):
        ids = np.array([v.decode("ascii") if isinstance(v, bytes) else v for v in ids.tolist()], dtype=str)
    elif ids.dtype.kind != "U":
        raise ValueError(f"{name}_ids must be strings, got dtype {ids.dtype}")
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} descriptors must be a 2-D (n, d) array, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{name} descriptors must be numeric, got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # overflow becomes inf, reported below with its id
        x = np.ascontiguousarray(x, dtype=np.float32)
    if len(ids) != len(x):
        raise ValueError(f"{len(ids)} {name}_ids but {len(x)} {name} descriptor rows")
    empty = np.flatnonzero(np.char.str_len(ids) == 0)
    if empty.size:
        raise ValueError(f"{name}_ids has an empty id at row {empty[0]}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(
            f"{bad.size} {name} descriptor(s) contain NaN or inf (after float32 conversion), "
            f"first for id {str(ids[bad[0]])!r}"
        )
    _refuse_degenerate(name, ids, x)
    uniq, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        dups = uniq[counts > 1]
        raise ValueError(
            f"{name}_ids has {dups.size} duplicate id(s), e.g. {', '.join(repr(str(v)) for v in dups[:5])}"
        )
    return ids, x


def _refuse_degenerate(name: str, ids: np.ndarray, x: np.ndarray) -> None:
    """Zero rows, or one vector repeated for every image, carry no information yet score a small uAP.

    They come from a model that collapsed, an input pipeline that fed blank images, or a file written
    from a placeholder array; none is a submission anyone means to score.
    """
    zero = np.flatnonzero(~np.any(x, axis=1))
    if zero.size:
        raise ValueError(
            f"{zero.size} of {len(x)} {name} descriptor(s) are all zeros, e.g. id(s) "
            f"{', '.join(repr(str(v)) for v in ids[zero[:5]])}: a zero vector matches nothing; "
            "check the model and its input images"
        )
    if len(x) > 1 and x.shape[1] and np.ptp(x, axis=0).max() <= 1e-6 * max(float(np.abs(x).max()), 1e-30):
        raise ValueError(
            f"all {len(x)} {name} descriptors are the same vector: a collapsed model or constant input "
            "images; they cannot rank anything"
        )


@dataclass(frozen=True)
class Descriptors:
    """One descriptor file in memory: float32 rows aligned with their string ids.

    Shapes: ``query`` (Nq, d), ``reference`` (Nr, d), optional ``training`` (Nt, d); ids (N,) str.
    ``training`` is an extra (not in the official layout) used for score normalisation.
    Validates on construction: aligned lengths, finite values, unique non-empty ids, one dimension.
    """

    query_ids: np.ndarray
    query: np.ndarray
    reference_ids: np.ndarray
    reference: np.ndarray
    training_ids: np.ndarray | None = None
    training: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.training_ids is None) != (self.training is None):
            raise ValueError("training_ids and training must be given together")
        dims = {}
        for name in _SPLITS:
            ids, x = getattr(self, f"{name}_ids"), getattr(self, name)
            if ids is None:
                continue
            ids, x = _check_block(name, ids, x)
            object.__setattr__(self, f"{name}_ids", ids)
            object.__setattr__(self, name, x)
            dims[name] = x.shape[1]
        if len(set(dims.values())) > 1:
            raise ValueError(f"descriptor dimensions differ: {dims}")

    @property
    def dim(self) -> int:
        return int(self.query.shape[1])

    def sorted(self) -> Descriptors:
        """The same descriptors with each split's rows sorted by id (the official layout)."""
        parts = {}
        for name in _SPLITS:
            ids, x = getattr(self, f"{name}_ids"), getattr(self, name)
            if ids is not None:
                order = np.argsort(ids, kind="stable")
                ids, x = ids[order], x[order]
            parts[f"{name}_ids"], parts[name] = ids, x
        return Descriptors(**parts)


def write_descriptors(
    path: str | os.PathLike[str],
    query_ids: Sequence[str] | np.ndarray,
    query: np.ndarray,
    reference_ids: Sequence[str] | np.ndarray,
    reference: np.ndarray,
    training_ids: Sequence[str] | np.ndarray | None = None,
    training: np.ndarray | None = None,
    max_dim: int | None = DESCRIPTOR_TRACK_MAX_DIM,
) -> Descriptors:
    """Write descriptors in the official descriptor-track HDF5 layout, atomically; return what was written.

    Rows are sorted by id (ids kept aligned) and stored as float32, ids as fixed-length ASCII bytes.
    ``max_dim`` is the descriptor-track limit (256); pass ``None`` for matching-track or internal files.
    """
    descriptors = Descriptors(
        np.asarray(query_ids),
        np.asarray(query),
        np.asarray(reference_ids),
        np.asarray(reference),
        None if training_ids is None else np.asarray(training_ids),
        None if training is None else np.asarray(training),
    ).sorted()
    if max_dim is not None and descriptors.dim > max_dim:
        raise ValueError(
            f"descriptors have {descriptors.dim} dimensions, more than max_dim={max_dim} (the descriptor-track "
            "limit is 256): set evaluation.whitening.enabled=true with evaluation.whitening.dim<=256, or "
            "evaluation.descriptor_track_max_dim=null for a non-submission file (max_dim=None in Python)"
        )
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        for name in _SPLITS:
            ids, x = getattr(descriptors, f"{name}_ids"), getattr(descriptors, name)
            if ids is None:
                continue
            encoded = _encode_ascii(ids, f"{name}_ids")
            f.create_dataset(name, data=x)
            f.create_dataset(f"{name}_ids", data=encoded)
    return descriptors


def _encode_ascii(ids: np.ndarray, name: str) -> np.ndarray:
    """Fixed-length ASCII bytes, as the official code stores ids ("hdf5 does not always handle unicode")."""
    try:
        return np.char.encode(ids, "ascii") if ids.size else np.zeros(0, dtype="S1")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} must be ASCII for the official format: {e}") from e


def _open_hdf5(path: Path) -> h5py.File:
    if not path.is_file():
        raise FileNotFoundError(f"descriptor file {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from e


def _read_submission(path: Path) -> Descriptors:
    """One descriptor-track submission file: ``query``/``reference`` with ``*_ids`` (+ optional training)."""
    with _open_hdf5(path) as f:
        keys = set(f.keys())
        missing = [k for k in ("query", "query_ids", "reference", "reference_ids") if k not in keys]
        if missing:
            hint = (
                "; it holds one split in the per-split layout (vectors, image_names): pass "
                "{'queries': ..., 'references': ...[, 'training': ...]} or use read_split_descriptors"
                if {"vectors", "image_names"} <= keys
                else ""
            )
            raise ValueError(f"{path}: missing dataset(s) {missing}; found {sorted(keys)}{hint}")
        if ("training" in keys) != ("training_ids" in keys):
            raise ValueError(f"{path}: 'training' and 'training_ids' must be present together")
        arrays = {k: f[k][()] for k in keys if k in {*_SPLITS, *(f"{s}_ids" for s in _SPLITS)}}
    try:
        return Descriptors(**arrays)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# --------------------------------------------------------------------------------------------------
# per-split descriptor files (the official baselines' layout)

StrPath = str | os.PathLike[str]
SplitFiles = StrPath | Sequence[StrPath]
"""One split: a per-split HDF5 file, or its shards in order (the baselines write references in 20)."""
DescriptorSource = StrPath | Mapping[str, SplitFiles | None] | Sequence[SplitFiles]
"""What :func:`read_descriptors` takes: a submission file, ``{split: files}`` or ``[queries, references(,
training)]``."""

SPLIT_FILE_NAMES = {
    "query": "query_descriptors.hdf5",
    "reference": "reference_descriptors.hdf5",
    "training": "training_descriptors.hdf5",
}
"""File names :func:`write_split_descriptor_files` uses (the official tools take any name)."""
_SPLIT_KEYS = {
    "query": "query",
    "queries": "query",
    "reference": "reference",
    "references": "reference",
    "db": "reference",
    "training": "training",
    "train": "training",
}


def _file_list(files: object, split: str) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        return [Path(files)]
    if (
        isinstance(files, Sequence)
        and len(files) > 0
        and all(isinstance(f, (str, os.PathLike)) for f in files)
    ):
        return [Path(f) for f in files]
    raise ValueError(
        f"{split} descriptors: expected an HDF5 path or a non-empty list of paths, got {files!r}"
    )


def _image_ids(raw: np.ndarray, where: str) -> np.ndarray:
    """Ids from an ``image_names`` dataset, derived as the official ``read_descriptors`` does: ASCII
    decoding, then any directory and a ``.jpg``/``.png`` extension dropped (the baselines store paths)."""
    if raw.ndim != 1:
        raise ValueError(f"{where}: 'image_names' must be one-dimensional, got shape {raw.shape}")
    if raw.size == 0:
        return np.zeros(0, dtype="<U1")
    if raw.dtype.kind not in "SUO":
        raise ValueError(f"{where}: 'image_names' must be strings, got dtype {raw.dtype}")
    try:
        names = (
            np.char.decode(raw, "ascii") if raw.dtype.kind == "S" else np.array(raw, dtype=object).astype(str)
        )
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: 'image_names' are not ASCII ({e})") from e
    names = np.char.rpartition(names, "/")[:, 2]
    extension = np.char.endswith(names, ".jpg") | np.char.endswith(names, ".png")
    return np.where(extension, np.char.rpartition(names, ".")[:, 0], names)


def read_split_descriptors(files: SplitFiles, split: str = "split") -> tuple[np.ndarray, np.ndarray]:
    """Read one split from per-split HDF5 files (datasets ``vectors`` (n, d) and ``image_names`` (n,)).

    Shards are concatenated in the order given and ids derived from image names as the official
    ``isc/io.py`` ``read_descriptors`` does, so the official baselines' files read as-is. Returns
    ``(ids (N,) str, vectors (N, d) float32)``, validated like :class:`Descriptors` (finite, unique ids).
    """
    paths = _file_list(files, split)
    where = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more shard(s))"
    ids_parts, x_parts = [], []
    for path in paths:
        with _open_hdf5(path) as f:
            keys = set(f.keys())
            missing = [k for k in ("vectors", "image_names") if k not in keys]
            if missing:
                hint = (
                    "; it is a descriptor-track submission file: pass it on its own, not as one split"
                    if {"query", "reference"} <= keys
                    else ""
                )
                raise ValueError(f"{path}: missing dataset(s) {missing}; found {sorted(keys)}{hint}")
            vectors, raw = f["vectors"][()], f["image_names"][()]
        ids = _image_ids(np.asarray(raw), str(path))
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(
                f"{path}: 'vectors' must be (n, d) with n = {len(ids)} image names, got shape {vectors.shape}"
            )
        ids_parts.append(ids)
        x_parts.append(vectors)
    dims = {x.shape[1] for x in x_parts}
    if len(dims) > 1:
        shown = ", ".join(f"{p}: {x.shape[1]}" for p, x in zip(paths, x_parts, strict=True))
        raise ValueError(f"{split} descriptor shards differ in dimension ({shown})")
    try:
        return _check_block(split, np.concatenate(ids_parts), np.concatenate(x_parts))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def read_descriptors(source: DescriptorSource) -> Descriptors:
    """Read descriptors in any official layout; returns float32 arrays with ``str`` ids.

    ``source`` is one of
    - a path: a descriptor-track submission file (``query``, ``reference``, ``query_ids``,
      ``reference_ids``; optional ``training``/``training_ids``, our extra);
    - a mapping of per-split files: ``{"queries": q.hdf5, "references": [r0.hdf5, r1.hdf5],
      "training": t.hdf5}`` (keys also ``query``/``reference``/``db``/``train``; a ``None`` value is
      left out), each a path or a list of shards, as the official ``compute_metrics.py --track2`` takes;
    - a sequence ``[queries, references]`` or ``[queries, references, training]`` of the same.
    Checks the same things as the writers (except sorting and ``max_dim``: see
    :func:`check_descriptor_track`).
    """
    if isinstance(source, (str, os.PathLike)):
        return _read_submission(Path(source))
    splits: dict[str, SplitFiles] = {}
    if isinstance(source, Mapping):
        for key, files in source.items():
            split = _SPLIT_KEYS.get(str(key))
            if split is None:
                raise ValueError(f"unknown descriptor split {key!r}; use queries, references and training")
            if split in splits:
                raise ValueError(f"descriptor split {split!r} is given twice")
            if files is not None:
                splits[split] = files
    elif isinstance(source, Sequence):
        if len(source) not in (2, 3):
            raise ValueError(
                f"a list of per-split descriptor files is [queries, references] or [queries, references, "
                f"training], got {len(source)} entries"
            )
        splits = dict(zip(_SPLITS, source, strict=False))
    else:
        raise TypeError(f"descriptors: expected a path, a mapping or a list, got {type(source).__name__}")
    missing = [s for s in ("query", "reference") if s not in splits]
    if missing:
        raise ValueError(f"per-split descriptors: missing {missing}; given {sorted(splits)}")
    parts: dict[str, np.ndarray] = {}
    for split, files in splits.items():
        parts[f"{split}_ids"], parts[split] = read_split_descriptors(files, split)
    try:
        return Descriptors(**parts)
    except ValueError as e:
        raise ValueError(f"per-split descriptors {dict(splits)}: {e}") from e


def write_split_descriptors(
    path: StrPath, ids: Sequence[str] | np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Write one split as the official ``write_hdf5_descriptors`` does, atomically; return what was written.

    ``vectors`` float32 (n, d) and ``image_names`` fixed-length ASCII bytes, rows in the order given, so
    the official ``compute_metrics.py --track2`` and ``score_normalization.py`` read it. Ids the official
    reader would change (a ``/`` or a ``.jpg``/``.png`` ending) are refused.
    """
    ids_array, x = _check_block("split", np.asarray(ids), np.asarray(vectors))
    encoded = _encode_ascii(ids_array, "image_names")
    changed = np.flatnonzero(_image_ids(encoded, str(path)) != ids_array)
    if changed.size:
        i = int(changed[0])
        raise ValueError(
            f"id {str(ids_array[i])!r} (row {i}) would be read back by the official reader as "
            f"{str(_image_ids(encoded[i : i + 1], str(path))[0])!r}: ids must not hold '/' nor end in .jpg/.png"
        )
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("vectors", data=x)
        f.create_dataset("image_names", data=encoded)
    return ids_array, x


def write_split_descriptor_files(directory: StrPath, descriptors: Descriptors) -> dict[str, Path]:
    """Write every split of ``descriptors`` to ``directory`` as per-split files (:data:`SPLIT_FILE_NAMES`).

    Returns ``{split: path}``: hand them to the official tools (``--query_descs``, ``--db_descs``,
    ``--train_descs``) or back to :func:`read_descriptors` as a mapping.
    """
    out = {}
    for split in _SPLITS:
        ids, x = getattr(descriptors, f"{split}_ids"), getattr(descriptors, split)
        if ids is None:
            continue
        out[split] = Path(directory) / SPLIT_FILE_NAMES[split]
        write_split_descriptors(out[split], ids, x)
    return out


def check_descriptor_track(
    path: str | os.PathLike[str], max_dim: int = DESCRIPTOR_TRACK_MAX_DIM
) -> Descriptors:
    """Apply the official descriptor-track constraints to a file; raise listing every violation.

    On top of :func:`read_descriptors`: float32 storage, at most ``max_dim`` dimensions, ids stored as
    fixed-length ASCII bytes, rows sorted by id.
    """
    path = Path(path)
    descriptors = read_descriptors(path)
    problems = []
    with h5py.File(path, "r") as f:
        for name in ("query", "reference"):
            if f[name].dtype != np.float32:
                problems.append(f"'{name}' is stored as {f[name].dtype}, not float32")
            if f[f"{name}_ids"].dtype.kind != "S":
                problems.append(
                    f"'{name}_ids' is stored as {f[f'{name}_ids'].dtype}, not fixed-length ASCII bytes"
                )
    if descriptors.dim > max_dim:
        problems.append(f"{descriptors.dim} dimensions, more than {max_dim}")
    for name in ("query", "reference"):
        ids = getattr(descriptors, f"{name}_ids")
        if ids.size > 1 and not np.all(ids[:-1] < ids[1:]):
            first = int(np.flatnonzero(ids[:-1] >= ids[1:])[0])
            problems.append(
                f"'{name}' rows are not sorted by id ({str(ids[first])!r} comes before {str(ids[first + 1])!r})"
            )
    if problems:
        raise ValueError(f"{path} breaks the descriptor-track rules: " + "; ".join(problems))
    return descriptors
