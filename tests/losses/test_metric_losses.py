"""Metric-learning losses against slow, independent loop formulas; edge cases; memory bank; 2-rank DDP."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from isc.losses.barlow_twins import BarlowTwinsLoss
from isc.losses.contrastive import (
    ContrastiveLoss,
    Distance,
    Reduction,
    contrastive_loss,
    contrastive_loss_terms,
)
from isc.losses.d2lv import D2LVLoss
from isc.losses.infonce_entropy import InfoNCEEntropyLoss, entropy_regularizer, infonce_loss
from isc.losses.pairwise import pairwise_euclidean_distance
from isc.losses.triplet import TripletLoss, batch_hard_triplet_loss
from isc.losses.xbm import CrossBatchMemory
from isc.train.dist import all_gather_with_grad

# --- slow references: plain Python over pairs, float math --------------------------------------------------


def _vec(x: torch.Tensor) -> list[list[float]]:
    return x.detach().double().tolist()


def _dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b, strict=True)))


def _dot(a: list[float], b: list[float]) -> float:
    return sum(u * v for u, v in zip(a, b, strict=True))


def _unit(a: list[float]) -> list[float]:
    n = math.sqrt(_dot(a, a))
    return [u / n for u in a]


def ref_triplet(emb: torch.Tensor, labels: torch.Tensor, margin: float | None) -> float:
    e, y = _vec(emb), labels.tolist()
    losses = []
    for i in range(len(e)):
        pos = [_dist(e[i], e[j]) for j in range(len(e)) if j != i and y[j] == y[i]]
        neg = [_dist(e[i], e[j]) for j in range(len(e)) if y[j] != y[i]]
        if not pos or not neg:
            continue
        diff = max(pos) - min(neg)
        losses.append(math.log1p(math.exp(diff)) if margin is None else max(0.0, diff + margin))
    return sum(losses) / len(losses) if losses else 0.0


def ref_infonce(emb: torch.Tensor, labels: torch.Tensor, tau: float, eps: float = 1e-6) -> float:
    """SSCD's InfoNCE as ``sscd/train.py`` (SSCD.loss, non-mixup) writes it, one pair at a time.

    ``partitions = exp(l_ij) + sum_{non-matches n} exp(l_in) + 1e-6``; ``-log(exp(l_ij) / partitions)`` summed
    over the non-trivial matches (same label, j != i) of every anchor, divided by the number of anchors.
    """
    e, y = _vec(emb), labels.tolist()
    total = 0.0
    for i in range(len(e)):
        neg_sum = sum(math.exp(_dot(e[i], e[n]) / tau) for n in range(len(e)) if y[n] != y[i])
        for p in range(len(e)):
            if p != i and y[p] == y[i]:
                num = math.exp(_dot(e[i], e[p]) / tau)
                total += -math.log(num / (num + neg_sum + eps))
    return total / len(e)


def ref_entropy(emb: torch.Tensor, labels: torch.Tensor, eps: float = 1e-8) -> float:
    e, y = _vec(emb), labels.tolist()
    terms = []
    for i in range(len(e)):
        d = [_dist(e[i], e[j]) for j in range(len(e)) if y[j] != y[i]]
        if d:
            terms.append(-math.log(min(d) + eps))
    return sum(terms) / len(terms) if terms else 0.0


def ref_contrastive(
    emb: torch.Tensor,
    labels: torch.Tensor,
    mem: torch.Tensor | None = None,
    mem_labels: torch.Tensor | None = None,
    pos_margin: float = 1.0,
    neg_margin: float = 0.5,
    distance: str = "cosine",
    reduction: str = "nonzero_mean",
) -> tuple[float, float]:
    e, y = [_unit(v) for v in _vec(emb)], labels.tolist()
    refs = list(enumerate(zip(e, y, strict=True)))  # (index in batch, (vector, label))
    if mem is not None and mem_labels is not None:
        refs += [(-1, (_unit(v), lab)) for v, lab in zip(_vec(mem), mem_labels.tolist(), strict=True)]
    pos_l, neg_l = [], []
    for i in range(len(e)):
        for j, (v, lab) in refs:
            if j == i:
                continue
            if distance == "cosine":
                s = _dot(e[i], v)
                pl, nl = max(0.0, pos_margin - s), max(0.0, s - neg_margin)
            else:
                d = _dist(e[i], v)
                pl, nl = max(0.0, d - pos_margin), max(0.0, neg_margin - d)
            (pos_l.append(pl) if lab == y[i] else neg_l.append(nl))

    def red(xs: list[float]) -> float:
        if reduction == "nonzero_mean":
            xs = [x for x in xs if x > 0]
        return sum(xs) / len(xs) if xs else 0.0

    return red(pos_l), red(neg_l)


def _batch(b: int = 12, d: int = 8, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=g, dtype=torch.float64)
    labels = torch.arange(b) % classes
    return emb, labels


# --- helpers -------------------------------------------------------------------------------------------------


def test_pairwise_euclidean_matches_cdist_and_is_finite_on_duplicates() -> None:
    a, _ = _batch(6, 5)
    assert torch.allclose(pairwise_euclidean_distance(a, a), torch.cdist(a, a), atol=1e-6)
    x = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    pairwise_euclidean_distance(x, x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_all_gather_with_grad_is_identity_without_distributed() -> None:
    assert not dist.is_initialized()
    x = torch.randn(4, 3, requires_grad=True)
    y = all_gather_with_grad(x)
    assert y is x
    (2 * y).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.full_like(x, 2.0))


def test_losses_compute_in_float32_under_bf16_autocast() -> None:
    emb, labels = _batch(12, 16, 4)
    emb = F.normalize(emb, dim=1).float()
    fns = {
        "triplet": lambda e: batch_hard_triplet_loss(e, labels),
        "infonce": lambda e: infonce_loss(e, labels),
        "entropy": lambda e: entropy_regularizer(e, labels),
        "contrastive": lambda e: contrastive_loss(e, labels),
    }
    for name, fn in fns.items():
        expected = fn(emb)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            got = fn(emb)
            from_half = fn(emb.bfloat16())
        assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), rel=1e-5), name
        assert from_half.dtype == torch.float32 and torch.isfinite(from_half), name


# --- batch-hard triplet ------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [None, 0.3, 5.0])
def test_batch_hard_triplet_matches_loop(margin: float | None) -> None:
    emb, labels = _batch(12, 8, 4)
    got = batch_hard_triplet_loss(emb, labels, margin=margin)
    assert got.item() == pytest.approx(ref_triplet(emb, labels, margin), rel=1e-9, abs=1e-12)


def test_batch_hard_triplet_excludes_anchors_without_positive() -> None:
    emb, _ = _batch(7, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # class 3 has a single sample: no positive for anchor 6
    got = batch_hard_triplet_loss(emb, labels, margin=None)
    assert got.item() == pytest.approx(ref_triplet(emb, labels, None), rel=1e-9)
    # ... and the excluded anchor really is excluded: same as the mean over anchors 0..5 alone.
    d = pairwise_euclidean_distance(emb, emb)
    terms = []
    for i in range(6):
        same = labels == labels[i]
        same[i] = False
        terms.append(F.softplus(d[i][same].max() - d[i][labels != labels[i]].min()))
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-9)
    # the singleton still acts as a negative for the others and receives gradient through that
    emb = emb.clone().requires_grad_(True)
    batch_hard_triplet_loss(emb, labels).backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_batch_hard_triplet_all_same_label_is_zero_and_differentiable() -> None:
    emb = torch.randn(5, 4, requires_grad=True)
    loss = batch_hard_triplet_loss(emb, torch.zeros(5, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and torch.equal(emb.grad, torch.zeros_like(emb))


def test_batch_hard_triplet_all_distinct_labels_is_zero() -> None:
    emb = torch.randn(5, 4)
    assert batch_hard_triplet_loss(emb, torch.arange(5)).item() == 0.0


def test_batch_hard_triplet_normalize_and_module() -> None:
    emb, labels = _batch(10, 6, 3)
    got = batch_hard_triplet_loss(emb, labels, margin=0.2, normalize=True)
    assert got.item() == pytest.approx(ref_triplet(F.normalize(emb, dim=1), labels, 0.2), rel=1e-9)
    out = TripletLoss(margin=0.2, normalize=True)(emb, labels)
    assert set(out) == {"loss", "triplet"} and torch.equal(out["loss"], got)


def test_batch_hard_triplet_gradcheck() -> None:
    emb, labels = _batch(8, 4, 2, seed=3)
    emb.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: batch_hard_triplet_loss(e, labels), (emb,))
    assert torch.autograd.gradcheck(lambda e: batch_hard_triplet_loss(e, labels, margin=10.0), (emb,))


# --- D2LV -----------------------------------------------------------------------------------------------------


def test_d2lv_loss_is_weighted_label_smoothed_ce_plus_soft_triplet() -> None:
    features, labels = _batch(8, 6, 4, seed=1)
    logits = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = D2LVLoss()(features, logits, labels)
    assert set(out) == {"loss", "ce", "triplet"}
    eps, c = 0.1, logits.shape[1]
    logp = torch.log_softmax(logits, dim=1)
    manual_ce = torch.stack(
        [-(1 - eps) * logp[i, labels[i]] - eps / c * logp[i].sum() for i in range(len(labels))]
    ).mean()
    assert out["ce"].item() == pytest.approx(manual_ce.item(), rel=1e-9)
    assert out["triplet"].item() == pytest.approx(ref_triplet(features, labels, None), rel=1e-9)
    assert out["loss"].item() == pytest.approx(10 * manual_ce.item() + out["triplet"].item(), rel=1e-9)


def test_d2lv_loss_weights_margin_and_no_classifier() -> None:
    features, labels = _batch(8, 6, 4)
    logits = torch.randn(8, 4, dtype=torch.float64)
    out = D2LVLoss(ce_weight=2.0, triplet_weight=0.5, label_smoothing=0.0, margin=0.3)(
        features, logits, labels
    )
    assert out["ce"].item() == pytest.approx(F.cross_entropy(logits, labels).item())
    assert out["triplet"].item() == pytest.approx(ref_triplet(features, labels, 0.3))
    assert out["loss"].item() == pytest.approx(2 * out["ce"].item() + 0.5 * out["triplet"].item())
    no_cls = D2LVLoss()(features, None, labels)
    assert no_cls["ce"].item() == 0.0 and no_cls["loss"].item() == pytest.approx(no_cls["triplet"].item())


# --- SSCD: InfoNCE + entropy --------------------------------------------------------------------------------


@pytest.mark.parametrize(("classes", "tau"), [(6, 0.05), (4, 0.05), (3, 0.5)])
def test_infonce_matches_loop(classes: int, tau: float) -> None:
    emb, labels = _batch(12, 8, classes)  # 2, 3 and 4 views per class
    emb = F.normalize(emb, dim=1)
    got = infonce_loss(emb, labels, temperature=tau)
    assert got.item() == pytest.approx(ref_infonce(emb, labels, tau), rel=1e-9)


def test_infonce_two_views_equals_textbook_softmax_over_all_others() -> None:
    emb, labels = _batch(10, 8, 5)  # every sample has exactly one positive
    emb = F.normalize(emb, dim=1)
    logits = emb @ emb.T / 0.05
    logits.fill_diagonal_(float("-inf"))
    target = torch.tensor(
        [int(((labels == labels[i]) & (torch.arange(10) != i)).nonzero()) for i in range(10)]
    )
    textbook = F.cross_entropy(logits, target).item()
    assert infonce_loss(emb, labels, eps=0.0).item() == pytest.approx(textbook, rel=1e-9)
    assert infonce_loss(emb, labels).item() == pytest.approx(textbook, rel=1e-5)  # SSCD's 1e-6 guard


def test_infonce_sums_over_positives_as_sscd() -> None:
    """With K views per image an anchor's K - 1 positive pairs add up (SSCD), they are not averaged."""
    emb, _ = _batch(12, 8)
    emb = F.normalize(emb, dim=1)
    four_views = torch.arange(12) % 3  # 3 positives per anchor
    pair_mean = ref_infonce(emb, four_views, 0.05) / 3  # what averaging over the positives would give
    got = infonce_loss(emb, four_views).item()
    assert got == pytest.approx(ref_infonce(emb, four_views, 0.05), rel=1e-9)
    assert got == pytest.approx(3 * pair_mean, rel=1e-9) and got > 2 * pair_mean


