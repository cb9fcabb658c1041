"""WaveBlock band semantics, BN-neck head and projection head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from isc.models.heads import BNNeckHead, ProjectionHead, WaveBlock

# --- WaveBlock -----------------------------------------------------------------------------------------------


def _row_scales(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, H) per-row scale, asserting it is constant across channels and columns."""
    scale = out / x
    assert torch.allclose(scale, scale[:, :1, :, :1].expand_as(scale))
    return scale[:, 0, :, 0]


def test_waveblock_is_identity_in_eval() -> None:
    x = torch.randn(4, 3, 10, 6)
    out = WaveBlock().eval()(x)
    assert torch.equal(out, x)


@pytest.mark.parametrize(
    ("height", "ratio", "factor"), [(16, 0.3, 1.5), (7, 0.3, 2.0), (8, 0.5, 0.0), (5, 1.0, 3.0)]
)
def test_waveblock_keeps_exactly_one_band_per_sample(height: int, ratio: float, factor: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(32, 3, height, 5) + 0.5  # strictly positive so out / x recovers the scale
    out = WaveBlock(ratio=ratio, factor=factor)(x)
    band = round(ratio * height)
    for b, rows in enumerate(_row_scales(out, x) if factor else (out[:, 0, :, 0] == x[:, 0, :, 0]).double()):
        kept = torch.isclose(rows, torch.ones_like(rows)).nonzero().flatten().tolist()
        assert len(kept) == band, (b, rows)
        assert kept == list(range(kept[0], kept[0] + band)) if band else True  # contiguous
        others = [r for r in range(height) if r not in kept]
        if factor:
            assert torch.allclose(rows[others], torch.full((len(others),), factor, dtype=rows.dtype))
        else:
            assert (out[b, :, others] == 0).all()


def test_waveblock_bands_vary_per_sample_and_are_seeded() -> None:
    x = torch.ones(64, 2, 16, 4)
    torch.manual_seed(123)
    a = WaveBlock()(x)
    torch.manual_seed(123)
    b = WaveBlock()(x)
    assert torch.equal(a, b)
    starts = {int((a[i, 0, :, 0] == 1).nonzero()[0]) for i in range(64)}
    assert len(starts) > 3  # per-sample draws over 16 - 5 + 1 = 12 possible starts
    shared = WaveBlock(per_sample=False)(x)
    assert all(torch.equal(shared[i], shared[0]) for i in range(64))


def test_waveblock_gradient_is_the_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 2, 10, 4, requires_grad=True)
    out = WaveBlock(factor=2.0)(x)
    out.sum().backward()
    assert x.grad is not None and torch.allclose(x.grad * x, out)


# --- BNNeckHead -------------------------------------------------------------------------------------------------


def test_bnneck_head_shapes_and_descriptor() -> None:
    torch.manual_seed(0)
    head = BNNeckHead(in_dim=16, hidden_dims=(32,), out_dim=24, num_classes=10)
    assert head.descriptor_dim == 24
    out = head(torch.randn(6, 16))
    assert out["features"] is not None and out["features"].shape == (6, 24)
    assert out["bn_features"] is not None and out["bn_features"].shape == (6, 24)
    assert out["logits"] is not None and out["logits"].shape == (6, 10)
    head.eval()
    x = torch.randn(5, 16)
    desc = head.descriptor(x)
    assert desc.shape == (5, 24)
    assert torch.allclose(desc.norm(dim=1), torch.ones(5))
    bn = head(x)["bn_features"]
    assert bn is not None and torch.allclose(desc, F.normalize(bn, dim=1))
    assert torch.equal(head.embed(x), desc)


def test_bnneck_head_bn_bias_frozen_and_classifier_bias_free() -> None:
    torch.manual_seed(0)
    head = BNNeckHead(in_dim=8, hidden_dims=(16,), out_dim=12, num_classes=50)
    assert not head.neck.bias.requires_grad and head.neck.weight.requires_grad
    assert torch.equal(head.neck.bias, torch.zeros(12)) and torch.equal(head.neck.weight, torch.ones(12))
    assert head.classifier is not None and head.classifier.bias is None
    assert head.classifier.weight.std().item() == pytest.approx(0.001, rel=0.2)
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert all(p is not head.neck.bias for p in trainable)
    opt = torch.optim.SGD(trainable, lr=1.0)
    out = head(torch.randn(4, 8))
    assert out["logits"] is not None
    F.cross_entropy(out["logits"], torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.equal(head.neck.bias, torch.zeros(12))
    # the neck output stays centred in training: BN with zero bias
    assert out["bn_features"] is not None and out["bn_features"].mean(0).abs().max() < 1e-5


def test_bnneck_head_without_classifier_and_layers() -> None:
    head = BNNeckHead(in_dim=8, hidden_dims=(), out_dim=4)
    assert head.classifier is None
    assert head(torch.randn(3, 8))["logits"] is None
    assert [type(m).__name__ for m in head.mlp] == ["Linear"]
    relu = BNNeckHead(in_dim=8, hidden_dims=(6, 5), out_dim=4, negative_slope=0.0)
    assert [type(m).__name__ for m in relu.mlp] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    leaky = BNNeckHead(in_dim=8, hidden_dims=(6,), out_dim=4)
    assert isinstance(leaky.mlp[2], torch.nn.LeakyReLU) and leaky.mlp[2].negative_slope == 0.2


def test_bnneck_default_is_d2lv_geometry() -> None:
    head = BNNeckHead(num_classes=0)
    assert head.mlp[0].in_features == 2048 and head.mlp[0].out_features == 4096
    assert head.mlp[-1].out_features == 8192 and head.descriptor_dim == 8192


# --- ProjectionHead ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [False, True])
def test_projection_head_outputs_unit_vectors(batch_norm: bool) -> None:
    torch.manual_seed(0)
    head = ProjectionHead(in_dim=16, out_dim=8, batch_norm=batch_norm)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 8) and head.descriptor_dim == 8
    assert torch.allclose(out.norm(dim=1), torch.ones(5))
    assert (head.linear.bias is None) == batch_norm
    head.eval()
    x = torch.randn(3, 16)
    assert torch.equal(head.descriptor(x), head(x))
