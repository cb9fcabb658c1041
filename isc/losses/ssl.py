"""Self-supervised pretraining losses: Barlow Twins and the BYOL / Momentum2-Teacher cosine loss.

Small pure functions with thin ``nn.Module`` wrappers (for Hydra ``_target_``), in the style of
``lightly``. Every reduction across the batch is *global* under ``torch.distributed``: statistics and the
cross-correlation are all-reduced with autograd-aware sums, so with DDP's gradient averaging both the
loss and the gradients equal those of one process seeing the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isc.train.dist import all_reduce_sum

__all__ = [
    "BYOLLoss",
    "BarlowTwinsLoss",
    "barlow_twins_loss",
    "byol_loss",
    "cross_correlation",
]


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
    """Barlow Twins (Zbontar et al., ICML 2021): ``sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2``.

    (B, D), (B, D) -> scalar. Invariance pulls the diagonal of the cross-correlation to 1; redundancy
    reduction pushes the off-diagonal to 0. ``lambda = 0.0051`` is the paper's value for D = 8192.
    """
    c = cross_correlation(z1, z2, eps)
    diag = torch.diagonal(c)
    on_diag = (diag - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


class BarlowTwinsLoss(nn.Module):
    """:func:`barlow_twins_loss` as a module: ``loss(z1, z2)`` with (B, D) projector outputs."""

    def __init__(self, lambda_offdiag: float = 0.0051, eps: float = 1e-5) -> None:
        super().__init__()
        self.lambda_offdiag = lambda_offdiag
        self.eps = eps

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return barlow_twins_loss(z1, z2, self.lambda_offdiag, self.eps)

    def extra_repr(self) -> str:
        return f"lambda_offdiag={self.lambda_offdiag}, eps={self.eps}"


def byol_loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss (Grill et al., NeurIPS 2020): ``2 - 2 cos(q, k)`` per sample, (B, D), (B, D) -> (B,).

    ``k`` (the teacher's output) is a target: it is detached here so no gradient can reach the teacher.
    """
    return 2 - 2 * (F.normalize(q, dim=-1) * F.normalize(k.detach(), dim=-1)).sum(dim=-1)


class BYOLLoss(nn.Module):
    """Symmetric BYOL / Momentum2-Teacher loss: ``mean_b [4 - 2 (cos(q1, k1) + cos(q2, k2))]``.

    ``q1``/``q2`` are the student's predictions for views 1/2 and ``k1``/``k2`` the teacher's projections
    of the *other* view (views 2/1), each (B, D) -> scalar. The batch mean of equal-sized DDP shards,
    averaged by DDP, is the global-batch mean, so no collective is needed.
    """

    def forward(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        return (byol_loss(q1, k1) + byol_loss(q2, k2)).mean()
