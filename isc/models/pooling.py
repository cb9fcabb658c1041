"""Global pooling of a trunk's feature map: GeM (copy-detection descriptors) and average pooling (SSL)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AvgPool", "GeM", "gem"]


def gem(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling (Radenović et al., TPAMI 2018): (B, C, H, W) -> (B, C).

    ``p = 1`` is average pooling and ``p -> inf`` max pooling; copy detection works best near 3. ``p`` is
    a 0-d tensor (a float would not script: :mod:`isc.models.torchscript`).
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with a (optionally trainable) exponent ``p``; (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, trainable: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}, trainable={self.p.requires_grad}"


class AvgPool(nn.Module):
    """Global average pooling, (B, C, H, W) -> (B, C): what Barlow Twins and BYOL-style methods pretrain with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))
