"""An offline face detector for references: D2LV drops the reference-crop rows of references with a face.

The seed (WangWenhao0716/ISC-Track1-Submission) found faces in every reference with ``face_recognition``'s
CNN detector (``Test/final/detect_face.py:13-18``, saved as ``face_del.npy`` at :33-36) and removed every
row of the reference-crop search whose reference is one of them (``Test/final/combine.py:28-41`` applied at
:47-48; its comment: 82.8 -> 83.748). Crops of a face match other photos of faces too readily. No such
model ships offline, so this module uses one of OpenCV's packaged frontal-face Haar cascades
(``cv2.data.haarcascades``, from the ``opencv-contrib-python-headless`` wheel): ``alt``, which found 99 of
skimage's 100 LFW faces and flagged 6 of 500 Caltech photos, where ``default`` flagged 17 (docs/inference.md). Framework-free (numpy,
PIL, OpenCV) so DataLoader workers can call it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
from PIL import Image

__all__ = ["CASCADE", "CASCADES", "FaceSettings", "detect_faces"]

CASCADE = "haarcascade_frontalface_alt.xml"  # measured against default, alt2 and alt_tree: docs/inference.md
CASCADES = (
    "haarcascade_frontalface_alt.xml",
    "haarcascade_frontalface_alt2.xml",
    "haarcascade_frontalface_alt_tree.xml",
    "haarcascade_frontalface_default.xml",
)


@dataclass(frozen=True)
class FaceSettings:
    """Whether reference-crop rows of references with a face are dropped, and the detector's parameters.

    ``scale_factor``, ``min_neighbors`` and ``min_size`` are ``CascadeClassifier.detectMultiScale``'s
    ``scaleFactor``, ``minNeighbors`` and ``minSize`` (square, pixels), OpenCV's customary 1.1 / 5 / 30.
    """

    KEY: ClassVar[str] = "evaluation.local_verification.reference_faces"  # where errors say to look

    enabled: bool = False  # drop the crop-search rows of references with a face (combine.py:47-48)
    cascade: str = CASCADE
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 30

    def __post_init__(self) -> None:
        p = self.KEY + "."
        checks = [
            (
                self.cascade in CASCADES,
                f"{p}cascade must be one of {', '.join(CASCADES)}, got {self.cascade!r}",
            ),
            (self.scale_factor > 1.0, f"{p}scale_factor must be > 1, got {self.scale_factor}"),
            (self.min_neighbors >= 0, f"{p}min_neighbors must be >= 0, got {self.min_neighbors}"),
            (self.min_size >= 1, f"{p}min_size must be >= 1, got {self.min_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@functools.lru_cache(maxsize=len(CASCADES))
def _cascade(name: str) -> cv2.CascadeClassifier:
    """A packaged cascade, loaded once per process (each DataLoader worker loads its own)."""
    path = cv2.data.haarcascades + name  # type: ignore[attr-defined]  # cv2/data/__init__.py
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load its face cascade {path}")
    return cascade


def detect_faces(image: Image.Image, settings: FaceSettings | None = None) -> np.ndarray:
    """Faces in ``image`` as ``(n, 4)`` int64 boxes ``x0, y0, x1, y1`` (exclusive), in detection order.

    Runs on the greyscale image at full resolution, whatever ``settings.enabled`` says (the caller decides
    whether to look).
    """
    s = FaceSettings() if settings is None else settings
    cv2.setNumThreads(1)  # one image at a time, next to other DataLoader workers: no pool of its own
    grey = np.asarray(image.convert("L"))
    found = _cascade(s.cascade).detectMultiScale(
        grey,
        scaleFactor=float(s.scale_factor),
        minNeighbors=int(s.min_neighbors),
        minSize=(int(s.min_size), int(s.min_size)),
    )
    rects = np.asarray(found, dtype=np.int64).reshape(-1, 4)  # x, y, w, h
    return np.column_stack([rects[:, :2], rects[:, :2] + rects[:, 2:]]).astype(np.int64)
