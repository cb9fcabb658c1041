"""Momentum^2 Teacher pretraining (Li, Liu, Sun, 2021) as a LightningModule.

A BYOL-style student (backbone -> projector -> predictor) regresses the projections of an EMA teacher
(backbone -> projector) on the other view; the teacher's momentum follows
``1 - (1 - 0.99)(cos(pi k / K) + 1) / 2`` and its batch norms use *momentum statistics*
(:class:`isc.models.momentum.MomentumBatchNorm`), the method's point: stable teacher statistics without
cross-GPU BN sync. Under DDP every process normalises its teacher with its own batch and keeps its own
running statistics, as the official code does (``MomentumBatchNorm2d/1d`` in ``momentum_teacher/models/
resnet_mbn.py``; see :mod:`isc.models.momentum`). They start equal on every rank (copied from the same
student at construction, or from one checkpoint) and DDP's buffer broadcast cannot overwrite them (they are
no buffers). The student's BNs see per-process batches too (the official student's ``SimpleBatchNorm``; the
experiments set ``trainer.sync_batchnorm: false``). D2LV pretrained ResNet-152 and ResNet-50-IBN-a this way:
SGD momentum 0.9, wd 1e-4, lr 0.05 per 256 images, 10 warm-up epochs then cosine
(``conf/experiment/pretrain_m2t_*``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from isc.models.momentum import (
    commit_statistics,
    cosine_momentum,
    ema_update_,
    make_teacher,
    set_statistics_momentum,
    statistics_momentum,
)
from isc.models.projectors import byol_mlp
from isc.models.trunks import Trunk
from lightning_modules.base import BackboneModule, OptimizerFactory, SchedulerFactory

__all__ = ["Momentum2Teacher"]


class Momentum2Teacher(BackboneModule):
    """Student with predictor, EMA teacher with momentum BN, symmetric loss over both views.

    Batches are ``((view1, view2), index)``. Each optimiser step first moves the teacher towards the
    student (momentum from :func:`isc.models.momentum.cosine_momentum` at the current step), then the teacher
    embeds both views with momentum statistics (weight of the batch from
    :func:`isc.models.momentum.statistics_momentum`) and updates them once. ``loss(q1, q2, k1, k2)`` receives
    the student's predictions of views 1/2 and the teacher's projections of views 2/1.
    ``momentum_bn=False`` gives plain BYOL (teacher BN with batch statistics).
    """

    task = "pretrain"  # the run.py task this module serves (checked before training)
    loss_inputs = "predictions_and_targets"  # loss(q1, q2, k1, k2)

    def __init__(
        self,
        trunk: Trunk,
        loss: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        pooling: nn.Module | None = None,
        projector_hidden_dim: int = 4096,
        projector_dim: int = 256,
        predictor_hidden_dim: int = 4096,
        base_momentum: float = 0.99,
        momentum_bn: bool = True,
        lr: float = 0.05,
        lr_bias_norm: float | None = None,
        base_batch_size: int | None = 256,
        exclude_bias_and_norm: bool = False,
    ) -> None:
        # Fine-tuning losses (and the other method's) take other inputs: fail before building anything.
        use = "model/loss=momentum2_teacher (fine-tuning losses go with model=copy_finetune)"
        self.check_loss(loss, "momentum2_teacher", use)
        super().__init__(
            trunk, optimizer, scheduler, pooling, lr, lr_bias_norm, base_batch_size, exclude_bias_and_norm
        )
        self.projector = byol_mlp(trunk.out_channels, projector_hidden_dim, projector_dim)
        self.predictor = byol_mlp(projector_dim, predictor_hidden_dim, projector_dim)
        self.teacher = make_teacher(self._student_encoder(), momentum_bn)
        self.loss = loss
        self.base_momentum = base_momentum

    def _student_encoder(self) -> nn.ModuleDict:
        """The student's backbone + projector under the teacher's names (a view, not registered twice)."""
        return nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})

    def teacher_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher projection: (B, 3, H, W) -> (B, projector_dim)."""
        teacher: Any = self.teacher  # make_teacher's ModuleDict: backbone, projector
        out: torch.Tensor = teacher["projector"](teacher["backbone"](images))
        return out

    def student_predict(self, images: torch.Tensor) -> torch.Tensor:
        """Student prediction: (B, 3, H, W) -> (B, projector_dim)."""
        out: torch.Tensor = self.predictor(self.projector(self.backbone(images)))
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x1, x2), _ = batch
        step = self.global_step
        if batch_idx % self.trainer.accumulate_grad_batches == 0:  # once per optimiser step
            momentum = cosine_momentum(step, self.total_steps, self.base_momentum)
            ema_update_(self.teacher, self._student_encoder(), momentum)
            self.log("train/teacher_momentum", momentum, batch_size=x1.shape[0])
        alpha = statistics_momentum(step, self.total_steps)
        set_statistics_momentum(self.teacher, alpha)
        q1, q2 = self.student_predict(x1), self.student_predict(x2)
        with torch.no_grad():
            k1, k2 = self.teacher_embed(x2), self.teacher_embed(x1)
        commit_statistics(self.teacher)
        loss: torch.Tensor = self.loss(q1, q2, k1, k2)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=x1.shape[0])
        self.log("train/bn_alpha", alpha, batch_size=x1.shape[0])
        return loss
