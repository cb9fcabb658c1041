"""Batch-hard triplet loss: Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", 2017, arXiv:1703.07737.

Each anchor is pulled towards its farthest positive and pushed from its nearest negative in the batch, so a
P x K batch mines its own hard triplets without an offline miner. D2LV's metric term (see
:mod:`isc.losses.d2lv`); on its own it is ``model/loss`` material for any head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from isc.losses.pairwise import (
    attached_zero,
    check_embeddings_and_labels,
    gather_candidates,
    pairwise_euclidean_distance,
)

__all__ = ["TripletLoss", "batch_hard_triplet_loss"]


def batch_hard_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float | None = None,
    normalize: bool = False,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """Batch-hard triplet loss, embeddings (B, D), labels (B,) -> scalar.

    For each anchor: the hardest positive (largest Euclidean distance, same label, not itself) and the
    hardest negative (smallest distance, other label). ``margin=None`` is the soft margin
    ``softplus(d_ap - d_an)`` used by D2LV / fast-reid; a float gives the hinge ``relu(d_ap - d_an + margin)``.
    Anchors lacking a positive or a negative are left out of the mean (0 if none is left). Euclidean on raw
    features, as fast-reid's BNNeck recipe does; ``normalize=True`` L2-normalises first. With
    ``gather_distributed`` the candidates are every rank's embeddings (:mod:`isc.losses.pairwise`).
    """
    check_embeddings_and_labels(embeddings, labels)
    if normalize:
        embeddings = F.normalize(embeddings, dim=1)
    ref, ref_labels, self_mask = gather_candidates(embeddings, labels, gather_distributed)
    dist_mat = pairwise_euclidean_distance(embeddings, ref)
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    pos_mask, neg_mask = same & ~self_mask, ~same
    d_ap = dist_mat.masked_fill(~pos_mask, float("-inf")).amax(dim=1)
    d_an = dist_mat.masked_fill(~neg_mask, float("inf")).amin(dim=1)
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    if not bool(valid.any()):
        return attached_zero(embeddings)
    diff = d_ap[valid] - d_an[valid]
    loss = F.softplus(diff) if margin is None else F.relu(diff + margin)
    return loss.mean()


def check_margin(margin: float | None) -> None:
    """A hinge margin is a distance: ``None`` (soft margin) or >= 0."""
    if margin is not None and margin < 0:
        raise ValueError(f"margin must be >= 0 or null (soft margin), got {margin}")


class TripletLoss(nn.Module):
    """:func:`batch_hard_triplet_loss` as a module.

    forward(embeddings (B, D), labels (B,)) -> ``{"loss": (), "triplet": ()}``.
    """

    inputs: ClassVar[str] = "labelled_embeddings"
    """What forward takes: descriptors and their class labels (P x K batches of copies)."""
    needs_classifier: ClassVar[bool] = False

    def __init__(
        self, margin: float | None = None, normalize: bool = False, gather_distributed: bool = False
    ) -> None:
        super().__init__()
        check_margin(margin)
        self.margin = margin
        self.normalize = normalize
        self.gather_distributed = gather_distributed

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = batch_hard_triplet_loss(
            embeddings, labels, self.margin, self.normalize, self.gather_distributed
        )
        return {"loss": loss, "triplet": loss}

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, normalize={self.normalize}, gather_distributed={self.gather_distributed}"
        )
