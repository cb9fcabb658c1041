"""Metric-learning losses for copy-detection fine-tuning: D2LV, SSCD and the descriptor-track 1st place.

Small pure functions plus thin ``nn.Module`` wrappers (for Hydra ``_target_``), in the style of
``lightly``. Every module returns a dict with the total under ``"loss"`` and its components under their own
names, so the LightningModule can log each one as ``train/<name>``.

Distributed training: the losses that benefit from the global batch (batch-hard mining, InfoNCE negatives,
the entropy regulariser, the memory bank's current batch) take ``gather_distributed``. The *anchors* stay
local (rows of the loss) and the *candidates* (positives / negatives / neighbours) are the embeddings of all
ranks, gathered by :func:`all_gather_with_grad`, exactly as SSCD does. Each rank averages over its own anchors;
DDP's gradient averaging then yields the gradient of the mean of the per-rank losses, which is the
global-batch loss when ranks hold equally many valid anchors (the usual P x K / two-view sampler case).
All ranks must pass batches of the same size (``drop_last=True``). The cross-batch memory always stores the
all-gathered batch, so every rank holds the same memory (see :class:`CrossBatchMemory`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from isc.train.dist import (
    NoBroadcastState,
    all_gather_no_grad,
    all_gather_with_grad,
    get_rank,
    get_world_size,
)

__all__ = [
    "ContrastiveLoss",
    "CrossBatchMemory",
    "D2LVLoss",
    "InfoNCEEntropyLoss",
    "TripletLoss",
    "batch_hard_triplet_loss",
    "contrastive_loss",
    "contrastive_loss_terms",
    "entropy_regularizer",
    "infonce_loss",
    "label_smoothing_cross_entropy",
    "pairwise_euclidean_distance",
    "pairwise_similarity",
]

Distance = Literal["cosine", "euclidean"]
Reduction = Literal["nonzero_mean", "mean"]


def _candidates(
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


def _check_inputs(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if embeddings.ndim != 2 or labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )


def _zero(x: torch.Tensor) -> torch.Tensor:
    """A scalar 0 still attached to ``x``'s graph, so backward() and DDP's unused-parameter check work."""
    return (x * 0).sum()


# --- pairwise geometry ------------------------------------------------------------------------------------


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pairwise_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner products (N, D), (M, D) -> (N, M), in at least float32 even under autocast.

    Logits ``s / 0.05`` and distance cancellations need more than bf16's 8 mantissa bits.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        return _full_precision(a) @ _full_precision(b).T


def pairwise_euclidean_distance(a: torch.Tensor, b: torch.Tensor, min_sq: float = 1e-12) -> torch.Tensor:
    """Euclidean distances (N, D), (M, D) -> (N, M) via ``|a|^2 + |b|^2 - 2 a.b``, in at least float32.

    One matmul instead of an (N, M, D) difference tensor; the squared distance is clamped at ``min_sq``
    before the square root so identical rows give a finite gradient (sqrt'(0) is infinite).
    """
    a, b = _full_precision(a), _full_precision(b)
    sq = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * pairwise_similarity(a, b)
    return sq.clamp(min=min_sq).sqrt()


# --- D2LV: batch-hard triplet + label-smoothed cross-entropy ---------------------------------------------


def batch_hard_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float | None = None,
    normalize: bool = False,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss").

    embeddings (B, D), labels (B,) -> scalar. For each anchor: the hardest positive (largest Euclidean
    distance, same label, not itself) and the hardest negative (smallest distance, other label).
    ``margin=None`` is the soft margin ``softplus(d_ap - d_an)`` used by D2LV / fast-reid; a float gives
    the hinge ``relu(d_ap - d_an + margin)``. Anchors lacking a positive or a negative are left out of
    the mean (0 if none is left). Euclidean on raw features, as fast-reid's BNNeck recipe does;
    ``normalize=True`` L2-normalises first.
    """
    _check_inputs(embeddings, labels)
    if normalize:
        embeddings = F.normalize(embeddings, dim=1)
    ref, ref_labels, self_mask = _candidates(embeddings, labels, gather_distributed)
    dist_mat = pairwise_euclidean_distance(embeddings, ref)
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    pos_mask, neg_mask = same & ~self_mask, ~same
    d_ap = dist_mat.masked_fill(~pos_mask, float("-inf")).amax(dim=1)
    d_an = dist_mat.masked_fill(~neg_mask, float("inf")).amin(dim=1)
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    if not bool(valid.any()):
        return _zero(embeddings)
    diff = d_ap[valid] - d_an[valid]
    loss = F.softplus(diff) if margin is None else F.relu(diff + margin)
    return loss.mean()


class TripletLoss(nn.Module):
    """:func:`batch_hard_triplet_loss` as a module: ``loss(embeddings, labels) -> {"loss", "triplet"}``."""

    def __init__(
        self, margin: float | None = None, normalize: bool = False, gather_distributed: bool = False
    ) -> None:
        super().__init__()
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


def label_smoothing_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1
) -> torch.Tensor:
    """Cross-entropy with label smoothing (Szegedy et al. 2016), (B, C), (B,) -> scalar.

    ``(1 - eps) * NLL + eps * mean_c(-log p_c)``: PyTorch's own ``label_smoothing``, named for configs.
    """
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


