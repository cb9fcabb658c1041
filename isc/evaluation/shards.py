"""Resumable descriptor extraction: descriptors stream to HDF5 shards, and a rerun reuses finished ones.

A killed ``task=evaluate`` on a million references should not recompute every descriptor.
:func:`extract_sharded` splits a dataset into consecutive shards of ``shard_size`` images, runs
:func:`~isc.evaluation.extract.extract_descriptors` on one shard at a time and writes each shard as soon
as it is done, atomically (:func:`~isc.evaluation.io.atomic_write`: temp file + rename), so a shard file
that exists is complete. A rerun reuses a shard only if its recorded fingerprints still match:

``cache_dir/<key>/<name>/shard-00000.h5``, ``shard-00001.h5``, ...

- ``key`` hashes everything that changes the numbers for *every* image: the model
  (:func:`model_fingerprint`: class, structure and every weight byte), the input size and transform,
  ``batch_size`` and ``shard_size`` (batch boundaries: a network's output for an image may depend on the
  other images of its batch), the device kind and the torch version (kernels differ);
- ``name`` keeps the splits of one run apart (default: the folder holding the images plus a short hash of
  its path, e.g. ``references-3fa1c2d9``);
- each shard records, as HDF5 attributes, the model fingerprint, the settings and
  :func:`listing_fingerprint` of *its own* images (path, size and mtime of each), and holds ``vectors``
  (float32) and ``image_names`` (UTF-8 ids; the official per-split layout, so
  :func:`~isc.evaluation.io.read_split_descriptors` reads a shard with ASCII ids). An edited image
  invalidates only its shard; an inserted or removed image shifts, and so recomputes, every later shard.

Batch boundaries are the same in a fresh and a resumed run (``shard_size`` is rounded up to a multiple of
``batch_size``), so the result is byte-identical to one :func:`extract_descriptors` call over the whole
dataset (given deterministic kernels: on CUDA, cuDNN autotuning can differ from run to run by itself).

Two runs sharing a cache need no lock: each writes its own temporary file and renames it over the shard,
and both compute the same content; a reader only ever sees a complete file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from isc.data.images import ImageFolderDataset
from isc.evaluation.extract import extract_descriptors, resolve_device
from isc.evaluation.io import atomic_write

__all__ = [
    "SHARD_FORMAT",
    "cached_arrays",
    "stable_repr",
    "extract_sharded",
    "listing_fingerprint",
    "model_fingerprint",
    "shard_directory",
]

log = logging.getLogger(__name__)

SHARD_FORMAT = "isc-descriptor-shard-v1"
"""Recorded in every shard (attribute ``format``): bump it when the layout or the keying changes."""
DEFAULT_SHARD_SIZE = 10_000
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


def _default_name(paths: Sequence[Path]) -> str:
    """The images' common folder name plus a short hash of its absolute path (``references-3fa1c2d9``)."""
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(folder)) or "images"
    return f"{stem}-{hashlib.sha256(folder.encode()).hexdigest()[:8]}"


def stable_repr(obj: object) -> str:
    """``repr(obj)`` without memory addresses: the same text in every process, for cache keys."""
    return _ADDRESS.sub("", repr(obj))


# --------------------------------------------------------------------------------------------------
# shards


def _read_shard(path: Path, expected: Mapping[str, str], ids: Sequence[str]) -> np.ndarray | None:
    """The shard's vectors if ``path`` exists and matches ``expected`` and ``ids``; else ``None``.

    An unreadable file (truncated, corrupt, wrong layout) is logged and treated as missing: it is
    recomputed and atomically replaced, never a crash.
    """
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs.get(k) for k in expected}
            if attrs != dict(expected):
                log.info("shard %s is stale (model, settings or images changed): recomputing", path)
                return None
            vectors = f["vectors"][()]
            stored = [bytes(b).decode("utf-8") for b in f["image_names"][()]]
    except Exception as e:  # h5py raises OSError, KeyError, ... on truncated or foreign files
        log.warning("shard %s is unreadable (%s: %s): recomputing it", path, type(e).__name__, e)
        return None
    if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != len(ids) or stored != list(ids):
        log.warning("shard %s holds other images or a bad array %s: recomputing it", path, vectors.shape)
        return None
    return vectors


def _write_shard(path: Path, attrs: Mapping[str, str], ids: Sequence[str], vectors: np.ndarray) -> None:
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("vectors", data=np.asarray(vectors, dtype=np.float32))
        f.create_dataset("image_names", data=np.array([i.encode("utf-8") for i in ids], dtype=bytes))
        for k, v in attrs.items():
            f.attrs[k] = v


