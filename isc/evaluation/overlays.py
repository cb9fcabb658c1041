"""Pasted-image ("overlay") regions for query views: a classical detector of axis-aligned pastes.

D2LV (ISC2021 matching track winner, WangWenhao0716/ISC-Track1-Submission) trained a YOLOv5 to find images
pasted into a query (``Test/augmentation/query/yolov5``) and added each detection as a view. No trained
detector ships offline, so :func:`overlay_boxes` finds axis-aligned rectangles whose perimeter lies on
straight step edges that stop at the corners; :class:`OverlaySettings` holds its thresholds
(``evaluation.local_verification.query.overlays``), this module's own since a YOLOv5 has no classical
equivalent. ``detector: learned`` swaps in a torchvision detector trained on generated pastes
(:mod:`isc.evaluation.overlay_detector`, ``task=train_detector``); :func:`detect_overlays` picks the one
the settings name. Framework-free (numpy, PIL, OpenCV, PyTorch) so DataLoader workers can call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
from PIL import Image

from isc.evaluation.boxes import FULL_FRAME_IOU, downscaled, drop_full_frame, nms, to_original
from isc.evaluation.overlay_detector import load_overlay_detector

__all__ = ["DETECTORS", "OverlaySettings", "detect_overlays", "overlay_boxes"]

DETECTORS = ("classical", "learned")

# Fixed, not configurable (as before the split): NMS between candidate rectangles, and candidate lines
# kept per direction.
OVERLAY_NMS_IOU = 0.5
MAX_LINES = 16


@dataclass(frozen=True)
class OverlaySettings:
    """Overlay detection on a query: whether to look for pastes, and the detector's thresholds.

    The thresholds are this module's own (D2LV's detector was a trained YOLOv5, which has no classical
    equivalent), tuned on synthetic pastes; the steps named below are :func:`overlay_boxes`'s.
    """

    KEY: ClassVar[str] = "evaluation.local_verification.query.overlays"  # where errors say to look

    enabled: bool = True  # rectangular pasted regions (the seed's YOLOv5 detector; here a classical one)
    max_overlays: int = 5  # at most this many, best first
    detector: str = "classical"  # classical (below) | learned (a task=train_detector checkpoint)
    checkpoint: str | None = None  # the learned detector's checkpoint (detector=learned only)
    score_threshold: float = 0.5  # the learned detector's boxes scoring at least this
    max_side: int = 384  # the detector runs on a copy at most this long
    min_edge_fraction: float = 0.6  # step 3: share of the interior perimeter on edges
    max_extension_fraction: float = 0.5  # step 3: edges allowed on the sides' runs past the corners
    min_area_fraction: float = 0.05  # step 3: rectangle area window, as fractions of the image
    max_area_fraction: float = 0.95
    min_interior_sides: int = 3  # step 3: sides not on the image border
    edge_threshold: float = 10.0  # step 1: minimum step strength, 0..255
    step_contrast: float = 1.5  # step 1: peak over the lines two away

    def __post_init__(self) -> None:
        p = self.KEY + "."
        checks = [
            (self.max_overlays >= 0, f"{p}max_overlays must be >= 0, got {self.max_overlays}"),
            (self.max_side >= 32, f"{p}max_side must be >= 32, got {self.max_side}"),
            (
                0.0 < self.min_edge_fraction <= 1.0,
                f"{p}min_edge_fraction must be in (0, 1], got {self.min_edge_fraction}",
            ),
            (
                0.0 <= self.max_extension_fraction <= 1.0,
                f"{p}max_extension_fraction must be in [0, 1], got {self.max_extension_fraction}",
            ),
            (
                0.0 < self.min_area_fraction < self.max_area_fraction <= 1.0,
                f"{p}min_area_fraction < {p}max_area_fraction must both lie in (0, 1], got "
                f"{self.min_area_fraction}, {self.max_area_fraction}",
            ),
            (self.edge_threshold >= 0, f"{p}edge_threshold must be >= 0, got {self.edge_threshold}"),
            (self.step_contrast >= 0, f"{p}step_contrast must be >= 0, got {self.step_contrast}"),
            (
                1 <= self.min_interior_sides <= 4,
                f"{p}min_interior_sides must be in 1..4, got {self.min_interior_sides}",
            ),
        ]
        checks += [
            (
                self.detector in DETECTORS,
                f"{p}detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}",
            ),
            (
                0.0 <= self.score_threshold <= 1.0,
                f"{p}score_threshold must be in [0, 1], got {self.score_threshold}",
            ),
            (
                self.detector != "learned" or bool(self.checkpoint),
                f"{p}detector=learned needs {p}checkpoint (a task=train_detector overlay_detector.pt)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.enabled and self.detector == "learned" and self.checkpoint:
            load_overlay_detector(self.checkpoint, key=p + "checkpoint")  # a bad file fails here, not mid-run


def _ridges(diff: np.ndarray, threshold: float, contrast: float) -> np.ndarray:
    """Boolean (n, m): where the step strength ``diff`` (n, m) is an edge of its line (axis 0 = lines).

    A pasted image's border is a straight step: on its line the difference across it peaks (at least its
    neighbours', ``contrast`` times the lines two away, which the blur's spill-over does not reach) and
    exceeds ``threshold``; inside texture such peaks wander from line to line, so the test keeps borders
    and thins texture.
    """
    padded = np.pad(diff, ((2, 2), (0, 0)), mode="constant")
    return (
        (diff > threshold)
        & (diff >= padded[1:-3])
        & (diff >= padded[3:-1])
        & (diff > contrast * np.maximum(padded[:-4], padded[4:]))
    )


def _line_candidates(
    ridge: np.ndarray, min_run: int, max_lines: int, gap: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Boundary indices (1..n) of the lines holding a long edge run; ``ridge`` (n-1, m) holds line 1..n-1.

    Returns (lines to score on the merged map, where each line's border actually is), both (c,).
    Runs are searched on ``ridge`` merged with the previous line (a sub-pixel border splits over two),
    closed over small gaps and opened with a ``min_run``-long kernel so only long runs survive. Lines are
    ranked by surviving length and thinned so no two are within 2; each is located on whichever of its
    two merged lines has more edges, so a crisp border is reported where it is.
    """
    merged = ridge.copy()
    merged[1:] |= ridge[:-1]
    closed = cv2.morphologyEx(merged.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((1, 2 * gap + 1), np.uint8))
    runs = cv2.morphologyEx(closed, cv2.MORPH_OPEN, np.ones((1, max(1, min_run)), np.uint8))
    length = np.asarray(runs).sum(axis=1, dtype=np.int64)
    raw = ridge.sum(axis=1, dtype=np.int64)
    order = np.argsort(-length, kind="stable")
    chosen: list[int] = []
    for i in order:
        if length[i] < min_run or len(chosen) >= max_lines:
            break
        if all(abs(int(i) - c) > 2 for c in chosen):
            chosen.append(int(i))
    chosen.sort()
    where = [i - 1 if i > 0 and raw[i - 1] > raw[i] else i for i in chosen]
    return np.asarray(chosen, dtype=np.int64) + 1, np.asarray(where, dtype=np.int64) + 1


