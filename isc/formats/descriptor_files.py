"""Descriptor HDF5 files in the two official layouts: validating readers, atomic writers.

The descriptor-track submission is one file with ``query``/``reference``/``query_ids``/``reference_ids``;
the baselines' per-split files hold ``vectors`` + ``image_names`` (possibly sharded). Readers refuse what
the official evaluation would trip over, naming the file; writers are atomic. See docs/formats.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from isc.formats.files import atomic_write

__all__ = [
    "DESCRIPTOR_TRACK_MAX_DIM",
    "SPLIT_FILE_NAMES",
    "DescriptorSource",
    "Descriptors",
    "SplitFiles",
    "check_descriptor_track",
    "read_descriptors",
    "read_split_descriptors",
    "write_descriptors",
    "write_split_descriptors",
    "write_split_descriptor_files",
]

DESCRIPTOR_TRACK_MAX_DIM = 256
"""The official descriptor-track cap on the descriptor dimension."""

_SPLITS = ("query", "reference", "training")


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
