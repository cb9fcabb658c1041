"""The descriptor model as ONNX, for runtimes without PyTorch (onnxruntime, TensorRT, OpenVINO).

:func:`save_onnx` exports with PyTorch's TorchScript-based exporter (``dynamo=False``: it needs only the
``onnx`` package and takes a second, where the dynamo exporter takes ten and needs onnxscript), with the
batch, height and width dynamic. When onnxruntime is installed the file is run on a random batch at two
sizes and refused if it differs from the PyTorch model by more than 1e-5. The model's spec (as in the
TorchScript file) is in the ONNX metadata under ``isc_descriptor_model``.

ONNX is optional: without the ``export`` extra (``pip install -e '.[export]'``), or for a trunk the
exporter cannot handle, :func:`save_onnx` returns ``None`` with the reason and ``task=export`` writes the
other formats.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isc.formats.files import atomic_write
from isc.models.descriptor import DescriptorModel

__all__ = ["METADATA_KEY", "save_onnx"]

log = logging.getLogger(__name__)

METADATA_KEY = "isc_descriptor_model"
TOLERANCE = 1e-5  # max |ONNX - PyTorch| over a unit descriptor
OPSET = 18


def save_onnx(model: DescriptorModel, path: str | Path, image_size: int) -> tuple[Path | None, str]:
    """Write ``model`` as ONNX (atomically); returns the path, or ``None`` and why nothing was written."""
    try:
        import onnx
    except ImportError:
        return None, "the onnx package is not installed (pip install -e '.[export]')"
    eager = copy.deepcopy(model).cpu().eval()
    batch = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            _export(eager, batch, tmp)
            exported = onnx.load(str(tmp))
            spec = {
                "descriptor_dim": model.dim,
                "image_size": image_size,
                "input": "images (B, 3, H, W) float32 RGB in [0, 1]; the model normalises it",
                "output": "descriptors (B, D) float32" + (", L2-normalised" if model.normalize else ""),
            }
            onnx.helper.set_model_props(exported, {METADATA_KEY: json.dumps(spec)})
            onnx.save(exported, str(tmp))
            how = _check(eager, tmp, image_size)
    except _ExporterFailed as e:  # an operator the exporter does not know: the other formats still ship
        log.warning("%s", e)
        return None, str(e)
    return path, how


class _ExporterFailed(Exception):
    pass


def _export(model: DescriptorModel, batch: torch.Tensor, path: Path) -> None:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
            torch.onnx.export(
                model,
                (batch,),
                str(path),
                input_names=["images"],
                output_names=["descriptors"],
                dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "descriptors": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as e:
        raise _ExporterFailed(
            f"the ONNX exporter cannot handle this model ({type(e).__name__}: {str(e)[:200]})"
        ) from e


def _check(eager: DescriptorModel, path: Path, image_size: int) -> str:
    """Compare the file with the PyTorch model under onnxruntime, at ``image_size`` and a larger size."""
    try:
        import onnxruntime
    except ImportError:
        return "exported (not checked: onnxruntime is not installed)"
    session: Any = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for size in (image_size, image_size + 16):
        images = torch.rand(3, 3, size, size, generator=generator)
        got = session.run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            expected = eager(images).numpy()
        gap = float(np.abs(got - expected).max())
        if not gap <= TOLERANCE:
            raise ValueError(f"the ONNX model differs from the PyTorch one by {gap:.2e} at {size} px")
    return "checked against PyTorch with onnxruntime"