def _score_rectangles(
    cum_h: np.ndarray,
    cum_v: np.ndarray,
    sw: int,
    sh: int,
    y0: np.ndarray,
    y1: np.ndarray,
    x0: np.ndarray,
    x1: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per rectangle (arrays (r,)): interior sides, interior edge fraction, worst extension, ranking.

    ``cum_h`` (sh+1, sw+1) / ``cum_v`` (sw+1, sh+1) are cumulative edge counts along each horizontal /
    vertical boundary. Sides on the image border are not scored. For each end of each interior side, the
    edge fraction of the side's continuation past the corner (a tenth of the image side, after 2 px of
    blur) is measured and the largest returned: a paste's border stops at its corners, so if any side
    runs on, the rectangle is a piece of a larger structure (or of the true paste), not a paste.
    """
    inner = [y0 > 0, y1 < sh, x0 > 0, x1 < sw]  # top, bottom, left, right are interior
    n_inner = np.stack(inner).sum(axis=0, dtype=np.int64)
    bw, bh = x1 - x0, y1 - y0
    on_edge = (
        inner[0] * (cum_h[y0, x1] - cum_h[y0, x0])
        + inner[1] * (cum_h[y1, x1] - cum_h[y1, x0])
        + inner[2] * (cum_v[x0, y1] - cum_v[x0, y0])
        + inner[3] * (cum_v[x1, y1] - cum_v[x1, y0])
    )
    perimeter = (inner[0].astype(np.int64) + inner[1]) * bw + (inner[2].astype(np.int64) + inner[3]) * bh
    edge_fraction = on_edge / np.maximum(perimeter, 1)
    # Ranking counts border sides as unsupported, so a rectangle borrowing a free image-border side
    # does not outrank the four-sided one it contains.
    ranking = on_edge / (2 * (bw + bh))
    ext_x, ext_y, skip = max(2, sw // 10), max(2, sh // 10), 2
    worst: np.ndarray = np.zeros(y0.shape, dtype=np.float64)
    for side, line, cum, lo, hi, ext, limit in (
        (inner[0], y0, cum_h, x0, x1, ext_x, sw),
        (inner[1], y1, cum_h, x0, x1, ext_x, sw),
        (inner[2], x0, cum_v, y0, y1, ext_y, sh),
        (inner[3], x1, cum_v, y0, y1, ext_y, sh),
    ):
        for a, b in ((lo - skip - ext, lo - skip), (hi + skip, hi + skip + ext)):
            a, b = np.clip(a, 0, limit), np.clip(b, 0, limit)
            length = b - a
            frac = (cum[line, b] - cum[line, a]) / np.maximum(length, 1)
            # Ends too close to the border to measure (under 2 px) count as terminated.
            worst = np.maximum(worst, np.where(side & (length >= 2), frac, 0.0))
    return n_inner, edge_fraction, worst, ranking


def overlay_boxes(image: Image.Image, settings: OverlaySettings | None = None) -> np.ndarray:
    """Axis-aligned pasted-image rectangles as ``(n, 4)`` int64 boxes in the original image's pixels.

    A classical, offline stand-in for D2LV's YOLOv5 overlay detector (``Test/augmentation/query/yolov5``). A pasted image (a reference pasted
    onto a background, or something pasted over a reference) leaves straight horizontal and vertical step
    edges where it meets the host. On a copy downscaled to ``settings.max_side``:

    1. step strength across each row/column boundary (max over RGB of the absolute difference of the
       lightly blurred image, 0..255), kept where it exceeds ``edge_threshold``, is at least its
       neighbouring lines' and more than ``step_contrast`` times the lines two away (see ``_ridges``);
       a boundary also counts its neighbour's edges, since a border at a sub-pixel position splits;
    2. candidate lines: at most ``MAX_LINES`` boundaries per direction with an edge run of at least a
       tenth of the image side, plus the image borders;
    3. every rectangle on those lines (area ``min_area_fraction``..``max_area_fraction``) is scored in
       O(1) with cumulative sums: the fraction of its interior perimeter (sides not on the image border)
       on edges must reach ``min_edge_fraction``, at least ``min_interior_sides`` sides must be interior,
       and the edge fraction on the sides' extensions past the corners must stay below
       ``max_extension_fraction`` -- a paste's border ends at its corners, a horizon or a wall does not;
    4. rectangles are ranked by edge fraction of the whole perimeter (border sides count as bare, so a
       rectangle borrowing a border side does not beat the four-sided paste inside it) minus extension
       fraction, NMS'd at ``OVERLAY_NMS_IOU``, those ~equal to the whole frame (IoU > ``FULL_FRAME_IOU``)
       dropped, and at most ``max_overlays`` kept, best first.

    The defaults were tuned on random synthetic pastes of skimage.data images (colour and grey, JPEG
    or not) against crops of the unpasted images: about 88 % of pastes found at IoU > 0.7, about 2 % of
    plain images given a (false) box, typically brick walls and buildings. A trained detector will do
    better on real DISC21 queries; the 3-interior-side default gives up pastes in an image corner.
    ``settings`` defaults to :class:`OverlaySettings`'s; with ``enabled`` false no box is returned.
    """
    s = OverlaySettings() if settings is None else settings
    width, height = image.size
    if not s.enabled or s.max_overlays <= 0 or min(width, height) < 32:
        return np.zeros((0, 4), dtype=np.int64)
    small = np.asarray(cv2.GaussianBlur(downscaled(image, s.max_side).astype(np.float32), (0, 0), 0.7))
    sh, sw = small.shape[:2]
    # Boundary y (1..sh-1) lies between rows y-1 and y; boundary x likewise between columns.
    diff_h = np.abs(small[1:] - small[:-1]).max(axis=2)  # (sh-1, sw)
    diff_v = np.abs(small[:, 1:] - small[:, :-1]).max(axis=2).T  # (sw-1, sh)
    # A border at a sub-pixel position after resizing splits its step over two neighbouring boundaries,
    # and the peak then alternates between them along the line: boundary y also counts boundary y-1's.
    ridge_h = _ridges(diff_h, s.edge_threshold, s.step_contrast)
    ridge_v = _ridges(diff_v, s.edge_threshold, s.step_contrast)
    # Candidate lines plus the image borders: ``ys`` to score on, ``ys_at`` where the border lies.
    ys, ys_at = (
        np.concatenate([[0], a, [sh]]) for a in _line_candidates(ridge_h, max(3, sw // 10), MAX_LINES)
    )
    xs, xs_at = (
        np.concatenate([[0], a, [sw]]) for a in _line_candidates(ridge_v, max(3, sh // 10), MAX_LINES)
    )
    ridge_h[1:] |= ridge_h[:-1].copy()
    ridge_v[1:] |= ridge_v[:-1].copy()
    # cum_h[y, x]: edge pixels on boundary y left of x; rows 0 and sh (the borders) are zero.
    cum_h = np.zeros((sh + 1, sw + 1), dtype=np.int64)
    cum_h[1:sh, 1:] = np.cumsum(ridge_h, axis=1)
    cum_v = np.zeros((sw + 1, sh + 1), dtype=np.int64)
    cum_v[1:sw, 1:] = np.cumsum(ridge_v, axis=1)

    # Every rectangle on two horizontal and two vertical candidate lines, as line indices (r,).
    yi, yj = np.triu_indices(len(ys), k=1)
    xi, xj = np.triu_indices(len(xs), k=1)
    iy0, iy1, ix0, ix1 = (
        a.reshape(-1) for a in np.broadcast_arrays(yi[:, None], yj[:, None], xi[None, :], xj[None, :])
    )
    area = (xs_at[ix1] - xs_at[ix0]) * (ys_at[iy1] - ys_at[iy0]) / float(sw * sh)
    ok = (area >= s.min_area_fraction) & (area <= s.max_area_fraction)
    ok &= (xs_at[ix1] - xs_at[ix0] >= 3) & (ys_at[iy1] - ys_at[iy0] >= 3)
    iy0, iy1, ix0, ix1 = (a[ok] for a in (iy0, iy1, ix0, ix1))
    if iy0.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    y0, y1, x0, x1 = ys[iy0], ys[iy1], xs[ix0], xs[ix1]

    n_inner, edge_fraction, ext_fraction, ranking = _score_rectangles(cum_h, cum_v, sw, sh, y0, y1, x0, x1)

    good = (
        (n_inner >= s.min_interior_sides)
        & (edge_fraction >= s.min_edge_fraction)
        & (ext_fraction <= s.max_extension_fraction)
    )
    if not good.any():
        return np.zeros((0, 4), dtype=np.int64)
    small_boxes = np.column_stack([xs_at[ix0[good]], ys_at[iy0[good]], xs_at[ix1[good]], ys_at[iy1[good]]])
    score = (ranking - ext_fraction)[good]
    # Rank by score, ties by the deterministic box order.
    order = np.lexsort((small_boxes[:, 3], small_boxes[:, 2], small_boxes[:, 1], small_boxes[:, 0], -score))
    small_boxes, score = small_boxes[order], score[order]
    small_boxes = small_boxes[nms(small_boxes, OVERLAY_NMS_IOU, score)]
    boxes = to_original(small_boxes, sw, sh, width, height)
    boxes = drop_full_frame(boxes, width, height, FULL_FRAME_IOU)
    return boxes[: s.max_overlays].astype(np.int64)


def detect_overlays(image: Image.Image, settings: OverlaySettings | None = None) -> np.ndarray:
    """Pasted-image boxes ``(n, 4)`` int64 in ``image``'s pixels from the detector ``settings`` names:
    :func:`overlay_boxes` (``classical``) or the trained checkpoint (``learned``, loaded once per process)."""
    s = OverlaySettings() if settings is None else settings
    if s.detector == "classical" or not s.enabled:
        return overlay_boxes(image, s)
    if s.max_overlays <= 0:
        return np.zeros((0, 4), dtype=np.int64)
    detector = load_overlay_detector(str(s.checkpoint), key=s.KEY + ".checkpoint")
    return detector(image, s.score_threshold, s.max_overlays)
