"""Backbones (ResNet-50/152, ResNet-50-IBN-a, EfficientNet-Lite0) and checkpoint loading for each layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from isc.models.checkpoints import load_state_dict_file, load_trunk_weights, read_checkpoint
from isc.models.descriptor import DescriptorModel
from isc.models.pooling import AvgPool, GeM
from isc.models.trunks import IBN, Trunk, efficientnet_lite0, resnet50, resnet50_ibn_a, resnet152


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state dict with random (seeded) weights and non-trivial BN statistics."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    state = net.state_dict()
    for k, v in state.items():
        if v.is_floating_point():
            v.copy_(torch.randn_like(v).abs() + 0.1 if "running_var" in k else torch.randn_like(v))
    return state


@pytest.fixture(scope="module")
def target() -> Trunk:
    return resnet50()


def zero_(trunk: Trunk) -> None:
    with torch.no_grad():
        for t in trunk.state_dict().values():
            t.zero_()


def assert_loaded(trunk: Trunk, expected: dict[str, torch.Tensor]) -> None:
    """Every trunk tensor equals the torchvision tensor of the same name."""
    got = trunk.body.state_dict()
    assert set(got) == {k for k in expected if not k.startswith("fc.")}
    for k, v in got.items():
        assert torch.equal(v, expected[k]), k


# --------------------------------------------------------------------------------------------------
# architectures


def test_ibn_a_has_instance_norm_on_half_the_channels_of_bn1_in_layers_1_to_3() -> None:
    trunk = resnet50_ibn_a()
    body = trunk.body
    assert isinstance(body.bn1, nn.BatchNorm2d)  # stem untouched
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(body, name):
            planes = block.conv1.out_channels
            if name == "layer4":
                assert isinstance(block.bn1, nn.BatchNorm2d)
                continue
            assert isinstance(block.bn1, IBN), name
            assert block.bn1.IN.num_features == planes // 2 and block.bn1.IN.affine
            assert block.bn1.BN.num_features == planes - planes // 2
            assert isinstance(block.bn2, nn.BatchNorm2d) and isinstance(block.bn3, nn.BatchNorm2d)
    n_ibn = sum(isinstance(m, IBN) for m in trunk.modules())
    assert n_ibn == 3 + 4 + 6
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in trunk.modules()) == n_ibn
    keys = trunk.body.state_dict()
    assert "layer1.0.bn1.IN.weight" in keys and "layer3.5.bn1.BN.running_mean" in keys  # IBN-Net names
    assert "layer4.0.bn1.weight" in keys


def test_ibn_forward_is_instance_norm_then_batch_norm_on_the_channel_halves() -> None:
    torch.manual_seed(0)
    ibn = IBN(6).train()
    with torch.no_grad():
        ibn.IN.weight.uniform_(0.5, 2)
        ibn.IN.bias.normal_()
        ibn.BN.weight.uniform_(0.5, 2)
        ibn.BN.bias.normal_()
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    ibn = ibn.double()
    a, b = x[:, :3], x[:, 3:]
    inorm = (a - a.mean(dim=(2, 3), keepdim=True)) / torch.sqrt(
        a.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    bnorm = (b - b.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(
        b.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    expected = torch.cat(
        [
            inorm * ibn.IN.weight.view(1, -1, 1, 1) + ibn.IN.bias.view(1, -1, 1, 1),
            bnorm * ibn.BN.weight.view(1, -1, 1, 1) + ibn.BN.bias.view(1, -1, 1, 1),
        ],
        dim=1,
    )
    torch.testing.assert_close(ibn(x), expected)


def test_resnet152_depth_and_last_stride_option() -> None:
    trunk = resnet152(last_stride=1)
    assert [len(getattr(trunk.body, f"layer{i}")) for i in range(1, 5)] == [3, 8, 36, 3]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert trunk.eval()(x).shape == (1, 2048, 4, 4)  # stride 16 instead of 32
        assert resnet50().eval()(x).shape == (1, 2048, 2, 2)
    with pytest.raises(ValueError, match="last_stride"):
        resnet50(last_stride=3)


def test_descriptor_model_gem_and_raw_features() -> None:
    trunk = resnet50_ibn_a().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        unit = DescriptorModel(trunk, GeM(p=3.0), dim=128).eval()(x)
        raw = DescriptorModel(trunk, AvgPool(), normalize=False).eval()(x)
        features = trunk(
            (x - torch.tensor(trunk.mean).view(1, 3, 1, 1)) / torch.tensor(trunk.std).view(1, 3, 1, 1)
        )
    assert unit.shape == (2, 128)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(raw, features.mean(dim=(2, 3)))


def test_timm_efficientnet_lite0_weights_give_the_same_features() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    trunk = efficientnet_lite0(pretrained=False).eval()
    report = load_trunk_weights(trunk, reference.state_dict())
    assert report.missing == [] and sorted(report.unexpected) == ["classifier.bias", "classifier.weight"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), reference.forward_features(x))


def test_packaged_efficientnet_lite0_still_loads() -> None:
    trunk = efficientnet_lite0(pretrained=True)
    assert trunk.out_channels == 1280 and trunk.mean == (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------------------------------
# checkpoint layouts


def test_torchvision_state_dict_reports_fc_as_unexpected(source: dict, target: Trunk) -> None:
    zero_(target)
    report = load_trunk_weights(target, source)
    assert report.prefix == "" and report.missing == []
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    assert_loaded(target, source)


def test_official_barlow_twins_file_through_the_factory(source: dict, tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"  # torch.save(model.backbone.state_dict()) with fc = Identity
    torch.save({k: v for k, v in source.items() if not k.startswith("fc.")}, path)
    assert_loaded(resnet50(weights=path), source)
    loaded = load_state_dict_file(path)  # the older helper keeps working
    assert set(loaded) == {k for k in source if not k.startswith("fc.")}


def test_barlow_twins_training_checkpoint_with_ddp_prefix(
    source: dict, target: Trunk, tmp_path: Path
) -> None:
    model = {f"module.backbone.{k}": v for k, v in source.items() if not k.startswith("fc.")}
    model["module.projector.0.weight"] = torch.randn(16, 2048)
    model["module.bn.running_mean"] = torch.zeros(16)
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "model": model, "optimizer": {"state": {}, "param_groups": []}}, path)
    zero_(target)
    report = load_trunk_weights(target, path)
    assert report.prefix == "model.module.backbone." and report.unexpected == [] and report.ignored == 2
    assert_loaded(target, source)


def test_momentum2_teacher_checkpoint_takes_student_unless_told(
    source: dict, target: Trunk, tmp_path: Path
) -> None:
    teacher = {k: v + 1 if v.is_floating_point() else v for k, v in source.items()}
    model = {f"module.student_encoder.{k}": v for k, v in source.items()}
    model |= {f"module.teacher_encoder.{k}": v for k, v in teacher.items()}
    path = tmp_path / "last_epoch_ckpt.pth.tar"
    torch.save({"start_epoch": 300, "model": model}, path)
    zero_(target)
    report = load_trunk_weights(target, path)
    assert report.prefix == "model.module.student_encoder."
    assert_loaded(target, source)
    zero_(target)
    assert load_trunk_weights(target, path, prefix="module.teacher_encoder").prefix.endswith(
        "teacher_encoder."
    )
    assert_loaded(target, teacher)


def test_byol_sequential_encoder_layout(source: dict, target: Trunk, tmp_path: Path) -> None:
    """PyTorch-BYOL saves ``nn.Sequential(*resnet.children())[:-1]`` as ``online_network_state_dict.encoder.N``."""
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    online = {}
    for k, v in source.items():
        head, _, rest = k.partition(".")
        if head in index:
            online[f"encoder.{index[head]}.{rest}"] = v
    online["projetion.net.0.weight"] = torch.randn(8, 2048)
    path = tmp_path / "model.pth"
    torch.save({"online_network_state_dict": online, "optimizer_state_dict": {}}, path)
    zero_(target)
    report = load_trunk_weights(target, path)
    assert report.prefix == "online_network_state_dict.encoder." and report.missing == []
    assert_loaded(target, source)


def test_timm_resnet_state_dict(target: Trunk) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    state = timm.create_model("resnet50", pretrained=False).state_dict()
    zero_(target)
    assert load_trunk_weights(target, state).missing == []
    assert_loaded(target, state)


def test_lightning_style_checkpoint_prefers_the_student(source: dict, target: Trunk, tmp_path: Path) -> None:
    state = {f"backbone.trunk.body.{k}": v for k, v in source.items() if not k.startswith("fc.")}
    state |= {f"teacher.backbone.trunk.body.{k}": torch.zeros_like(v) for k, v in source.items()}
    state["projector.0.weight"] = torch.randn(4, 2048)
    path = tmp_path / "last.ckpt"
    torch.save(
        {"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.6", "state_dict": state}, path
    )
    assert "state_dict.backbone.trunk.body.conv1.weight" in read_checkpoint(path)
    zero_(target)
    assert load_trunk_weights(target, path).prefix == "state_dict.backbone.trunk.body."
    assert_loaded(target, source)


def test_shape_mismatch_is_an_error(target: Trunk) -> None:
    import torchvision

    wide = torchvision.models.wide_resnet50_2().state_dict()  # same key names, wider bottlenecks
    with pytest.raises(ValueError, match="shape mismatch"):
        load_trunk_weights(target, wide)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_trunk_weights(
            resnet50_ibn_a(), {**resnet50_ibn_a().body.state_dict(), "conv1.weight": torch.zeros(64, 3, 5, 5)}
        )


def test_missing_keys_fail_strict_and_are_reported_otherwise(source: dict, target: Trunk) -> None:
    partial = {k: v for k, v in source.items() if not k.startswith("layer4.")}
    with pytest.raises(ValueError, match="lacks trunk tensors"):
        load_trunk_weights(target, partial)
    report = load_trunk_weights(target, partial, strict=False)
    assert report.missing and all(k.startswith("layer4.") for k in report.missing)
    assert not any(k.endswith("num_batches_tracked") for k in report.missing)
    with pytest.raises(ValueError, match="lacks trunk tensors"):  # plain ResNet weights into IBN-a
        load_trunk_weights(resnet50_ibn_a(), source)


def test_ambiguous_and_foreign_checkpoints_are_errors(source: dict, target: Trunk) -> None:
    twins = {f"net_a.{k}": v for k, v in source.items()} | {f"net_b.{k}": v for k, v in source.items()}
    with pytest.raises(ValueError, match="several networks"):
        load_trunk_weights(target, twins)
    assert load_trunk_weights(target, twins, prefix="net_b.").prefix == "net_b."
    with pytest.raises(ValueError, match="no key"):
        load_trunk_weights(target, {"encoder.weight": torch.zeros(3)})
    with pytest.raises(FileNotFoundError):
        load_trunk_weights(target, "/nonexistent/weights.pth")


def test_resnet_body_keeps_torchvision_module_names() -> None:
    """Named children: checkpoints keep torchvision keys and fine-tuning code can hook ``layer2``/``layer3``."""
    trunk = resnet50()
    names = [n for n, _ in trunk.body.named_children()]
    assert names == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert F.adaptive_avg_pool2d(trunk.eval()(x), 1).shape == (1, 2048, 1, 1)