class D2LVLoss(nn.Module):
    """D2LV fine-tuning loss: ``ce_weight * CE(label smoothing) + triplet_weight * batch-hard triplet``.

    forward(features (B, D) *before* the BN neck, logits (B, C) from the classifier on the BN-neck output,
    labels (B,)) -> ``{"loss", "ce", "triplet"}`` (components unweighted). This is the BNNeck recipe of
    Luo et al. 2019 ("Bag of Tricks and A Strong Baseline for Deep Person Re-identification") that fast-reid
    and D2LV use: the metric loss acts on the un-normalised features, the classifier on the normalised ones,
    so the two objectives do not fight in one embedding space. D2LV: 10 x CE (eps 0.1) + soft-margin triplet.
    ``logits=None`` (a head without classifier) drops the CE term.
    """

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
            ce = _zero(features)
        else:
            ce = label_smoothing_cross_entropy(logits, labels, self.label_smoothing)
        total = self.ce_weight * ce + self.triplet_weight * triplet
        return {"loss": total, "ce": ce, "triplet": triplet}

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, triplet_weight={self.triplet_weight}, "
            f"label_smoothing={self.label_smoothing}, margin={self.margin}"
        )


# --- SSCD: InfoNCE + differential-entropy regulariser ----------------------------------------------------


