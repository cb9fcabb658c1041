"""Atomic file writes: a killed or failing run never leaves a truncated file that looks finished.

Every stage writes through :func:`atomic_write` (CSVs, HDF5 descriptors and shards, checkpoints exports,
generated images, reports), so this sits in the bottom layer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write"]


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
