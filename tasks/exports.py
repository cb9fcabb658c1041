"""``task=export``: the descriptor model as one self-contained file that loads without Lightning or Hydra,
as TorchScript, which loads without this package, and as ONNX, which loads without PyTorch."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from isc.models.descriptor import save_descriptor_model
from isc.models.onnx_export import save_onnx
from isc.models.torchscript import save_torchscript
from tasks.common import descriptor_model, evaluation_settings


def export(cfg: DictConfig) -> dict[str, object]:
    """Write the descriptor model (``ckpt_path`` or the configured backbone) as one self-contained file."""
    settings = evaluation_settings(cfg)
    model = descriptor_model(cfg)
    if model.image_size is None:
        model.image_size = settings.image_size
    out = Path(cfg.paths.output_dir)
    path = save_descriptor_model(model, out / "descriptor_model.pt")
    scripted, how = save_torchscript(model, out / "descriptor_model.torchscript.pt", model.image_size)
    onnx_path, onnx_how = save_onnx(model, out / "descriptor_model.onnx", model.image_size)
    print(f"exported a {model.dim}-d descriptor model ({model.image_size} px input) to {path}")
    print(f"evaluate it with: python run.py task=evaluate ckpt_path={path}")
    sizes = "any input size" if how == "script" else f"{model.image_size} px inputs (traced)"
    print(f"TorchScript ({sizes}), for torch.jit.load without this package: {scripted}")
    if onnx_path is not None:
        print(f"ONNX (any batch and input size; {onnx_how}), for runtimes without PyTorch: {onnx_path}")
    else:
        print(f"no ONNX file: {onnx_how}")
    return {
        "path": str(path),
        "torchscript": str(scripted),
        "onnx": None if onnx_path is None else str(onnx_path),
        "descriptor_dim": model.dim,
        "image_size": model.image_size,
    }
