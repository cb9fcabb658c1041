"""Pair contrastive loss: Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an Invariant
Mapping", CVPR 2006 (no arXiv version).

Positives are pulled within ``pos_margin``, negatives pushed beyond ``neg_margin``; unlike a softmax loss
each pair counts on its own, so thousands of stale negatives from a cross-batch memory
(:mod:`isc.losses.xbm`) can be added for the cost of a matmul. The descriptor-track 1st place (Yokoo,
"Contrastive Learning with Large Memory Bank and Negative Embedding Subtraction for Accurate Copy
Detection", 2021, arXiv:2112.04323) trains with it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from isc.losses.pairwise import (
    attached_zero,
    check_embeddings_and_labels,
    gather_candidates,
    pairwise_euclidean_distance,
    pairwise_similarity,
)

__all__ = ["ContrastiveLoss", "Distance", "Reduction", "contrastive_loss", "contrastive_loss_terms"]

Distance = Literal["cosine", "euclidean"]
Reduction = Literal["nonzero_mean", "mean"]


def _check_distance_and_reduction(distance: str, reduction: str) -> None:
    if distance not in ("cosine", "euclidean"):
        raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")
    if reduction not in ("nonzero_mean", "mean"):
        raise ValueError(f"reduction must be 'nonzero_mean' or 'mean', got {reduction!r}")


def _reduce_pairs(values: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    selected = values[mask]
    if reduction == "nonzero_mean":
        selected = selected[selected > 0]
    elif reduction != "mean":
        raise ValueError(f"reduction must be 'nonzero_mean' or 'mean', got {reduction!r}")
    return selected.mean() if selected.numel() else attached_zero(values)


def contrastive_loss_terms(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    memory_embeddings: torch.Tensor | None = None,
    memory_labels: torch.Tensor | None = None,
    pos_margin: float = 1.0,
    neg_margin: float = 0.5,
    distance: Distance = "cosine",
    reduction: Reduction = "nonzero_mean",
    gather_distributed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative terms of the pair contrastive loss -> (scalar, scalar).

    embeddings (B, D), labels (B,); optional memory (K, D), (K,) of earlier (detached) embeddings. Anchors
    are the batch, candidates are batch ∪ memory (self pairs excluded). Embeddings are L2-normalised first.

    - ``distance="cosine"`` (XBM, Wang et al. 2020): pos ``relu(pos_margin - s)``, neg ``relu(s - neg_margin)``;
      the defaults (1.0, 0.5) give ``1 - s`` and ``relu(s - 0.5)``.
    - ``distance="euclidean"`` (pytorch-metric-learning's default, used by lyakaap's descriptor-track 1st
      place with ``pos_margin=0, neg_margin=1``): pos ``relu(d - pos_margin)``, neg ``relu(neg_margin - d)``.
      On unit vectors d = sqrt(2 - 2s), so d < 1 is s > 0.5: both pick the same active negatives.

    ``reduction="nonzero_mean"`` averages each term over its pairs with non-zero loss (pytorch-metric-learning's
    AvgNonZeroReducer, what lyakaap trained with): with a 20k memory most negatives are inactive and a plain
    mean would dilute the negative gradient by their count. ``"mean"`` averages over all pairs.
    """
    check_embeddings_and_labels(embeddings, labels)
    embeddings = F.normalize(embeddings, dim=1)
    ref, ref_labels, self_mask = gather_candidates(embeddings, labels, gather_distributed)
    if memory_embeddings is not None and memory_labels is not None and memory_embeddings.shape[0] > 0:
        memory = F.normalize(memory_embeddings.detach().to(ref), dim=1)
        ref = torch.cat([ref, memory])
        ref_labels = torch.cat([ref_labels, memory_labels.to(ref_labels)])
        self_mask = F.pad(self_mask, (0, memory.shape[0]), value=False)
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    pos_mask, neg_mask = same & ~self_mask, ~same
    if distance == "cosine":
        sim = pairwise_similarity(embeddings, ref)
        pos_loss, neg_loss = F.relu(pos_margin - sim), F.relu(sim - neg_margin)
    elif distance == "euclidean":
        dist_mat = pairwise_euclidean_distance(embeddings, ref)
        pos_loss, neg_loss = F.relu(dist_mat - pos_margin), F.relu(neg_margin - dist_mat)
    else:
        raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")
    return _reduce_pairs(pos_loss, pos_mask, reduction), _reduce_pairs(neg_loss, neg_mask, reduction)


def contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    memory_embeddings: torch.Tensor | None = None,
    memory_labels: torch.Tensor | None = None,
    pos_margin: float = 1.0,
    neg_margin: float = 0.5,
    distance: Distance = "cosine",
    reduction: Reduction = "nonzero_mean",
    gather_distributed: bool = False,
) -> torch.Tensor:
    """Pair contrastive loss: the sum of :func:`contrastive_loss_terms`, (B, D), (B,) -> scalar."""
    pos, neg = contrastive_loss_terms(
        embeddings,
        labels,
        memory_embeddings,
        memory_labels,
        pos_margin,
        neg_margin,
        distance,
        reduction,
        gather_distributed,
    )
    return pos + neg


class ContrastiveLoss(nn.Module):
    """:func:`contrastive_loss_terms` as a module -> ``{"loss": (), "pos": (), "neg": ()}``.

    forward(embeddings (B, D), labels (B,), memory_embeddings (K, D) | None, memory_labels (K,) | None).
    Defaults: the cosine form ``mean (1 - s_pos) + mean relu(s_neg - 0.5)``; lyakaap's exact setting is
    ``ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance="euclidean")``.
    """

    inputs: ClassVar[str] = "labelled_embeddings"
    """What forward takes: descriptors and their class labels (P x K batches of copies)."""
    needs_classifier: ClassVar[bool] = False

    def __init__(
        self,
        pos_margin: float = 1.0,
        neg_margin: float = 0.5,
        distance: Distance = "cosine",
        reduction: Reduction = "nonzero_mean",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        _check_distance_and_reduction(distance, reduction)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.distance: Distance = distance
        self.reduction: Reduction = reduction
        self.gather_distributed = gather_distributed

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        memory_embeddings: torch.Tensor | None = None,
        memory_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        pos, neg = contrastive_loss_terms(
            embeddings,
            labels,
            memory_embeddings,
            memory_labels,
            self.pos_margin,
            self.neg_margin,
            self.distance,
            self.reduction,
            self.gather_distributed,
        )
        return {"loss": pos + neg, "pos": pos, "neg": neg}

    def extra_repr(self) -> str:
        return (
            f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, distance={self.distance}, "
            f"reduction={self.reduction}, gather_distributed={self.gather_distributed}"
        )
