"""The shard cache of the extraction engine: fingerprints, keys and shard files.

A killed ``task=evaluate`` on a million references should not recompute every descriptor:
:func:`isc.evaluation.extract.extract` writes each shard of images as soon as it is done, atomically
(:func:`~isc.formats.files.atomic_write`: temp file + rename), so a shard file that exists is complete. A
rerun reuses a shard only if its recorded fingerprints still match:

``cache_dir/<key>/<name>/shard-00000.h5``, ``shard-00001.h5``, ...

- ``key`` hashes everything that changes the numbers for *every* image: the model
  (:func:`model_fingerprint`: class, structure and every weight byte), the scales and transform, the views
  (query views, crops, the whole image), the input memory format, the images per batch and ``shard_size`` (batch boundaries: a
  network's output for an image may depend on the other images of its batch), the device kind and the
  torch version (kernels differ);
- ``name`` keeps the listings of one run apart (default: the folder holding the images plus a short hash
  of its path, e.g. ``references-3fa1c2d9``);
- each shard records, as HDF5 attributes, the model fingerprint, the settings and
  :func:`listing_fingerprint` of *its own* images (path, size and mtime of each), and holds ``vectors``
  (float32, first scale) and ``image_names`` (UTF-8 id of each row; the official per-split layout, so
  :func:`~isc.formats.descriptor_files.read_split_descriptors` reads a shard), the other scales and the
  views. An edited image invalidates only its shard; an inserted or removed image shifts, and so
  recomputes, every later shard.

Batch boundaries are the same in a fresh and a resumed run (``shard_size`` is rounded up to a whole
number of batches), so the result is byte-identical to an uninterrupted extraction (given deterministic
kernels: on CUDA, cuDNN autotuning can differ from run to run by itself).

Two runs sharing a cache need no lock: each writes its own temporary file and renames it over the shard,
and both compute the same content; a reader only ever sees a complete file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from isc.formats.files import atomic_write

__all__ = [
    "SHARD_FORMAT",
    "default_name",
    "listing_fingerprint",
    "model_fingerprint",
    "read_shard",
    "shard_directory",
    "stable_repr",
    "sweep_stale_temps",
    "write_shard",
]

log = logging.getLogger(__name__)

SHARD_FORMAT = "isc-descriptor-shard-v2"
"""Recorded in every shard (attribute ``format``): bump it when the layout or the keying changes."""
_STALE_TEMP_SECONDS = 600  # a temporary shard older than this belongs to a killed run (writes take ~1 s)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # reprs of functions/objects hold memory addresses
_SCALARS = (bool, int, float, str, type(None))


# --------------------------------------------------------------------------------------------------
# fingerprints


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over a model's class, structure, plain settings and every weight: any change is a new key.

    Hashed in order: the class name, ``repr(model)`` (the module tree), each submodule's plain attributes
    (bools, numbers, strings such as a ``normalize`` flag or a pooling ``eps``; ``training`` and private
    ones excluded),
    then name, dtype, shape and raw bytes of every ``state_dict`` tensor and of the non-persistent buffers
    (e.g. input normalisation statistics, which ``state_dict`` leaves out). About 0.2 s for a ResNet-50.
    """
    h = hashlib.sha256()
    h.update(f"{type(model).__qualname__}\n".encode())  # not the module: a script's class is __main__.X
    h.update(_ADDRESS.sub("", repr(model)).encode())
    for prefix, module in model.named_modules():
        plain = {
            k: v
            for k, v in sorted(vars(module).items())
            if isinstance(v, _SCALARS) and k != "training" and not k.startswith("_")
        }
        h.update(f"\n{prefix}:{json.dumps(plain, sort_keys=True, default=str)}".encode())
    state = model.state_dict()
    tensors = list(state.items()) + [(k, v) for k, v in model.named_buffers() if k not in state]
    for name, value in tensors:
        if not isinstance(value, torch.Tensor):
            h.update(f"\n{name}:{value!r}".encode())
            continue
        t = value.detach()
        if t.is_sparse:
            t = t.to_dense()
        h.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def listing_fingerprint(
    paths: Sequence[str | os.PathLike[str]],
    *,
    image_size: int | None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """sha256 over the ordered ``(absolute path, size, mtime_ns)`` of ``paths``, ``image_size`` and ``extra``.

    A different list, order, or an edited or replaced file (new size or mtime) gives a new fingerprint,
    without reading any pixels. ``extra`` holds further settings that change outputs (a transform name);
    it must be JSON-serialisable (other values are hashed by ``str``). A missing file hashes as size -1:
    extraction then fails on it with an error naming it.
    """
    h = hashlib.sha256()
    h.update(
        json.dumps({"image_size": image_size, "extra": extra or {}}, sort_keys=True, default=str).encode()
    )
    for p in paths:
        path = os.path.abspath(os.fspath(p))
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except FileNotFoundError:
            size, mtime = -1, -1
        h.update(f"\n{path}\0{size}\0{mtime}".encode())
    return h.hexdigest()


def shard_directory(cache_dir: str | os.PathLike[str], settings: Mapping[str, Any], name: str) -> Path:
    """``cache_dir/<sha256 of settings, 20 hex digits>/<name>``: one folder per model + settings + split."""
    key = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cache_dir) / key / name


def default_name(paths: Sequence[Path]) -> str:
    """The images' common folder name plus a short hash of its absolute path (``references-3fa1c2d9``)."""
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(folder)) or "images"
    return f"{stem}-{hashlib.sha256(folder.encode()).hexdigest()[:8]}"


def stable_repr(obj: object) -> str:
    """``repr(obj)`` without memory addresses: the same text in every process, for cache keys."""
    return _ADDRESS.sub("", repr(obj))


# --------------------------------------------------------------------------------------------------
# shard files


def read_shard(path: Path, expected: Mapping[str, str], ids: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The shard's arrays if ``path`` exists, its attributes equal ``expected`` and it holds ``ids``.

    Else ``None``: a stale shard (model, settings or images changed) or an unreadable one (truncated,
    corrupt, foreign) is logged and recomputed, then atomically replaced; never a crash, never trusted.
    """
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if {k: f.attrs.get(k) for k in expected} != dict(expected):
                log.info("shard %s is stale (model, settings or images changed): recomputing", path)
                return None
            arrays = {k: f[k][()] for k in f}
        stored = [bytes(b).decode("utf-8") for b in arrays["ids"]]
        vectors = arrays["vectors"]
        good = vectors.dtype == np.float32 and vectors.ndim == 2 and len(vectors) == len(arrays["owner"])
    except Exception as e:  # h5py raises OSError, KeyError, ... on truncated or foreign files
        log.warning("shard %s is unreadable (%s: %s): recomputing it", path, type(e).__name__, e)
        return None
    if not good or stored != list(ids):
        log.warning("shard %s holds other images or a bad array %s: recomputing it", path, vectors.shape)
        return None
    return arrays


def write_shard(path: Path, attrs: Mapping[str, str], arrays: Mapping[str, np.ndarray]) -> None:
    """All ``arrays`` and the fingerprints ``attrs`` in one HDF5 file, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=np.asarray(array))
        for k, v in attrs.items():
            f.attrs[k] = v


def sweep_stale_temps(directory: Path) -> None:
    """Delete temporary shard files a killed run left behind (a live run's are seconds old)."""
    now = time.time()
    for tmp in directory.glob(".shard-*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TEMP_SECONDS:
                tmp.unlink()
        except FileNotFoundError:
            pass
