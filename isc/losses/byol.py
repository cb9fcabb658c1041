"""BYOL's regression loss: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning", NeurIPS 2020, arXiv:2006.07733; also the loss of Momentum² Teacher (Li, Liu & Sun, "Momentum^2
Teacher: Momentum Teacher with Momentum Statistics for Self-Supervised Learning", 2021, arXiv:2101.07525).

The student's prediction of one view regresses the EMA teacher's projection of the other view: no
negatives are needed because the teacher is a slowly moving target that receives no gradient. D2LV
pretrained its ResNet-152 and ResNet-50-IBN-a this way.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BYOLLoss", "byol_loss"]


def byol_loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(q, k)`` per sample, (B, D), (B, D) -> (B,).

    ``k`` (the teacher's output) is a target: it is detached here so no gradient can reach the teacher.
    """
    return 2 - 2 * (F.normalize(q, dim=-1) * F.normalize(k.detach(), dim=-1)).sum(dim=-1)


class BYOLLoss(nn.Module):
    """Symmetric BYOL / Momentum2-Teacher loss: ``mean_b [4 - 2 (cos(q1, k1) + cos(q2, k2))]``.

    forward(q1, q2, k1, k2), each (B, D) -> (): ``q1``/``q2`` are the student's predictions for views 1/2
    and ``k1``/``k2`` the teacher's projections of the *other* view (views 2/1). The batch mean of
    equal-sized DDP shards, averaged by DDP, is the global-batch mean, so no collective is needed.
    """

    inputs: ClassVar[str] = "predictions_and_targets"
    """What forward takes: the student's predictions and the teacher's projections of both views."""

    def forward(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        return (byol_loss(q1, k1) + byol_loss(q2, k2)).mean()
