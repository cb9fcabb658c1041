"""Run one benchmark phase in a process of its own, so that its peak RSS owes nothing to the others.

The processes fork from a multiprocessing forkserver that has already imported the heavy modules
(torch, faiss, the library): a phase starts in milliseconds instead of re-importing for seconds, and
its RSS at start is the server's, below the base each phase measures after its imports and warm-up.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import forkserver, get_context, set_start_method
from typing import Any

_CONTEXT = get_context("forkserver")


def in_fresh_process(fn: Callable[..., Any], *args: Any, preload: Sequence[str] = ()) -> Any:
    """``fn(*args)`` in a new process forked from the server, which imports ``fn``'s module (the script,
    ``__main__``, when it runs as one) and ``preload`` when the first call starts it."""
    _start_server([fn.__module__, *preload])
    with ProcessPoolExecutor(max_workers=1, mp_context=_CONTEXT) as pool:
        return pool.submit(_forking, fn, *args).result()


def in_fresh_processes(
    fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], preload: Sequence[str] = ()
) -> list[Any]:
    """``fn(*args)`` for every ``args`` of ``calls``, each in its own new process, all at once."""
    _start_server([fn.__module__, *preload])
    with ProcessPoolExecutor(max_workers=len(calls), mp_context=_CONTEXT) as pool:
        futures = [pool.submit(_forking, fn, *args) for args in calls]
        return [f.result() for f in futures]


def _forking(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with ``fork`` as the default start method: a child of the server inherits
    ``forkserver``, and a DataLoader's workers would then each wait for a new server's imports."""
    set_start_method("fork", force=True)
    return fn(*args)


def _start_server(preload: list[str]) -> None:
    """Start the server (once) with this process's import path: Python 3.11's forkserver drops the
    ``sys.path`` it is handed, and a module it cannot import is silently not preloaded."""
    _CONTEXT.set_forkserver_preload(preload)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