def test_infonce_edge_cases() -> None:
    emb, _ = _batch(7, 6)
    emb = F.normalize(emb, dim=1)
    single = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # classes 2 and 3 have a single sample: cost 0, still in B
    got = infonce_loss(emb, single).item()
    assert got == pytest.approx(ref_infonce(emb, single, 0.05), rel=1e-9)
    zeros = torch.zeros(7, dtype=torch.long)
    x = emb.clone().requires_grad_(True)
    same = infonce_loss(x, zeros, eps=0.0)  # no negatives: every pair costs -log 1 = 0
    assert same.item() == 0.0
    same.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    guarded = infonce_loss(emb, zeros)  # SSCD's 1e-6 in the partition: a finite cost, as SSCD's
    assert torch.isfinite(guarded) and guarded.item() > 0.0
    assert guarded.item() == pytest.approx(ref_infonce(emb, zeros, 0.05), rel=1e-6)
    y = emb.clone().requires_grad_(True)
    distinct = infonce_loss(y, torch.arange(7))  # no positives: nothing to average
    assert distinct.item() == 0.0
    distinct.backward()
    assert y.grad is not None and torch.equal(y.grad, torch.zeros_like(y))


def test_infonce_is_stable_at_low_temperature() -> None:
    emb, labels = _batch(8, 4, 4)
    emb = F.normalize(emb, dim=1).float()
    loss = infonce_loss(emb, labels, temperature=1e-3)
    assert torch.isfinite(loss)