def infonce_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.05,
    gather_distributed: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """SSCD's InfoNCE (Pizzi et al., CVPR 2022, "A Self-Supervised Descriptor for Image Copy Detection").

    embeddings (B, D), L2-normalised; labels (B,) -> scalar. Exactly ``SSCD.loss`` in
    facebookresearch/sscd-copy-detection ``sscd/train.py`` (non-mixup branch): with ``l_ij = e_i.e_j / tau``,
    each positive pair (i, p) (same label, p != i) costs ``-log( exp(l_ip) / (exp(l_ip) + sum_{n: label_n !=
    label_i} exp(l_in) + eps) )``: the denominator holds that positive and the negatives only (SSCD's
    ``partitions``, with its ``1e-6``), so other views of the same image are never pushed away. The costs are
    *summed* over every positive pair and divided by the number of anchors B (``.sum() / similarity.size(0)``):
    an anchor with K - 1 positives weighs K - 1 times, an anchor without any counts in B with cost 0. In SSCD's
    two-view setting this is the textbook softmax over all ``j != i`` (up to ``eps``). Computed in log space
    (``log(S + eps)`` by ``logaddexp``), so tau = 1e-3 does not overflow where SSCD's ``exp`` would.
    """
    _check_inputs(embeddings, labels)
    if embeddings.shape[0] == 0:
        return _zero(embeddings)
    ref, ref_labels, self_mask = _candidates(embeddings, labels, gather_distributed)
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

    embeddings (B, D), labels (B,) -> scalar. Kozachenko-Leonenko: pushing each descriptor away from its
    nearest *non-matching* neighbour spreads the descriptors uniformly, which is what makes a single
    global threshold work for copy detection (Sablayrolles et al. 2019, Pizzi et al. 2022). Anchors
    without any non-matching sample are left out (0 if none is left). Unweighted; SSCD uses lambda = 30.
    SSCD (``sscd/train.py``, ``SSCD.loss``) computes the same on unit vectors from the similarity,
    ``-mean_i log sqrt(max(2 - 2 max_n s_in, 1e-6))``: equal unless a nearest non-match is closer than 1e-3
    (SSCD's floor) or an anchor has no non-match (SSCD then counts a constant term in the mean).
    """
    _check_inputs(embeddings, labels)
    ref, ref_labels, _ = _candidates(embeddings, labels, gather_distributed)
    dist_mat = pairwise_euclidean_distance(embeddings, ref)
    neg_mask = labels.unsqueeze(1) != ref_labels.unsqueeze(0)
    nearest = dist_mat.masked_fill(~neg_mask, float("inf")).amin(dim=1)
    valid = neg_mask.any(dim=1)
    if not bool(valid.any()):
        return _zero(embeddings)
    return -torch.log(nearest[valid] + eps).mean()


class InfoNCEEntropyLoss(nn.Module):
    """SSCD objective ``InfoNCE + entropy_weight * entropy`` -> ``{"loss", "infonce", "entropy"}``.

    forward(embeddings (B, D), labels (B,)); ``entropy`` is logged unweighted. SSCD's defaults
    (``sscd/train.py``: ``--infonce_temperature 0.05``, ``--entropy_weight 30``) are the defaults here.
    ``normalize=True`` L2-normalises the inputs first, for heads that do not.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        entropy_weight: float = 30.0,
        normalize: bool = False,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
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


# --- Descriptor-track 1st place: contrastive loss + cross-batch memory -----------------------------------


def _reduce_pairs(values: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    selected = values[mask]
    if reduction == "nonzero_mean":
        selected = selected[selected > 0]
    elif reduction != "mean":
        raise ValueError(f"reduction must be 'nonzero_mean' or 'mean', got {reduction!r}")
    return selected.mean() if selected.numel() else _zero(values)


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
    """Positive and negative terms of the pair contrastive loss (Hadsell et al. 2006) -> (scalar, scalar).

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
    _check_inputs(embeddings, labels)
    embeddings = F.normalize(embeddings, dim=1)
    ref, ref_labels, self_mask = _candidates(embeddings, labels, gather_distributed)
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
    """:func:`contrastive_loss_terms` as a module -> ``{"loss", "pos", "neg"}``.

    forward(embeddings (B, D), labels (B,), memory_embeddings (K, D) | None, memory_labels (K,) | None).
    Defaults: the cosine form ``mean (1 - s_pos) + mean relu(s_neg - 0.5)``; lyakaap's exact setting is
    ``ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance="euclidean")``.
    """

    def __init__(
        self,
        pos_margin: float = 1.0,
        neg_margin: float = 0.5,
        distance: Distance = "cosine",
        reduction: Reduction = "nonzero_mean",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if distance not in ("cosine", "euclidean"):
            raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")
        if reduction not in ("nonzero_mean", "mean"):
            raise ValueError(f"reduction must be 'nonzero_mean' or 'mean', got {reduction!r}")
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


class CrossBatchMemory(NoBroadcastState):
    """Cross-batch memory (Wang et al., CVPR 2020, "Cross-Batch Memory for Embedding Learning") around a
    :class:`ContrastiveLoss`, as in the descriptor-track 1st place (Yokoo 2021, arXiv 2112.04323).

    forward(embeddings (B, D), labels (B,)) -> the loss dict of the current batch against batch ∪ memory,
    plus ``"memory_fill"`` (fraction of the memory in use); then, in training mode only (so validation
    does not pollute it), the batch is enqueued detached. Embeddings drift slowly late in training, so
    stale ones are still useful negatives: thousands of them for the cost of a matmul.

    The memory is a fixed-size FIFO ring of ``memory_size`` rows (``memory_embeddings`` (K, D),
    ``memory_labels`` (K,)). ``embedding_dim=None`` infers D from the first batch (or from a checkpoint), so
    one config works after any head, or none.

    DDP: the memory is filled with the *all-gathered* batch (W*B rows per step, in rank order), so every rank
    holds the same memory with every rank's embeddings, whatever the loss's ``gather_distributed``. It is no
    registered buffer (:class:`isc.train.dist.NoBroadcastState`): DDP would broadcast K x D floats from rank 0
    before every forward. It still follows ``.to()`` and is saved in the ``state_dict`` under
    ``memory_embeddings``, ``memory_labels``, ``ptr``, ``num_filled``, so a resumed run keeps it.
    """

    no_broadcast = ("memory_embeddings", "memory_labels")

    def __init__(
        self, embedding_dim: int | None = None, memory_size: int = 20000, loss: ContrastiveLoss | None = None
    ) -> None:
        super().__init__()
        if memory_size < 1 or (embedding_dim is not None and embedding_dim < 1):
            raise ValueError(
                f"memory_size and embedding_dim must be positive, got {memory_size}, {embedding_dim}"
            )
        self.loss = loss if loss is not None else ContrastiveLoss()
        self.embedding_dim = embedding_dim
        self.memory_size = memory_size
        self.memory_embeddings: torch.Tensor | None = None
        self.memory_labels: torch.Tensor | None = None
        self.ptr = 0  # next row to overwrite
        self.num_filled = 0
        if embedding_dim is not None:
            self._allocate(embedding_dim, torch.device("cpu"), torch.get_default_dtype())

    def _allocate(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.embedding_dim = dim
        self.memory_embeddings = torch.zeros(self.memory_size, dim, device=device, dtype=dtype)
        self.memory_labels = torch.zeros(self.memory_size, dtype=torch.long, device=device)
        self.ptr, self.num_filled = 0, 0

    def _memory_for(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring, allocated on first use (D and device from ``embeddings``, at least float32) and kept on
        the data's device (a checkpoint restored on the CPU follows the model at its first step)."""
        if self.memory_embeddings is None or self.memory_labels is None:
            self._allocate(embeddings.shape[1], embeddings.device, _full_precision(embeddings).dtype)
        assert self.memory_embeddings is not None and self.memory_labels is not None
        if self.memory_embeddings.device != embeddings.device:
            self.memory_embeddings = self.memory_embeddings.to(embeddings.device)
            self.memory_labels = self.memory_labels.to(embeddings.device)
        return self.memory_embeddings, self.memory_labels

    def get_memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (n, D) embeddings and (n,) labels, oldest first."""
        if self.memory_embeddings is None or self.memory_labels is None:
            return torch.zeros(0, self.embedding_dim or 0), torch.zeros(0, dtype=torch.long)
        n = self.num_filled
        if n < self.memory_size:
            return self.memory_embeddings[:n], self.memory_labels[:n]
        order = torch.roll(torch.arange(n, device=self.memory_labels.device), -self.ptr)
        return self.memory_embeddings[order], self.memory_labels[order]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Write (B, D), (B,) into the ring as given (no gathering), overwriting the oldest rows (only the
        last ``memory_size`` if B is larger)."""
        memory, memory_labels = self._memory_for(embeddings)
        embeddings, labels = embeddings.detach()[-self.memory_size :], labels.detach()[-self.memory_size :]
        n = embeddings.shape[0]
        idx = (self.ptr + torch.arange(n, device=memory_labels.device)) % self.memory_size
        memory[idx] = embeddings.to(memory)
        memory_labels[idx] = labels.to(memory_labels)
        self.ptr = (self.ptr + n) % self.memory_size
        self.num_filled = min(self.num_filled + n, self.memory_size)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the memory (e.g. when the embedding space changes abruptly)."""
        if self.memory_embeddings is not None and self.memory_labels is not None:
            self.memory_embeddings.zero_()
            self.memory_labels.zero_()
        self.ptr, self.num_filled = 0, 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if embeddings.ndim != 2 or (
            self.embedding_dim is not None and embeddings.shape[1] != self.embedding_dim
        ):
            raise ValueError(f"expected embeddings (B, {self.embedding_dim}), got {tuple(embeddings.shape)}")
        memory, memory_labels = self._memory_for(embeddings)
        n = self.num_filled
        out = self.loss(embeddings, labels, memory[:n], memory_labels[:n])
        out["memory_fill"] = embeddings.new_tensor(n / self.memory_size)
        if self.training:  # the global batch (identity without torch.distributed): same memory on every rank
            self.enqueue(all_gather_no_grad(embeddings), all_gather_no_grad(labels))
        return out

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "ptr"] = torch.tensor(self.ptr, dtype=torch.long)
        destination[prefix + "num_filled"] = torch.tensor(self.num_filled, dtype=torch.long)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        counters = {name: state_dict.get(prefix + name) for name in ("ptr", "num_filled")}
        rest = {k: v for k, v in state_dict.items() if k not in (prefix + "ptr", prefix + "num_filled")}
        n_errors = len(error_msgs)
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        memory = self.memory_embeddings
        if memory is not None and (memory.ndim != 2 or memory.shape[0] != self.memory_size):
            error_msgs.append(
                f"{prefix}memory_embeddings: expected {self.memory_size} rows, got {tuple(memory.shape)}"
            )
        for name, value in counters.items():
            if value is None and strict:
                missing_keys.append(prefix + name)
        ptr, num_filled = counters["ptr"], counters["num_filled"]
        if len(error_msgs) > n_errors or ptr is None or num_filled is None or memory is None:
            return
        self.embedding_dim = memory.shape[1]
        self.ptr, self.num_filled = int(ptr), int(num_filled)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, memory_size={self.memory_size}"
