"""How well an overlay detector finds pastes: recall at an IoU and how often it fires on plain photos.

The two figures the docs quote for the classical detector (86-91 % of pastes found at IoU > 0.7, a box on
2-3 % of plain photos), computed the same way for any detector ``image -> (n, 4) boxes`` so the classical
and the learned one can be compared side by side on the same held-out images. A paste counts as found
when any returned box overlaps its true rectangle with IoU *above* ``iou``; a plain image counts as a
false fire when any box is returned. Framework-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from isc.data.images import load_image
from isc.evaluation.boxes import box_iou
from isc.evaluation.overlay_detector import PasteSample

__all__ = ["DetectionRates", "compare_overlay_detectors", "detection_rates", "paste_found"]

Detect = Callable[[Image.Image], np.ndarray]


@dataclass(frozen=True)
class DetectionRates:
    """One detector's figures: pastes found of pasted images, and plain images given a box."""

    found: int
    n_pasted: int
    fired: int
    n_plain: int
    seconds_per_image: float

    @property
    def recall(self) -> float:
        return self.found / self.n_pasted if self.n_pasted else float("nan")

    @property
    def false_fire_rate(self) -> float:
        return self.fired / self.n_plain if self.n_plain else float("nan")

    def summary(self) -> dict[str, float | int]:
        return {**asdict(self), "recall": self.recall, "false_fire_rate": self.false_fire_rate}


def paste_found(boxes: np.ndarray, truth: Sequence[float], iou: float = 0.7) -> bool:
    """Whether any of ``boxes`` (n, 4) overlaps the true box with IoU above ``iou``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return False
    return bool(box_iou(boxes, np.asarray([truth], dtype=np.float64)).max() > iou)


def detection_rates(
    detect: Detect, samples: Sequence[PasteSample], iou: float = 0.7, progress: bool = False, desc: str = ""
) -> DetectionRates:
    """Run ``detect`` on every sample: pasted ones (``box`` set) count towards recall, plain ones towards
    the false-fire rate."""
    found = fired = n_pasted = n_plain = 0
    seconds = 0.0
    for sample in tqdm(samples, desc=desc or "overlay detection", unit="image", disable=not progress):
        image = load_image(sample.path)
        start = time.perf_counter()
        boxes = np.asarray(detect(image)).reshape(-1, 4)
        seconds += time.perf_counter() - start
        if sample.box is None:
            n_plain += 1
            fired += int(len(boxes) > 0)
        else:
            n_pasted += 1
            found += int(paste_found(boxes, sample.box, iou))
    return DetectionRates(found, n_pasted, fired, n_plain, seconds / max(1, len(samples)))


def compare_overlay_detectors(
    detectors: Mapping[str, Detect], samples: Sequence[PasteSample], iou: float = 0.7, progress: bool = True
) -> dict[str, DetectionRates]:
    """:func:`detection_rates` of each named detector on the same samples."""
    return {
        name: detection_rates(detect, samples, iou, progress, f"overlays: {name}")
        for name, detect in detectors.items()
    }
