"""Box arithmetic shared by the query-view detectors: IoU, greedy NMS, and the downscaled-copy round trip.

Boxes are ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive, the PIL ``Image.crop`` convention. The
detectors (:mod:`isc.evaluation.proposals`, :mod:`isc.evaluation.overlays`) run on a copy downscaled by
:func:`downscaled` and map their boxes back with :func:`to_original`. Framework-free (numpy, PIL, OpenCV).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

__all__ = ["FULL_FRAME_IOU", "box_iou", "downscaled", "drop_full_frame", "nms", "sort_boxes", "to_original"]

# A proposal or overlay this close to the whole frame repeats the original view.
FULL_FRAME_IOU = 0.9


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        if b.size == 0:
            return b.reshape(0, 4)
        raise ValueError(f"boxes must have shape (n, 4), got {b.shape}")
    return b


def _areas(b: np.ndarray) -> np.ndarray:
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``(n, m)`` of boxes ``a`` (n, 4) and ``b`` (m, 4), exclusive corners, area = w * h.

    The seed's NMS used inclusive corners (``x2 - x1 + 1``); with exclusive ``x1`` the plain difference is
    the width, so the two agree on the same pixels.
    """
    a, b = _as_boxes(a), _as_boxes(b)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    union = _areas(a)[:, None] + _areas(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, iou_threshold: float, scores: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression; returns the kept indices (int64) in the order they were kept.

    ``boxes`` is ``(n, 4)`` ``x0, y0, x1, y1`` with exclusive corners. Boxes are visited by descending
    ``scores`` (stable, so equal scores keep the input order; ``None`` means all equal, like the seed's
    all-ones scores) and a box is dropped when its IoU with a kept one is *above* ``iou_threshold`` (the
    seed keeps ``iou <= thresh``). Each step is one vectorised IoU of the kept box against the rest.
    """
    b = _as_boxes(boxes)
    n = b.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if scores is None:
        order = np.arange(n)
    else:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.shape[0] != n:
            raise ValueError(f"scores must have one value per box ({n}), got {s.shape[0]}")
        order = np.argsort(-s, kind="stable")
    areas = _areas(b)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        ix = np.clip(np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]), 0, None)
        iy = np.clip(np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]), 0, None)
        inter = ix * iy
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def sort_boxes(boxes: np.ndarray) -> np.ndarray:
    """Deterministic order: area descending, ties by x0, y0, x1, y1 ascending."""
    if boxes.shape[0] == 0:
        return boxes
    area = (boxes[:, 2] - boxes[:, 0]).astype(np.int64) * (boxes[:, 3] - boxes[:, 1]).astype(np.int64)
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -area))
    return boxes[order]


def drop_full_frame(
    boxes: np.ndarray, width: int, height: int, max_iou: float = FULL_FRAME_IOU
) -> np.ndarray:
    """``boxes`` without those whose IoU with the whole ``width`` x ``height`` frame is above ``max_iou``."""
    if boxes.shape[0] == 0:
        return boxes
    iou = box_iou(boxes, np.array([[0, 0, width, height]]))[:, 0]
    return boxes[iou <= max_iou]


def downscaled(image: Image.Image, max_side: int) -> np.ndarray:
    """RGB uint8 array ``(h, w, 3)`` with the longer side at most ``max_side`` (never upscaled)."""
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return np.ascontiguousarray(rgb)
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def to_original(boxes: np.ndarray, small_w: int, small_h: int, width: int, height: int) -> np.ndarray:
    """Map ``(n, 4)`` exclusive boxes from the downscaled copy back to original pixels, outward-rounded."""
    sx, sy = width / small_w, height / small_h
    out = np.empty((boxes.shape[0], 4), dtype=np.int64)
    out[:, 0] = np.floor(boxes[:, 0] * sx + 1e-9)
    out[:, 1] = np.floor(boxes[:, 1] * sy + 1e-9)
    out[:, 2] = np.ceil(boxes[:, 2] * sx - 1e-9)
    out[:, 3] = np.ceil(boxes[:, 3] * sy - 1e-9)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    return out
