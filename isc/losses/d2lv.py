"""D2LV's fine-tuning loss: Wang, Sun, Zhang & Yang, "D²LV: A Data-Driven and Local-Verification Approach
for Image Copy Detection", 2021, arXiv:2111.07090 (1st place, ISC2021 matching track).

``10 x`` label-smoothed cross-entropy over the training classes plus a batch-hard soft-margin triplet, in
the BNNeck arrangement of Luo, Gu, Liao, Lai & Jiang, "Bag of Tricks and A Strong Baseline for Deep Person
Re-identification", CVPRW 2019, arXiv:1903.07071: the metric loss acts on the un-normalised features, the
classifier on the BN-neck output, so the two objectives do not fight in one embedding space.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from isc.losses.pairwise import attached_zero
from isc.losses.triplet import batch_hard_triplet_loss, check_margin

__all__ = ["D2LVLoss", "label_smoothing_cross_entropy"]


def label_smoothing_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1
) -> torch.Tensor:
    """Cross-entropy with label smoothing (Szegedy et al., "Rethinking the Inception Architecture", 2016,
    arXiv:1512.00567), (B, C), (B,) -> scalar.

    ``(1 - eps) * NLL + eps * mean_c(-log p_c)``: PyTorch's own ``label_smoothing``, named for configs.
    """
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


class D2LVLoss(nn.Module):
    """``ce_weight * CE(label smoothing) + triplet_weight * batch-hard triplet``.

    forward(features (B, D) *before* the BN neck, logits (B, C) | None from the classifier on the BN-neck
    output, labels (B,)) -> ``{"loss": (), "ce": (), "triplet": ()}`` (components unweighted). D2LV: 10 x CE
    (eps 0.1) + soft-margin triplet. ``logits=None`` (no classifier) drops the CE term.
    """

    inputs: ClassVar[str] = "labelled_embeddings"
    """What forward takes: features and their class labels (P x K batches of copies)."""
    needs_classifier: ClassVar[bool] = True
    """The trainer sizes a classifier from the data's classes and passes the pooled, pre-neck features
    with its logits: ``forward(features, logits, labels)``."""

    def __init__(
        self,
        ce_weight: float = 10.0,
        triplet_weight: float = 1.0,
        label_smoothing: float = 0.1,
        margin: float | None = None,
        normalize_features: bool = False,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {ce_weight}")
        if triplet_weight < 0:
            raise ValueError(f"triplet_weight must be >= 0, got {triplet_weight}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        check_margin(margin)
        self.ce_weight = ce_weight
        self.triplet_weight = triplet_weight
        self.label_smoothing = label_smoothing
        self.margin = margin
        self.normalize_features = normalize_features
        self.gather_distributed = gather_distributed

    def forward(
        self, features: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        triplet = batch_hard_triplet_loss(
            features, labels, self.margin, self.normalize_features, self.gather_distributed
        )
        if logits is None:
            ce = attached_zero(features)
        else:
            ce = label_smoothing_cross_entropy(logits, labels, self.label_smoothing)
        total = self.ce_weight * ce + self.triplet_weight * triplet
        return {"loss": total, "ce": ce, "triplet": triplet}

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, triplet_weight={self.triplet_weight}, "
            f"label_smoothing={self.label_smoothing}, margin={self.margin}"
        )