def test_entropy_regularizer_matches_loop_and_edges() -> None:
    emb, labels = _batch(12, 8, 4)
    emb = F.normalize(emb, dim=1)
    assert entropy_regularizer(emb, labels).item() == pytest.approx(ref_entropy(emb, labels), rel=1e-9)
    single = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert entropy_regularizer(emb, single).item() == pytest.approx(ref_entropy(emb, single), rel=1e-9)
    x = emb.clone().requires_grad_(True)
    loss = entropy_regularizer(x, torch.zeros(12, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
    dup = torch.zeros(3, 4, requires_grad=True)  # identical non-matching points: finite, large
    out = entropy_regularizer(dup, torch.arange(3))
    out.backward()
    assert torch.isfinite(out) and out.item() > 10 and dup.grad is not None and torch.isfinite(dup.grad).all()


def test_infonce_and_entropy_gradcheck() -> None:
    emb, labels = _batch(8, 4, 3, seed=5)
    emb.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: infonce_loss(F.normalize(e, dim=1), labels, 0.5), (emb,))
    assert torch.autograd.gradcheck(lambda e: entropy_regularizer(e, labels), (emb,))


def test_infonce_entropy_module() -> None:
    emb, labels = _batch(12, 8, 6)
    emb = F.normalize(emb, dim=1)
    out = InfoNCEEntropyLoss()(emb, labels)
    assert set(out) == {"loss", "infonce", "entropy"}
    assert out["infonce"].item() == pytest.approx(ref_infonce(emb, labels, 0.05), rel=1e-9)
    assert out["entropy"].item() == pytest.approx(ref_entropy(emb, labels), rel=1e-9)
    assert out["loss"].item() == pytest.approx(out["infonce"].item() + 30 * out["entropy"].item(), rel=1e-9)
    raw = 3 * emb
    normed = InfoNCEEntropyLoss(temperature=0.1, entropy_weight=10.0, normalize=True)(raw, labels)
    assert normed["loss"].item() == pytest.approx(
        ref_infonce(emb, labels, 0.1) + 10 * ref_entropy(emb, labels), rel=1e-9
    )


# --- contrastive + cross-batch memory --------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("reduction", ["nonzero_mean", "mean"])
def test_contrastive_matches_loop(distance: Distance, reduction: Reduction) -> None:
    emb, labels = _batch(12, 8, 4)
    mem, mem_labels = _batch(6, 8, 5, seed=9)
    margins = {"cosine": (1.0, 0.1), "euclidean": (0.0, 1.3)}[distance]
    for m, ml in ((None, None), (mem, mem_labels)):
        pos, neg = contrastive_loss_terms(
            emb,
            labels,
            m,
            ml,
            *margins,
            distance=distance,
            reduction=reduction,
        )
        rpos, rneg = ref_contrastive(emb, labels, m, ml, *margins, distance=distance, reduction=reduction)
        assert pos.item() == pytest.approx(rpos, rel=1e-9, abs=1e-12)
        assert neg.item() == pytest.approx(rneg, rel=1e-9, abs=1e-12)
        assert rneg > 0


def test_contrastive_module_and_edges() -> None:
    emb, labels = _batch(8, 6, 4)
    out = ContrastiveLoss()(emb, labels)
    assert set(out) == {"loss", "pos", "neg"}
    assert out["loss"].item() == pytest.approx(contrastive_loss(emb, labels).item())
    x = emb.clone().requires_grad_(True)
    zero = contrastive_loss(x, torch.arange(8), neg_margin=1.0)  # no positives; no negative above s = 1
    assert zero.item() == 0.0
    zero.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="distance"):
        ContrastiveLoss(distance="manhattan")  # type: ignore[arg-type]