def _sweep_stale_temps(directory: Path) -> None:
    """Delete temporary shard files a killed run left behind (a live run's are seconds old)."""
    now = time.time()
    for tmp in directory.glob(".shard-*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TEMP_SECONDS:
                tmp.unlink()
        except FileNotFoundError:
            pass


def cached_arrays(
    path: str | os.PathLike[str], attrs: Mapping[str, str], compute: Callable[[], Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The arrays stored at ``path`` when its attributes equal ``attrs`` (fingerprints), else ``compute()``'s.

    For results that are not one row per image, such as the views of one reference block in the test
    stage. Computed arrays are written atomically before they are returned, so a killed run keeps every
    finished piece; an unreadable or stale file is recomputed and replaced, never trusted.
    """
    target = Path(path)
    if target.is_file():
        try:
            with h5py.File(target, "r") as f:
                if {k: f.attrs.get(k) for k in attrs} == dict(attrs):
                    return {k: f[k][()] for k in f}
            log.info("%s is stale (model, settings or images changed): recomputing", target)
        except Exception as e:  # truncated or foreign file
            log.warning("%s is unreadable (%s: %s): recomputing it", target, type(e).__name__, e)
    arrays = {k: np.asarray(v) for k, v in compute().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as tmp, h5py.File(tmp, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array)
        for k, v in attrs.items():
            f.attrs[k] = v
    return arrays


def _shard_view(dataset: ImageFolderDataset, start: int, stop: int) -> ImageFolderDataset:
    """``dataset`` restricted to images ``start:stop`` (same class and transform; indices restart at 0)."""
    view = copy.copy(dataset)
    view.paths = list(dataset.paths[start:stop])
    view.ids = list(dataset.ids[start:stop])
    return view


def extract_sharded(
    model: nn.Module,
    dataset: ImageFolderDataset,
    cache_dir: str | os.PathLike[str] | None,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    desc: str = "descriptors",
    image_size: int | None = None,
    extra: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> np.ndarray:
    """:func:`extract_descriptors` over ``dataset``, through a shard cache in ``cache_dir``: (N, D) float32.

    ``cache_dir=None`` is a plain :func:`extract_descriptors` call. Otherwise the dataset is cut into
    consecutive shards of ``shard_size`` images (rounded up to a multiple of ``batch_size`` so batch
    boundaries, hence the bytes, match one uninterrupted call); a shard whose file is present with matching
    fingerprints is read back, any other is extracted and written at once. Extraction holds one shard's
    descriptors besides the result; the result itself is a plain in-memory array (N x D x 4 bytes), filled
    shard by shard without a final concatenation. ``image_size`` and ``extra`` (settings that change
    outputs, JSON-serialisable) join the cache key; the dataset's transform ``repr`` is keyed
    automatically. ``name`` names the split's folder under the key (default: derived from the images'
    folder). See the module docstring for the layout.
    """
    if cache_dir is None or len(dataset) == 0:
        return extract_descriptors(
            model,
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            progress=progress,
            desc=desc,
        )
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    shard_size = -(-shard_size // batch_size) * batch_size
    dev = resolve_device(device)
    settings: dict[str, Any] = {
        "format": SHARD_FORMAT,
        "model": model_fingerprint(model),
        "image_size": image_size,
        "extra": dict(extra or {}),
        "dataset": type(dataset).__qualname__,
        "transform": stable_repr(getattr(dataset, "transform", None)),
        "batch_size": batch_size,
        "shard_size": shard_size,
        "device": dev.type if dev.type != "cuda" else f"cuda:{torch.cuda.get_device_name(dev)}",
        "torch": torch.__version__,
    }
    directory = shard_directory(cache_dir, settings, name or _default_name(dataset.paths))
    directory.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(directory)
    settings_json = json.dumps(settings, sort_keys=True, default=str)
    listing_extra = {"settings": settings_json}

    n = len(dataset)
    n_shards = -(-n // shard_size)
    out: np.ndarray | None = None
    reused_shards = reused_images = 0
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for s in range(n_shards):
            start, stop = s * shard_size, min((s + 1) * shard_size, n)
            path = directory / f"shard-{s:05d}.h5"
            ids = [str(i) for i in dataset.ids[start:stop]]
            attrs = {
                "format": SHARD_FORMAT,
                "model": settings["model"],
                "settings": settings_json,
                "listing": listing_fingerprint(
                    dataset.paths[start:stop], image_size=image_size, extra=listing_extra
                ),
            }
            vectors = _read_shard(path, attrs, ids)
            if vectors is not None:
                reused_shards += 1
                reused_images += stop - start
            else:
                vectors = extract_descriptors(
                    model,
                    _shard_view(dataset, start, stop),
                    batch_size=batch_size,
                    num_workers=num_workers,
                    device=dev,
                    progress=progress,
                    desc=f"{desc} shard {s + 1}/{n_shards}",
                )
                _write_shard(path, attrs, ids, vectors)
            if out is None:
                out = np.empty((n, vectors.shape[1]), dtype=np.float32)
            elif vectors.shape[1] != out.shape[1]:
                raise ValueError(f"shard {path} has dimension {vectors.shape[1]}, others {out.shape[1]}")
            out[start:stop] = vectors
            del vectors
            bar.update(stop - start)
            bar.set_postfix(reused=f"{reused_shards}/{s + 1} shards")
    finally:
        bar.close()
    log.info(
        "%s: reused %d of %d shards (%d images) from %s",
        desc,
        reused_shards,
        n_shards,
        reused_images,
        directory,
    )
    assert out is not None  # n > 0, so at least one shard
    return out
