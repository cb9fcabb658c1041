"""Barlow Twins pretraining (Zbontar, Jing, Misra, LeCun, Deny, ICML 2021) as a LightningModule.

D2LV pretrained its ResNet-50 this way: projector 8192-8192-8192, lambda = 0.0051, LARS with lr 0.2
for weights and 0.0048 for biases and norm parameters (per 256 images), biases/norm excluded from weight
decay and LARS adaptation, 10 warm-up epochs then cosine to 1/1000 (``conf/experiment/pretrain_barlow_r50``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from isc.models.projectors import barlow_projector
from isc.models.trunks import Trunk
from lightning_modules.base import BackboneModule, OptimizerFactory, SchedulerFactory

__all__ = ["BarlowTwins"]


class BarlowTwins(BackboneModule):
    """Backbone + projector trained with a Barlow Twins loss on two views of each image.

    Batches are ``((view1, view2), index)`` with views (B, 3, H, W) in [0, 1]. The loss (e.g.
    :class:`isc.losses.barlow_twins.BarlowTwinsLoss`) standardises and cross-correlates over the *global* batch, so
    ``train/loss`` is the same on every rank and needs no sync.
    """

    task = "pretrain"  # the run.py task this module serves (checked before training)
    loss_inputs = "projection_pair"  # loss(z1, z2)

    def __init__(
        self,
        trunk: Trunk,
        loss: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        pooling: nn.Module | None = None,
        projector_dims: Sequence[int] = (8192, 8192, 8192),
        projector_batch_norm: bool = True,
        lr: float = 0.2,
        lr_bias_norm: float | None = 0.0048,
        base_batch_size: int | None = 256,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        # Fine-tuning losses (and the other method's) take other inputs: fail before building anything.
        use = "model/loss=barlow_twins (fine-tuning losses go with model=copy_finetune)"
        self.check_loss(loss, "barlow_twins", use)
        super().__init__(
            trunk, optimizer, scheduler, pooling, lr, lr_bias_norm, base_batch_size, exclude_bias_and_norm
        )
        self.projector = barlow_projector(trunk.out_channels, projector_dims, projector_batch_norm)
        self.loss = loss

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Projector output: (B, 3, H, W) -> (B, projector_dims[-1])."""
        out: torch.Tensor = self.projector(self.backbone(images))
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x1, x2), _ = batch
        loss: torch.Tensor = self.loss(self.embed(x1), self.embed(x2))
        self.log("train/loss", loss, prog_bar=True, batch_size=x1.shape[0])
        return loss
