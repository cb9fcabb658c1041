"""Barlow Twins: Zbontar, Jing, Misra, LeCun & Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021, arXiv:2103.03230.

Self-supervised pretraining without negatives or a teacher: the cross-correlation of the two views'
projections is pulled to the identity, so each dimension is invariant to the augmentations (diagonal 1)
and carries information no other dimension does (off-diagonal 0). D2LV pretrained its ResNet-50 this way.

Every reduction across the batch is *global* under ``torch.distributed``: statistics and the
cross-correlation are all-reduced with autograd-aware sums, so with DDP's gradient averaging both the loss
and the gradients equal those of one process seeing the whole batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from isc.train.dist import all_reduce_sum

__all__ = ["BarlowTwinsLoss", "barlow_twins_loss", "cross_correlation"]


def _standardize(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise each column of (B, D) with the *global* batch mean and biased variance.

    Same as ``BatchNorm1d(D, affine=False)`` in training mode over the concatenated batch of all
    processes (what official Barlow Twins gets from SyncBatchNorm). Returns (B, D) and the global N.
    """
    n = all_reduce_sum(torch.tensor(float(z.shape[0]), device=z.device, dtype=z.dtype))
    mean = all_reduce_sum(z.sum(dim=0)) / n
    centred = z - mean
    var = all_reduce_sum(centred.pow(2).sum(dim=0)) / n
    return centred / torch.sqrt(var + eps), n


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins cross-correlation matrix over the global batch: (B, D), (B, D) -> (D, D).

    ``C_ij = sum_b z1n_bi z2n_bj / N`` with batch-standardised embeddings; under DDP each rank adds its
    (D, D) share and the sum is all-reduced, as in the official implementation.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"expected two (B, D) embeddings of one shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    z1n, n = _standardize(z1, eps)
    z2n, _ = _standardize(z2, eps)
    return all_reduce_sum(z1n.T @ z2n / n)


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 0.0051, eps: float = 1e-5
) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2``, (B, D), (B, D) -> scalar.

    Invariance pulls the diagonal of the cross-correlation to 1; redundancy reduction pushes the
    off-diagonal to 0. ``lambda = 0.0051`` is the paper's value for D = 8192.
    """
    c = cross_correlation(z1, z2, eps)
    diag = torch.diagonal(c)
    on_diag = (diag - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


class BarlowTwinsLoss(nn.Module):
    """:func:`barlow_twins_loss` as a module: forward(z1 (B, D), z2 (B, D)) -> () with the projector outputs
    of the two views."""

    inputs: ClassVar[str] = "projection_pair"
    """What forward takes: the projections of two views of the same images."""

    def __init__(self, lambda_offdiag: float = 0.0051, eps: float = 1e-5) -> None:
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.lambda_offdiag = lambda_offdiag
        self.eps = eps

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return barlow_twins_loss(z1, z2, self.lambda_offdiag, self.eps)

    def extra_repr(self) -> str:
        return f"lambda_offdiag={self.lambda_offdiag}, eps={self.eps}"
