"""Reading checkpoints of every layout users hold and loading a trunk's weights from them.

:func:`load_trunk_weights` finds the key prefix by itself (``module.``, ``online_network.``,
``state_dict.backbone.trunk.body.``, ...) or takes it from the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "KeyMap",
    "LoadReport",
    "WeightTarget",
    "load_state_dict_file",
    "load_trunk_weights",
    "read_checkpoint",
]

KeyMap = Callable[[str], str | None]
"""Renames one checkpoint key (prefix already stripped) to the trunk's naming, or ``None`` to skip it."""


class WeightTarget(Protocol):
    """What a network must tell the loader (:class:`isc.models.trunks.Trunk` does): no import of trunks here.

    ``weights_root`` names the submodule whose keys follow the source library's naming; ``key_maps`` are
    other namings of the same weights to try.
    """

    weights_root: str
    key_maps: tuple[KeyMap, ...]

    def get_submodule(self, target: str) -> nn.Module: ...


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
    trunk: WeightTarget,
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