def test_xbm_fifo_order_and_size_cap() -> None:
    xbm = CrossBatchMemory(embedding_dim=3, memory_size=5)
    batches = [(torch.full((2, 3), float(k)), torch.tensor([10 * k, 10 * k + 1])) for k in range(4)]
    for k, (e, y) in enumerate(batches):
        xbm(e + torch.randn(2, 3) * 0.01, y)
        assert xbm.memory_embeddings.shape == (5, 3) and int(xbm.num_filled) == min(2 * (k + 1), 5)
    _, labels = xbm.get_memory()
    assert labels.tolist() == [11, 20, 21, 30, 31]  # the last 5 enqueued, oldest first
    xbm.enqueue(torch.zeros(7, 3), torch.arange(100, 107))  # bigger than the memory: keep its last 5
    assert xbm.get_memory()[1].tolist() == [102, 103, 104, 105, 106]
    xbm.reset()
    assert int(xbm.num_filled) == 0 and xbm.get_memory()[0].shape == (0, 3)


def test_xbm_loss_uses_memory_entries() -> None:
    torch.manual_seed(0)
    xbm = CrossBatchMemory(embedding_dim=4, memory_size=16, loss=ContrastiveLoss(reduction="mean"))
    first = torch.randn(3, 4)
    out1 = xbm(first, torch.tensor([0, 1, 2]))
    assert out1["pos"].item() == 0.0  # no positive pair anywhere yet
    assert out1["memory_fill"].item() == 0.0
    second = torch.randn(2, 4, requires_grad=True)
    out2 = xbm(second, torch.tensor([1, 7]))  # the only positive of sample 0 is memory row 1
    expected_pos = 1 - F.cosine_similarity(second[0], first[1], dim=0)
    assert out2["pos"].item() == pytest.approx(expected_pos.item(), rel=1e-6)
    ref_pos, ref_neg = ref_contrastive(
        second, torch.tensor([1, 7]), first, torch.tensor([0, 1, 2]), reduction="mean"
    )
    assert out2["pos"].item() == pytest.approx(ref_pos, rel=1e-6)
    assert out2["neg"].item() == pytest.approx(ref_neg, rel=1e-4, abs=1e-9)
    out2["loss"].backward()
    assert second.grad is not None and second.grad[0].abs().sum() > 0
    assert not xbm.memory_embeddings.requires_grad and int(xbm.num_filled) == 5


