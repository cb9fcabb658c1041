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
from multiprocessing import forkserver, get_context
from typing import Any

_CONTEXT = get_context("forkserver")


def in_fresh_process(fn: Callable[..., Any], *args: Any, preload: Sequence[str] = ()) -> Any:
    """``fn(*args)`` in a new process forked from the server, which imports ``fn``'s module (the script,
    ``__main__``, when it runs as one) and ``preload`` when the first call starts it."""
    _start_server([fn.__module__, *preload])
    with ProcessPoolExecutor(max_workers=1, mp_context=_CONTEXT) as pool:
        return pool.submit(fn, *args).result()


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
