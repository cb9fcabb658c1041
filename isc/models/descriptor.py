"""The descriptor model, and the one file format that carries it from training to evaluation and submission.

A descriptor model is ``input normalisation -> trunk -> pooling -> (linear projection | fine-tuning head)
-> L2 norm``: (B, 3, H, W) in [0, 1] -> (B, D) unit vectors, plus the square input size it is evaluated
at. What training saves is what evaluation loads: :meth:`DescriptorModel.spec` records everything needed to
rebuild the network without weights (trunk architecture, pooling, head, input size), and

- :func:`save_descriptor_model` writes a self-contained file (``task=export``): spec + weights;
- :func:`load_descriptor_model` reads that file *or* a Lightning checkpoint written by this project's
  training modules (they store the spec under ``checkpoint["descriptor_model"]``), without Lightning or
  Hydra, so a notebook or a submission script needs only ``isc``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from isc.models import trunks
from isc.models.heads import BNNeckHead, ProjectionHead
from isc.models.pooling import AvgPool, GeM
from isc.models.trunks import Trunk

__all__ = [
    "CHECKPOINT_KEY",
    "FILE_FORMAT",
    "DescriptorModel",
    "build_descriptor_model",
    "load_descriptor_model",
    "save_descriptor_model",
]

log = logging.getLogger(__name__)

FILE_FORMAT = "isc-descriptor-model"
FILE_VERSION = 1
CHECKPOINT_KEY = "descriptor_model"
"""Entry of a Lightning checkpoint holding ``{"spec": ..., "prefixes": {model prefix: checkpoint prefix}}``."""

_TRUNK_FACTORIES = ("resnet50", "resnet152", "resnet50_ibn_a", "efficientnet_lite0")


class DescriptorModel(nn.Module):
    """Trunk + pooling + optional projection or head + L2 norm: (B, 3, H, W) in [0, 1] -> (B, D).

    Input normalisation happens inside the model (from the trunk's statistics), so callers feed plain
    [0, 1] tensors whatever the backbone. ``head`` is a fine-tuning head with a ``descriptor(pooled)``
    method (:class:`isc.models.heads.BNNeckHead`, :class:`isc.models.heads.ProjectionHead`); ``dim`` adds
    a plain linear projection instead. ``normalize=False`` returns the output before any L2 norm: the raw
    pooled features, which is what self-supervised pretraining feeds its projector, or the head's
    ``raw_descriptor`` (what D2LV's test code whitens). ``image_size`` is the square input size the model is
    evaluated at (``None``: the caller's choice).
    """

    def __init__(
        self,
        trunk: Trunk,
        pooling: nn.Module | None = None,
        dim: int | None = None,
        normalize: bool = True,
        head: nn.Module | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if dim and head is not None:
            raise ValueError("give either a linear projection (dim) or a head, not both")
        self.trunk = trunk
        self.pooling = pooling if pooling is not None else GeM()
        self.projection = nn.Linear(trunk.out_channels, dim) if dim else None
        self.head = head
        self.normalize = normalize
        self.image_size = image_size
        if head is not None:
            self.dim = int(getattr(head, "descriptor_dim"))  # noqa: B009 - heads declare it as a property
        else:
            self.dim = dim or trunk.out_channels
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(trunk.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(trunk.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pooling(self.trunk((images - self.mean) / self.std))
        if self.head is not None and self.normalize:
            x = self.head.descriptor(x)  # type: ignore[operator]
        elif self.head is not None:  # the head's output before its own L2 norm
            x = self.head.raw_descriptor(x)  # type: ignore[operator]
        elif self.projection is not None:
            x = self.projection(x)
        return F.normalize(x, dim=-1) if self.normalize else x

    def spec(self) -> dict[str, Any]:
        """Plain-data description that :func:`build_descriptor_model` turns back into this architecture."""
        if not self.trunk.architecture:
            raise ValueError(
                "this trunk does not record its architecture (build it with an isc.models.trunks factory)"
            )
        return {
            "trunk": dict(self.trunk.architecture),
            "pooling": _pooling_spec(self.pooling),
            "projection_dim": self.projection.out_features if self.projection is not None else None,
            "head": _head_spec(self.head),
            "normalize": self.normalize,
            "image_size": self.image_size,
            "descriptor_dim": self.dim,
            "mean": list(self.trunk.mean),
            "std": list(self.trunk.std),
        }

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the descriptor needs (a training-only classifier is left out), on the CPU."""
        return {
            k: v.detach().cpu().clone()
            for k, v in self.state_dict().items()
            if not k.startswith("head.classifier.")
        }


def _pooling_spec(pooling: nn.Module) -> dict[str, Any]:
    if isinstance(pooling, GeM):
        return {"type": "GeM", "eps": pooling.eps}
    if isinstance(pooling, AvgPool):
        return {"type": "AvgPool"}
    raise TypeError(f"cannot record pooling {type(pooling).__name__} in a descriptor file")


def _head_spec(head: nn.Module | None) -> dict[str, Any] | None:
    if head is None:
        return None
    if isinstance(head, BNNeckHead):
        return {
            "type": "BNNeckHead",
            "in_dim": head.in_dim,
            "hidden_dims": list(head.hidden_dims),
            "out_dim": head.out_dim,
            "negative_slope": head.negative_slope,
        }
    if isinstance(head, ProjectionHead):
        return {
            "type": "ProjectionHead",
            "in_dim": head.in_dim,
            "out_dim": head.out_dim,
            "batch_norm": head.bn is not None,
        }
    raise TypeError(f"cannot record head {type(head).__name__} in a descriptor file")


def build_descriptor_model(spec: Mapping[str, Any]) -> DescriptorModel:
    """An untrained :class:`DescriptorModel` of the architecture ``spec`` describes (no weights loaded)."""
    arch = dict(spec["trunk"])
    factory = arch.pop("factory", None)
    if factory not in _TRUNK_FACTORIES:
        raise ValueError(
            f"unknown trunk {factory!r} in descriptor spec (known: {', '.join(_TRUNK_FACTORIES)})"
        )
    trunk_logger = logging.getLogger(trunks.__name__)
    level = trunk_logger.level
    trunk_logger.setLevel(logging.WARNING)  # "random weights" would be misleading: weights follow
    try:
        trunk: Trunk = getattr(trunks, factory)(**arch)
    finally:
        trunk_logger.setLevel(level)
    pool = spec["pooling"]
    pooling: nn.Module = GeM(eps=pool.get("eps", 1e-6)) if pool["type"] == "GeM" else AvgPool()
    head: nn.Module | None = None
    h = spec.get("head")
    if h is not None:
        kwargs = {k: v for k, v in h.items() if k != "type"}
        if h["type"] == "BNNeckHead":
            head = BNNeckHead(**kwargs)
        elif h["type"] == "ProjectionHead":
            head = ProjectionHead(**kwargs)
        else:
            raise ValueError(f"unknown head {h['type']!r} in descriptor spec")
    return DescriptorModel(
        trunk,
        pooling,
        dim=spec.get("projection_dim"),
        normalize=bool(spec.get("normalize", True)),
        head=head,
        image_size=spec.get("image_size"),
    )


def save_descriptor_model(model: DescriptorModel, path: str | Path) -> Path:
    """Write ``model`` as one self-contained file (spec + weights), atomically; returns the path."""
    from isc.formats.files import atomic_write

    payload = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "spec": model.spec(),
        "state_dict": model.export_state_dict(),
    }
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_descriptor_model(path: str | Path, map_location: str | torch.device = "cpu") -> DescriptorModel:
    """The descriptor model of an exported file (``task=export``) or of a training checkpoint, in eval mode.

    Only tensors and plain containers are unpickled (``weights_only``). Every weight of the rebuilt
    model must be in the file (strict), so a wrong or truncated file is an error, never a random layer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: expected a descriptor model file or a checkpoint, found {type(obj).__name__}"
        )
    if obj.get("format") == FILE_FORMAT:
        if int(obj.get("version", 0)) > FILE_VERSION:
            raise ValueError(
                f"{path}: descriptor file version {obj['version']} is newer than this code reads"
            )
        spec, state = obj["spec"], dict(obj["state_dict"])
    elif CHECKPOINT_KEY in obj and "state_dict" in obj:
        entry = obj[CHECKPOINT_KEY]
        spec = entry["spec"]
        state = {}
        for key, value in obj["state_dict"].items():
            for mine, theirs in entry["prefixes"].items():
                if key.startswith(theirs):
                    state[mine + key[len(theirs) :]] = value
        state = {k: v for k, v in state.items() if not k.startswith("head.classifier.")}
    else:
        raise ValueError(
            f"{path}: neither a descriptor model file (task=export) nor a checkpoint of this project's "
            "training (no 'descriptor_model' entry); to start a backbone from other weights use "
            "backbone.trunk.weights=<file>"
        )
    model = build_descriptor_model(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the recorded architecture "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    log.info(
        "loaded %s: %s trunk, %d-d descriptor, %s px",
        path,
        spec["trunk"]["factory"],
        model.dim,
        model.image_size,
    )
    return model.eval()
