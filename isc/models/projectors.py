"""Projection heads of self-supervised pretraining (used in training only, dropped from descriptors).

Barlow Twins' projector and BYOL / Momentum2-Teacher's projector and predictor MLPs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["barlow_projector", "byol_mlp"]


def barlow_projector(
    in_dim: int, dims: Sequence[int] = (8192, 8192, 8192), batch_norm: bool = True
) -> nn.Sequential:
    """Official Barlow Twins projector: (Linear - BN - ReLU) x (len(dims) - 1), then Linear; no biases.

    (B, in_dim) -> (B, dims[-1]). ``batch_norm=False`` drops the BN layers (only for tests of the loss's
    own cross-process reductions: SyncBatchNorm has no CPU implementation).
    """
    sizes = [in_dim, *(int(d) for d in dims)]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers.append(nn.Linear(a, b, bias=False))
        if batch_norm:
            layers.append(nn.BatchNorm1d(b))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


def byol_mlp(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """BYOL projector / predictor: Linear - BN - ReLU - Linear, (B, in_dim) -> (B, out_dim)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
