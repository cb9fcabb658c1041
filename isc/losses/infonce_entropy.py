"""SSCD's objective: Pizzi, Roy, Ravindra, Goyal & Douze, "A Self-Supervised Descriptor for Image Copy
Detection", CVPR 2022, arXiv:2202.10261.

InfoNCE over the batch pulls the views of one image together against every other image; the differential
entropy (Kozachenko-Leonenko) regulariser of Sablayrolles, Douze, Schmid & Jégou, "Spreading vectors for
similarity search", ICLR 2019, arXiv:1806.03198, spreads the descriptors uniformly, which is what makes a
single global threshold work for copy detection.
"""

from __future__ import annotations

import math
from typing import ClassVar

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

__all__ = ["InfoNCEEntropyLoss", "entropy_regularizer", "infonce_loss"]


def infonce_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.05,
    gather_distributed: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """SSCD's InfoNCE, embeddings (B, D) L2-normalised, labels (B,) -> scalar.

    Exactly ``SSCD.loss`` in facebookresearch/sscd-copy-detection ``sscd/train.py`` (non-mixup branch): with
    ``l_ij = e_i.e_j / tau``, each positive pair (i, p) (same label, p != i) costs ``-log( exp(l_ip) /
    (exp(l_ip) + sum_{n: label_n != label_i} exp(l_in) + eps) )``: the denominator holds that positive and the
    negatives only (SSCD's ``partitions``, with its ``1e-6``), so other views of the same image are never
    pushed away. The costs are *summed* over every positive pair and divided by the number of anchors B
    (``.sum() / similarity.size(0)``): an anchor with K - 1 positives weighs K - 1 times, an anchor without
    any counts in B with cost 0. In SSCD's two-view setting this is the textbook softmax over all ``j != i``
    (up to ``eps``). Computed in log space (``log(S + eps)`` by ``logaddexp``), so tau = 1e-3 does not
    overflow where SSCD's ``exp`` would.
    """
    check_embeddings_and_labels(embeddings, labels)
    if embeddings.shape[0] == 0:
        return attached_zero(embeddings)
    ref, ref_labels, self_mask = gather_candidates(embeddings, labels, gather_distributed)
    logits = pairwise_similarity(embeddings, ref) / temperature
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    pos_mask, neg_mask = same & ~self_mask, ~same
    neg_lse = logits.masked_fill(~neg_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    if eps > 0:
        neg_lse = torch.logaddexp(neg_lse, neg_lse.new_tensor(math.log(eps)))
    # -log(e^l / (e^l + S + eps)) = softplus(log(S + eps) - l); exactly 0 when S + eps = 0.
    pair_loss = torch.where(pos_mask, F.softplus(neg_lse - logits), torch.zeros_like(logits))
    return pair_loss.sum() / embeddings.shape[0]


def entropy_regularizer(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 1e-8,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """SSCD's differential-entropy (KoLeo) regulariser: ``-mean_i log(min_{j: label_j != label_i} |e_i - e_j| + eps)``.

    embeddings (B, D), labels (B,) -> scalar. Pushing each descriptor away from its nearest *non-matching*
    neighbour spreads the descriptors. Anchors without any non-matching sample are left out (0 if none is
    left). Unweighted; SSCD uses lambda = 30. SSCD (``sscd/train.py``, ``SSCD.loss``) computes the same on
    unit vectors from the similarity, ``-mean_i log sqrt(max(2 - 2 max_n s_in, 1e-6))``: equal unless a
    nearest non-match is closer than 1e-3 (SSCD's floor) or an anchor has no non-match (SSCD then counts a
    constant term in the mean).
    """
    check_embeddings_and_labels(embeddings, labels)
    ref, ref_labels, _ = gather_candidates(embeddings, labels, gather_distributed)
    dist_mat = pairwise_euclidean_distance(embeddings, ref)
    neg_mask = labels.unsqueeze(1) != ref_labels.unsqueeze(0)
    nearest = dist_mat.masked_fill(~neg_mask, float("inf")).amin(dim=1)
    valid = neg_mask.any(dim=1)
    if not bool(valid.any()):
        return attached_zero(embeddings)
    return -torch.log(nearest[valid] + eps).mean()


class InfoNCEEntropyLoss(nn.Module):
    """SSCD objective ``InfoNCE + entropy_weight * entropy``.

    forward(embeddings (B, D), labels (B,)) -> ``{"loss": (), "infonce": (), "entropy": ()}``; ``entropy`` is
    logged unweighted. SSCD's defaults (``sscd/train.py``: ``--infonce_temperature 0.05``,
    ``--entropy_weight 30``) are the defaults here. ``normalize=True`` L2-normalises the inputs first, for
    heads that do not.
    """

    inputs: ClassVar[str] = "labelled_embeddings"
    """What forward takes: descriptors and their class labels (P x K batches of copies)."""
    needs_classifier: ClassVar[bool] = False

    def __init__(
        self,
        temperature: float = 0.05,
        entropy_weight: float = 30.0,
        normalize: bool = False,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
        self.temperature = temperature
        self.entropy_weight = entropy_weight
        self.normalize = normalize
        self.gather_distributed = gather_distributed

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.normalize:
            embeddings = F.normalize(embeddings, dim=1)
        nce = infonce_loss(embeddings, labels, self.temperature, self.gather_distributed)
        entropy = entropy_regularizer(embeddings, labels, gather_distributed=self.gather_distributed)
        return {"loss": nce + self.entropy_weight * entropy, "infonce": nce, "entropy": entropy}

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, entropy_weight={self.entropy_weight}, "
            f"gather_distributed={self.gather_distributed}"
        )
