"""The base LightningModule of every training module (pretraining and fine-tuning), and what it shares.

Learning-rate scaling with the global batch, bias/norm param groups, the per-step warm-up + cosine
schedule, the descriptor record in checkpoints and the check that a loss takes the inputs its module gives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar

import lightning.pytorch as L
import torch
from torch import nn
from torch.optim import Optimizer

from isc.models.descriptor import CHECKPOINT_KEY, DescriptorModel
from isc.models.pooling import AvgPool
from isc.models.trunks import Trunk
from isc.train.optim import param_groups

log = logging.getLogger(__name__)

__all__ = [
    "BackboneModule",
    "OptimizerFactory",
    "SchedulerFactory",
    "global_batch_size",
    "schedule_lengths",
    "wants_sync_batchnorm",
]

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[..., Any]


def global_batch_size(trainer: L.Trainer) -> int:
    """Images per optimiser step over all processes: per-process batch x world size x accumulation."""
    batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
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


def _device_count(devices: Any, available: int) -> int:
    """How many devices Lightning's ``devices`` flag selects: int (-1: all), "auto", "2", "0,1", [0, 1]."""
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return available
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        devices = int(text)
    if isinstance(devices, int):
        return available if devices == -1 else max(devices, 0)
    return len(list(devices))


def wants_sync_batchnorm(accelerator: Any, devices: Any, num_nodes: int = 1) -> bool:
    """What ``trainer.sync_batchnorm: null`` (auto) means: SyncBatchNorm exactly when training spans several CUDA GPUs.

    Global-batch BN is what the recipes use on GPUs (SSCD ``--sync_bn True`` in ``sscd/train.py``; the official
    Barlow Twins ``convert_sync_batchnorm``), while PyTorch has no CPU SyncBatchNorm kernels: gloo processes
    on CPU (and single-process runs) keep plain BN. ``accelerator`` "auto" / "gpu" resolve to CUDA only when
    ``torch.cuda.is_available()`` (Lightning would otherwise pick CPU, or MPS for "gpu"); ``devices`` takes
    Lightning's forms. The Momentum2-Teacher experiments set ``false`` (per-GPU BN, as the official code).
    """
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__
    name = name.lower().removesuffix("accelerator")
    if name in ("auto", "gpu"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cuda":
        return False
    available = torch.cuda.device_count()
    return _device_count(devices, available) * max(int(num_nodes), 1) > 1


class BackboneModule(L.LightningModule):
    """Common base of the training modules (pretraining and fine-tuning): a pooled backbone and the optimiser set-up.

    ``backbone`` = input normalisation + trunk + pooling (average by default) without L2 norm, stored as
    ``self.backbone`` so checkpoints keep the trunk under ``backbone.trunk.`` (what fine-tuning loads with
    ``trunk.weights=.../last.ckpt``). ``lr`` and ``lr_bias_norm`` are per ``base_batch_size`` images and
    are scaled linearly by the global batch (``base_batch_size: null`` disables the scaling).

    ``loss_inputs`` names what a subclass feeds its loss; a loss declaring other ``inputs`` (e.g. a
    pretraining loss in fine-tuning, ``model/loss=...`` is one group) fails at construction
    (:meth:`check_loss`), before any data work.
    """

    loss_inputs: ClassVar[str | None] = None
    """The ``inputs`` a loss must declare to train in this module (None: any)."""

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

    @classmethod
    def check_loss(cls, loss: nn.Module, model: str, use: str) -> None:
        """Raise ``ValueError`` when ``loss`` declares inputs other than this module's ``loss_inputs``.

        Each module calls its loss with its own inputs (two projections, four BYOL vectors, descriptors and
        labels), so a mismatch would otherwise surface only at the first step, after data and baseline work.
        A loss that declares nothing (a user's own module) is trusted.
        """
        inputs = getattr(loss, "inputs", None)
        if cls.loss_inputs is not None and inputs is not None and inputs != cls.loss_inputs:
            name = type(loss).__name__
            raise ValueError(f"model={model} cannot train with {name}, another model's loss: set {use}")

    def forward(self, images: Any) -> Any:
        """Backbone features: (B, 3, H, W) in [0, 1] -> (B, C)."""
        return self.backbone(images)

    @property
    def descriptor_head(self) -> nn.Module | None:
        """The fine-tuning head whose ``descriptor`` is the test-time descriptor (None: the pooled feature)."""
        return None

    image_size: int | None = None
    """The square input size the descriptor is evaluated at (recorded in checkpoints and exports)."""

    def descriptor_model(self) -> DescriptorModel:
        """The test-time descriptor as a :class:`DescriptorModel` that *shares* this module's weights.

        The retrieval callback, ``task=evaluate ckpt_path=...`` and ``task=export`` all run this same
        network, so the number logged during training is the number a user gets from the checkpoint.
        """
        model = DescriptorModel(
            self.backbone.trunk, self.backbone.pooling, head=self.descriptor_head, image_size=self.image_size
        )
        return model.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record how to rebuild the descriptor without Lightning (``isc.models.descriptor.load_descriptor_model``)."""
        prefixes = {"trunk.": "backbone.trunk.", "pooling.": "backbone.pooling."}
        if self.descriptor_head is not None:
            name = next(n for n, m in self.named_children() if m is self.descriptor_head)
            prefixes["head."] = f"{name}."
        try:
            spec = self.descriptor_model().spec()
        except (TypeError, ValueError) as e:  # e.g. a hand-built trunk: still a valid training checkpoint
            log.warning("checkpoint without a descriptor record (task=evaluate cannot load it): %s", e)
            return
        checkpoint[CHECKPOINT_KEY] = {"spec": spec, "prefixes": prefixes}

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