def test_xbm_eval_mode_does_not_enqueue() -> None:
    xbm = CrossBatchMemory(embedding_dim=4, memory_size=8).eval()
    xbm(torch.randn(3, 4), torch.arange(3))
    assert int(xbm.num_filled) == 0


def test_xbm_state_dict_round_trip_and_dtype() -> None:
    torch.manual_seed(1)
    xbm = CrossBatchMemory(embedding_dim=4, memory_size=6)
    for _ in range(4):
        xbm(torch.randn(2, 4), torch.randint(0, 3, (2,)))
    state = xbm.state_dict()
    assert {"memory_embeddings", "memory_labels", "ptr", "num_filled"} <= set(state)
    resumed = CrossBatchMemory(embedding_dim=4, memory_size=6)
    resumed.load_state_dict(state)
    for a, b in zip(xbm.get_memory(), resumed.get_memory(), strict=True):
        assert torch.equal(a, b)
    probe, probe_labels = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert torch.equal(xbm.eval()(probe, probe_labels)["loss"], resumed.eval()(probe, probe_labels)["loss"])
    resumed.double().train()
    assert resumed.memory_embeddings.dtype == torch.float64 and resumed.memory_labels.dtype == torch.long
    resumed(torch.randn(2, 4), torch.tensor([5, 6]))  # float32 batch into a float64 memory
    assert resumed.memory_embeddings.dtype == torch.float64 and resumed.get_memory()[1][-2:].tolist() == [
        5,
        6,
    ]


