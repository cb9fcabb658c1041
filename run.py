"""Single entry point: ``python run.py task=<task> [overrides...]`` (Hydra).

Hydra plumbing only: compose the config, save it resolved into the run dir, dispatch to the task
(``tasks/``), and return the metric a sweeper optimises.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from tasks import TASKS


def _required(message: str) -> object:
    """``${required:...}``: a config value the user must give; resolving it stops with ``message``."""
    raise ValueError(f"missing setting: {message}")


OmegaConf.register_new_resolver("required", _required, replace=True)


def run_task(cfg: DictConfig) -> float | None:
    """What ``main`` does with the composed config (also callable from tests and notebooks)."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose one of {sorted(TASKS)}")
    for key in ("loss", "optimizer", "scheduler"):
        if key in cfg:  # `+loss=...` would add a key nothing reads
            raise ValueError(f"the {key} belongs to the model: use model/{key}=<name> (see --help)")
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config_resolved.yaml", resolve=True)  # also checks required settings
    metrics = TASKS[cfg.task](cfg)
    value = metrics.get(cfg.optimized_metric, metrics.get("uAP"))
    return float(value) if isinstance(value, int | float) else None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_task(cfg)


if __name__ == "__main__":
    main()
