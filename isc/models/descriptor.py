"""The descriptor model: trunk + pooling (+ projection) + L2 norm, images in [0, 1] -> unit vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isc.models.pooling import GeM
from isc.models.trunks import Trunk

__all__ = ["DescriptorModel"]


class DescriptorModel(nn.Module):
    """Trunk + GeM + optional linear projection + L2 norm: (B, 3, H, W) in [0, 1] -> (B, D) unit vectors.

    Input normalisation happens inside the model (from the trunk's statistics), so callers feed plain
    [0, 1] tensors whatever the backbone. ``normalize=False`` returns the raw pooled features, which is
    what self-supervised pretraining feeds its projector.
    """

    def __init__(
        self, trunk: Trunk, pooling: nn.Module | None = None, dim: int | None = None, normalize: bool = True
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.pooling = pooling if pooling is not None else GeM()
        self.projection = nn.Linear(trunk.out_channels, dim) if dim else None
        self.dim = dim or trunk.out_channels
        self.normalize = normalize
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(trunk.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(trunk.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        x = self.pooling(self.trunk(x))
        if self.projection is not None:
            x = self.projection(x)
        return F.normalize(x, dim=-1) if self.normalize else x
