"""The descriptor model as TorchScript: one file that plain ``torch.jit.load`` runs, without this package.

SSCD ships its models this way. :func:`save_torchscript` compiles the model with ``torch.jit.script``
(any input size) or, when the code does not script, traces it at its input size; either way it checks the
compiled model against the PyTorch one on a random batch and refuses to write a file that disagrees.
The file carries the model's spec (input size, descriptor dimension, normalisation) as the extra file
``isc_descriptor_model.json``: ``torch.jit.load(path, _extra_files={"isc_descriptor_model.json": ""})``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from isc.formats.files import atomic_write
from isc.models.descriptor import DescriptorModel

__all__ = ["SPEC_FILE", "save_torchscript", "to_torchscript"]

log = logging.getLogger(__name__)

SPEC_FILE = "isc_descriptor_model.json"
TOLERANCE = 1e-5  # max |TorchScript - PyTorch| over a unit descriptor


def to_torchscript(model: DescriptorModel, image_size: int) -> tuple[torch.jit.ScriptModule, str]:
    """``model`` compiled for the CPU (``"script"``) or traced at ``image_size`` (``"trace"``), checked."""
    eager = copy.deepcopy(model).cpu().eval()
    for p in eager.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(2, 3, image_size, image_size, generator=generator)
    compiled: Any
    with _jit_deprecation_quiet():
        try:
            compiled, how = torch.jit.script(eager), "script"
        except Exception as e:  # a trunk whose Python does not script: trace it at the size it is used at
            log.info("torch.jit.script failed (%s): tracing at %d px", type(e).__name__, image_size)
            with torch.no_grad():
                compiled, how = torch.jit.trace(eager, batch), "trace"
    with torch.no_grad():
        gap = float((compiled(batch) - eager(batch)).abs().max())
    if not gap <= TOLERANCE:
        raise ValueError(f"the TorchScript model ({how}) differs from the PyTorch one by {gap:.2e}")
    return compiled, how


def save_torchscript(model: DescriptorModel, path: str | Path, image_size: int) -> tuple[Path, str]:
    """Write ``model`` as a TorchScript file (atomically); returns the path and how it was compiled."""
    compiled, how = to_torchscript(model, image_size)
    spec = {
        "descriptor_dim": model.dim,
        "image_size": image_size,
        "input": "(B, 3, H, W) float32 RGB in [0, 1]; the model normalises it",
        "output": "(B, D) float32, L2-normalised" if model.normalize else "(B, D) float32",
        "compiled": how,
        "input_sizes": "any" if how == "script" else f"{image_size} x {image_size} only (traced)",
    }
    path = Path(path)
    with atomic_write(path) as tmp, _jit_deprecation_quiet():
        torch.jit.save(compiled, str(tmp), _extra_files={SPEC_FILE: json.dumps(spec)})
    return path, how


@contextlib.contextmanager
def _jit_deprecation_quiet() -> Iterator[None]:
    """torch 2.13 marks ``torch.jit`` deprecated (FutureWarning) in favour of ``torch.export``; the
    format is still what plain ``torch.jit.load`` reads, and what SSCD's released models use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield
