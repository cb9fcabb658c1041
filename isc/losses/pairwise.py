"""Shared pieces of the metric losses: pairwise geometry in full precision and DDP candidates.

Distributed training: the losses that benefit from the global batch (batch-hard mining, InfoNCE negatives,
the entropy regulariser) take ``gather_distributed``. The *anchors* stay local (rows of the loss) and the
*candidates* (positives / negatives / neighbours) are the embeddings of all ranks, gathered by
:func:`isc.train.dist.all_gather_with_grad`, exactly as SSCD does. Each rank averages over its own anchors;
DDP's gradient averaging then yields the gradient of the mean of the per-rank losses, which is the
global-batch loss when ranks hold equally many valid anchors (the usual P x K / two-view sampler case).
All ranks must pass batches of the same size (``drop_last=True``).
"""

from __future__ import annotations

import torch

from isc.train.dist import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size

__all__ = [
    "attached_zero",
    "check_embeddings_and_labels",
    "full_precision",
    "gather_candidates",
    "pairwise_euclidean_distance",
    "pairwise_similarity",
]


def check_embeddings_and_labels(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``embeddings`` is (B, D) and ``labels`` is (B,)."""
    if embeddings.ndim != 2 or labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )


def attached_zero(x: torch.Tensor) -> torch.Tensor:
    """A scalar 0 still attached to ``x``'s graph, so backward() and DDP's unused-parameter check work."""
    return (x * 0).sum()


def gather_candidates(
    embeddings: torch.Tensor, labels: torch.Tensor, gather_distributed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates for the local anchors: (M, D) embeddings, (M,) labels and the (B, M) self-pair mask.

    Without gathering M = B and the mask is the identity; with it M = W*B and anchor ``i`` sits in
    column ``rank*B + i``.
    """
    b = embeddings.shape[0]
    if gather_distributed and get_world_size() > 1:
        ref, ref_labels, offset = all_gather_with_grad(embeddings), all_gather_no_grad(labels), get_rank() * b
    else:
        ref, ref_labels, offset = embeddings, labels, 0
    rows = torch.arange(b, device=embeddings.device)
    self_mask = torch.zeros(b, ref.shape[0], dtype=torch.bool, device=embeddings.device)
    self_mask[rows, rows + offset] = True
    return ref, ref_labels, self_mask


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is half / bfloat16, else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pairwise_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner products (N, D), (M, D) -> (N, M), in at least float32 even under autocast.

    Logits ``s / 0.05`` and distance cancellations need more than bf16's 8 mantissa bits.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        return full_precision(a) @ full_precision(b).T


def pairwise_euclidean_distance(a: torch.Tensor, b: torch.Tensor, min_sq: float = 1e-12) -> torch.Tensor:
    """Euclidean distances (N, D), (M, D) -> (N, M) via ``|a|^2 + |b|^2 - 2 a.b``, in at least float32.

    One matmul instead of an (N, M, D) difference tensor; the squared distance is clamped at ``min_sq``
    before the square root so identical rows give a finite gradient (sqrt'(0) is infinite).
    """
    a, b = full_precision(a), full_precision(b)
    sq = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * pairwise_similarity(a, b)
    return sq.clamp(min=min_sq).sqrt()
