"""Config -> objects, one module per task; each task function takes the composed config and returns a
metrics dict (what a Hydra sweeper optimises). The work itself lives in ``isc/`` and the Lightning glue."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from tasks.detection import train_detector
from tasks.evaluation import evaluate, predict
from tasks.exports import export
from tasks.generation import build_benchmark_task, generate
from tasks.training import train

__all__ = [
    "TASKS",
    "build_benchmark_task",
    "evaluate",
    "export",
    "generate",
    "predict",
    "train",
    "train_detector",
]

TASKS: dict[str, Callable[[DictConfig], dict[str, object]]] = {
    "evaluate": evaluate,
    "predict": predict,
    "export": export,
    "generate": generate,
    "build_benchmark": build_benchmark_task,
    "train_detector": train_detector,
    "pretrain": train,
    "finetune": train,
}