def test_xbm_infers_the_embedding_dim_and_keeps_its_memory_out_of_the_buffers() -> None:
    xbm = CrossBatchMemory(memory_size=6)  # embedding_dim=None: any head, or none
    assert xbm.embedding_dim is None and xbm.get_memory()[0].shape == (0, 0)
    assert set(xbm.state_dict()) == {"ptr", "num_filled"}  # nothing allocated yet
    CrossBatchMemory(memory_size=6).load_state_dict(xbm.state_dict())  # ... and that loads
    out = xbm(torch.randn(4, 7), torch.tensor([0, 0, 1, 1]))
    assert xbm.embedding_dim == 7 and xbm.get_memory()[0].shape == (4, 7) and out["pos"].item() > 0
    # DDP broadcasts every buffer of rank 0 before each forward: the memory must not be one
    assert list(xbm.buffers()) == []
    state = xbm.state_dict()
    assert {"memory_embeddings", "memory_labels", "ptr", "num_filled"} <= set(state)
    resumed = CrossBatchMemory(memory_size=6)
    resumed.load_state_dict(state)
    assert resumed.embedding_dim == 7 and int(resumed.num_filled) == 4
    assert torch.equal(resumed.get_memory()[0], xbm.get_memory()[0])
    with pytest.raises(RuntimeError, match="memory_embeddings"):
        CrossBatchMemory(embedding_dim=5, memory_size=6).load_state_dict(state)
    with pytest.raises(RuntimeError, match="rows"):
        CrossBatchMemory(memory_size=8).load_state_dict(state)
    with pytest.raises(ValueError, match="expected embeddings"):
        xbm(torch.randn(2, 5), torch.tensor([0, 1]))


def test_loss_configs_use_sscd_lambda_and_a_lazy_xbm() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[2] / "conf"
    found = {p.stem: p for p in root.rglob("*.yaml") if p.parent.name == "loss"}
    sscd = instantiate(OmegaConf.load(found["infonce_entropy"]))
    assert isinstance(sscd, InfoNCEEntropyLoss) and (sscd.entropy_weight, sscd.temperature) == (30.0, 0.05)
    xbm = instantiate(OmegaConf.load(found["contrastive_xbm"]))  # no interpolation of a head's out_dim
    assert isinstance(xbm, CrossBatchMemory) and xbm.embedding_dim is None


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: TripletLoss(margin=-0.1), "margin"),
        (lambda: D2LVLoss(ce_weight=-1.0), "ce_weight"),
        (lambda: D2LVLoss(triplet_weight=-1.0), "triplet_weight"),
        (lambda: D2LVLoss(label_smoothing=1.0), "label_smoothing"),
        (lambda: D2LVLoss(margin=-1.0), "margin"),
        (lambda: InfoNCEEntropyLoss(temperature=0.0), "temperature"),
        (lambda: InfoNCEEntropyLoss(entropy_weight=-1.0), "entropy_weight"),
        (lambda: ContrastiveLoss(distance="manhattan"), "distance"),  # type: ignore[arg-type]
        (lambda: ContrastiveLoss(reduction="sum"), "reduction"),  # type: ignore[arg-type]
        (lambda: CrossBatchMemory(memory_size=0), "memory_size"),
        (lambda: CrossBatchMemory(embedding_dim=0), "embedding_dim"),
        (lambda: BarlowTwinsLoss(lambda_offdiag=-0.1), "lambda_offdiag"),
        (lambda: BarlowTwinsLoss(eps=0.0), "eps"),
    ],
)
def test_loss_arguments_are_checked_at_construction(make: Any, argument: str) -> None:
    """A bad config value fails when Hydra builds the loss, naming the argument, not at the first step."""
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        make()


