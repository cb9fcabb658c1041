"""LightningModules: thin training glue around the framework-free models and losses in ``isc/``.

Modules receive already-built ``nn.Module``s (trunk, pooling, loss) and optimiser / scheduler partials
from Hydra (``_partial_: true``); nothing here looks names up in registries. This file holds what they all share
(pretraining and fine-tuning): learning-rate scaling with the global batch, bias/norm param groups and
the per-step warm-up + cosine schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
from torch import nn
from torch.optim import Optimizer

from isc.models.descriptor import DescriptorModel
from isc.models.pooling import AvgPool
from isc.models.trunks import Trunk
from isc.train.optim import param_groups

__all__ = ["BackboneModule", "global_batch_size", "schedule_lengths"]

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[..., Any]


def global_batch_size(trainer: L.Trainer) -> int:
    """Images per optimiser step over all processes: per-process batch x world size x accumulation."""
    batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
    if batch is None:
        batch = getattr(trainer.train_dataloader, "batch_size", None)
    if batch is None:
        raise ValueError("cannot scale the learning rate: the datamodule has no batch_size attribute")
    return int(batch) * trainer.world_size * trainer.accumulate_grad_batches


def schedule_lengths(trainer: L.Trainer) -> tuple[int, int]:
    """``(total optimiser steps, optimiser steps per epoch)`` of this fit; schedules need finite training."""
    if trainer.train_dataloader is None:  # e.g. max_steps without max_epochs: the estimate skips the data
        trainer.fit_loop.setup_data()
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(
            "warm-up/cosine schedules need a finite run: set trainer.max_epochs or trainer.max_steps"
        )
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else int(total)
    return max(int(total), 1), max(per_epoch, 1)


class BackboneModule(L.LightningModule):
    """Common base of the training modules (pretraining and fine-tuning): a pooled backbone and the optimiser set-up.

    ``backbone`` = input normalisation + trunk + pooling (average by default) without L2 norm, stored as
    ``self.backbone`` so checkpoints keep the trunk under ``backbone.trunk.`` (what fine-tuning loads with
    ``trunk.weights=.../last.ckpt``). ``lr`` and ``lr_bias_norm`` are per ``base_batch_size`` images and
    are scaled linearly by the global batch (``base_batch_size: null`` disables the scaling).
    """

    def __init__(
        self,
        trunk: Trunk,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        pooling: nn.Module | None = None,
        lr: float = 0.05,
        lr_bias_norm: float | None = None,
        base_batch_size: int | None = 256,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = DescriptorModel(trunk, pooling if pooling is not None else AvgPool(), normalize=False)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr = lr
        self.lr_bias_norm = lr_bias_norm
        self.base_batch_size = base_batch_size
        self.exclude_bias_and_norm = exclude_bias_and_norm
        self.total_steps = 1

    def forward(self, images: Any) -> Any:
        """Backbone features: (B, 3, H, W) in [0, 1] -> (B, C)."""
        return self.backbone(images)

    def optimized_modules(self) -> nn.Module:
        """What the optimiser updates (a teacher, if any, is excluded by ``requires_grad=False``)."""
        return self

    def configure_optimizers(self) -> Any:
        self.total_steps, steps_per_epoch = schedule_lengths(self.trainer)
        scale = 1.0
        if self.base_batch_size:
            scale = global_batch_size(self.trainer) / self.base_batch_size
        lr_bias = self.lr if self.lr_bias_norm is None else self.lr_bias_norm
        groups = param_groups(
            self.optimized_modules(), self.lr * scale, lr_bias * scale, self.exclude_bias_and_norm
        )
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=self.total_steps, steps_per_epoch=steps_per_epoch
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
