"""``task=export``: the descriptor model as one self-contained file that loads without Lightning or Hydra."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from isc.models.descriptor import save_descriptor_model
from tasks.common import descriptor_model, evaluation_settings


def export(cfg: DictConfig) -> dict[str, object]:
    """Write the descriptor model (``ckpt_path`` or the configured backbone) as one self-contained file."""
    settings = evaluation_settings(cfg)
    model = descriptor_model(cfg)
    if model.image_size is None:
        model.image_size = settings.image_size
    path = save_descriptor_model(model, Path(cfg.paths.output_dir) / "descriptor_model.pt")
    print(f"exported a {model.dim}-d descriptor model ({model.image_size} px input) to {path}")
    print(f"evaluate it with: python run.py task=evaluate ckpt_path={path}")
    return {"path": str(path), "descriptor_dim": model.dim, "image_size": model.image_size}