def test_every_configured_loss_declares_what_it_consumes() -> None:
    """The training modules read these declarations instead of checking loss types (lightning_modules)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[2] / "conf" / "model" / "loss"
    losses = {p.stem: instantiate(OmegaConf.load(p)) for p in sorted(root.glob("*.yaml"))}
    inputs = {name: loss.inputs for name, loss in losses.items()}
    assert inputs == {
        "barlow_twins": "projection_pair",
        "contrastive_xbm": "labelled_embeddings",
        "d2lv": "labelled_embeddings",
        "infonce_entropy": "labelled_embeddings",
        "momentum2_teacher": "predictions_and_targets",
    }
    classifier = {
        n: loss.needs_classifier for n, loss in losses.items() if loss.inputs == "labelled_embeddings"
    }
    assert classifier == {"contrastive_xbm": False, "d2lv": True, "infonce_entropy": False}
    assert TripletLoss.needs_classifier is False and ContrastiveLoss.needs_classifier is False


# --- two-rank DDP (gloo, CPU): the gathered losses equal the full-batch loss ------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        full = torch.randn(8, 6, dtype=torch.float64)
        labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # every positive lives on the other rank
        sl = slice(4 * rank, 4 * rank + 4)
        result: dict[str, torch.Tensor] = {}

        x = full[sl].clone().requires_grad_(True)
        gathered = all_gather_with_grad(x)
        (gathered * (rank + 1)).sum().backward()  # rank r weighs every gathered row by r + 1
        result["gathered"], result["gather_grad"] = gathered.detach(), x.grad.clone()  # type: ignore[union-attr]

        losses = {
            "triplet": lambda e, y: batch_hard_triplet_loss(e, y, gather_distributed=True),
            "sscd": lambda e, y: InfoNCEEntropyLoss(entropy_weight=1.0, gather_distributed=True)(
                F.normalize(e, dim=1), y
            )["loss"],
        }
        for name, fn in losses.items():
            x = full[sl].clone().requires_grad_(True)
            loss = fn(x, labels[sl])
            loss.backward()
            result[f"{name}_loss"], result[f"{name}_grad"] = loss.detach(), x.grad.clone()  # type: ignore[union-attr]

        xbm = CrossBatchMemory(6, memory_size=16, loss=ContrastiveLoss(gather_distributed=True))
        xbm(full[sl].float(), labels[sl])
        result["memory"], result["memory_labels"] = xbm.get_memory()
        local_loss = CrossBatchMemory(None, memory_size=16, loss=ContrastiveLoss(gather_distributed=False))
        local_loss(full[sl].float(), labels[sl])  # the memory takes the global batch all the same
        result["memory_local_loss"] = local_loss.get_memory()[0]
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_gather_distributed_two_ranks_equals_full_batch(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    full = torch.randn(8, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])

    for r in range(world):
        assert torch.equal(res[r]["gathered"], full)
        assert torch.equal(res[r]["gather_grad"], torch.full((4, 6), 3.0, dtype=torch.float64))  # 1 + 2

    refs = {
        "triplet": lambda e: batch_hard_triplet_loss(e, labels),
        "sscd": lambda e: InfoNCEEntropyLoss(entropy_weight=1.0)(F.normalize(e, dim=1), labels)["loss"],
    }
    for name, fn in refs.items():
        x = full.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        assert x.grad is not None
        # DDP averages gradients over ranks: mean of the per-rank losses / gradients = full-batch ones.
        assert torch.stack([r[f"{name}_loss"] for r in res]).mean().item() == pytest.approx(
            loss.item(), rel=1e-9
        )
        for r in range(world):
            assert torch.allclose(res[r][f"{name}_grad"] / world, x.grad[4 * r : 4 * r + 4], atol=1e-10), name

    for r in range(world):  # every rank enqueued the same global batch
        assert res[r]["memory_labels"].tolist() == labels.tolist()
        assert torch.allclose(res[r]["memory"], full.float())
        assert torch.equal(res[r]["memory_local_loss"], res[r]["memory"])
