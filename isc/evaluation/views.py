"""Test-time view geometry of D2LV's "local verification": query and reference expansion.

D2LV (ISC2021 matching track winner, WangWenhao0716/ISC-Track1-Submission) describes every query by
several views and every reference by 19 crops, then matches view against view so a copy that shows only
part of a reference (or a reference pasted into a larger picture) still meets a view of the same extent.
This module only says *which* boxes and rotations to look at; describing and matching them is elsewhere.

Query views, in order (the seed's file suffixes in brackets):

- the original (``_0``);
- rotations by 90, 180, 270 degrees counter-clockwise (``_1``.. ``_3``, ``Test/augmentation/query/rotate.py``);
- five crops: the centre half and four overlapping thirds (``_4``.. ``_8``,
  ``Test/augmentation/query/center.py``);
- selective-search proposals (``_10``.., ``Test/augmentation/query/selective_search_nms.py``), here with
  OpenCV's implementation on a downscaled copy instead of the ``selectivesearch`` package;
- pasted-image ("overlay") regions: D2LV trained a YOLOv5 to find them; here a classical, offline detector
  of axis-aligned rectangles whose perimeter lies on step edges.

Views whose shorter side is under ``min_size`` pixels are dropped, except the original
(``Test/final/generate_100_150_200.py`` lists the 100/150/200-px views the seed discarded).

Reference views: the whole image, the 2x2 grid, the centre, the 3x3 grid and the four overlapping
crops, 19 in all (``Test/augmentation/reference/dividing.py``).

Boxes are ``(x0, y0, x1, y1)`` in the original image's pixels with ``x1``/``y1`` exclusive, the PIL
``Image.crop`` convention. Framework-free on purpose (numpy, PIL, OpenCV) so DataLoader workers can call
it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_MIN_AREA_FRACTION",
    "FULL_FRAME_IOU",
    "QueryExpansion",
    "View",
    "ViewKind",
    "apply_view",
    "box_iou",
    "five_crops",
    "nms",
    "overlay_boxes",
    "query_views",
    "reference_crop_boxes",
    "reference_views",
    "selective_search_boxes",
]

ViewKind = Literal["original", "rotation", "crop", "proposal", "overlay", "reference_crop"]
Box = tuple[int, int, int, int]

ROTATIONS = (0, 90, 180, 270)
_TRANSPOSE = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}

# The seed dropped selective-search regions under 2000 pixels on DISC21 queries, whose longer side is
# 640 px (typically 640x480): 2000 / (640 * 480) ~ 0.0065 of the image, kept as a fraction so the filter
# means the same on any resolution.
DEFAULT_MIN_AREA_FRACTION = 2000 / (640 * 480)
# A proposal or overlay this close to the whole frame repeats the original view.
FULL_FRAME_IOU = 0.9


@dataclass(frozen=True)
class View:
    """One view of an image: crop ``box`` of the original, then rotate by ``rotation`` degrees.

    ``rotation`` is counter-clockwise, as ``PIL.Image.transpose(ROTATE_90)`` and ``np.rot90`` turn.
    """

    kind: ViewKind
    box: Box  # x0, y0, x1, y1 in the ORIGINAL image's pixels, x1/y1 exclusive
    rotation: int = 0  # 0, 90, 180, 270 degrees counter-clockwise

    def __post_init__(self) -> None:
        if self.kind not in get_args(ViewKind):
            raise ValueError(f"View.kind must be one of {get_args(ViewKind)}, got {self.kind!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"View.rotation must be one of {ROTATIONS}, got {self.rotation}")
        if len(self.box) != 4:
            raise ValueError(f"View.box must be (x0, y0, x1, y1), got {self.box}")
        x0, y0, x1, y1 = self.box
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"View.box must be non-empty with x1 > x0 and y1 > y0, got {self.box}")

    @property
    def width(self) -> int:
        """Width of the view after rotation."""
        w, h = self.box[2] - self.box[0], self.box[3] - self.box[1]
        return h if self.rotation in (90, 270) else w

    @property
    def height(self) -> int:
        """Height of the view after rotation."""
        w, h = self.box[2] - self.box[0], self.box[3] - self.box[1]
        return w if self.rotation in (90, 270) else h


@dataclass(frozen=True)
class QueryExpansion:
    """Which views a query expands to, and the detectors' thresholds; every family can be switched off.

    Defaults mirror the seed where it has a value (see the module docstring for the files):
    proposals use Felzenszwalb ``k=500, sigma=0.9`` (``selectivesearch`` ``scale=500, sigma=0.9``),
    aspect limit 2, NMS IoU 0.5, minimum region 2000 px on ~640x480 images (as a fraction, see
    ``DEFAULT_MIN_AREA_FRACTION``). ``max_proposals`` caps the seed's "fewer than 90" per query for speed;
    ``proposal_max_side`` is the downscaled size selective search runs at. Overlay thresholds are this
    module's own (D2LV's detector was a trained YOLOv5, which has no classical equivalent).
    """

    rotations: bool = True
    crops: bool = True
    proposals: bool = True
    overlays: bool = True
    min_size: int = 100
    max_proposals: int = 40
    proposal_max_side: int = 320
    proposal_min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION
    proposal_max_aspect: float = 2.0
    proposal_nms_iou: float = 0.5
    proposal_k: int = 500
    proposal_sigma: float = 0.9
    max_overlays: int = 5
    overlay_max_side: int = 384
    overlay_min_edge_fraction: float = 0.6
    overlay_max_extension_fraction: float = 0.5
    overlay_min_area_fraction: float = 0.05
    overlay_max_area_fraction: float = 0.95
    overlay_min_interior_sides: int = 3
    overlay_edge_threshold: float = 10.0
    overlay_step_contrast: float = 1.5

    def __post_init__(self) -> None:
        p = "evaluation.local_verification.query."
        checks = [
            (self.min_size >= 0, f"{p}min_size must be >= 0, got {self.min_size}"),
            (self.max_proposals >= 0, f"{p}max_proposals must be >= 0, got {self.max_proposals}"),
            (
                self.proposal_max_side >= 16,
                f"{p}proposal_max_side must be >= 16, got {self.proposal_max_side}",
            ),
            (
                0.0 <= self.proposal_min_area_fraction < 1.0,
                f"{p}proposal_min_area_fraction must be in [0, 1), got {self.proposal_min_area_fraction}",
            ),
            (
                self.proposal_max_aspect >= 1.0,
                f"{p}proposal_max_aspect must be >= 1, got {self.proposal_max_aspect}",
            ),
            (
                0.0 < self.proposal_nms_iou <= 1.0,
                f"{p}proposal_nms_iou must be in (0, 1], got {self.proposal_nms_iou}",
            ),
            (self.proposal_k > 0, f"{p}proposal_k must be > 0, got {self.proposal_k}"),
            (self.proposal_sigma > 0, f"{p}proposal_sigma must be > 0, got {self.proposal_sigma}"),
            (self.max_overlays >= 0, f"{p}max_overlays must be >= 0, got {self.max_overlays}"),
            (self.overlay_max_side >= 32, f"{p}overlay_max_side must be >= 32, got {self.overlay_max_side}"),
            (
                0.0 < self.overlay_min_edge_fraction <= 1.0,
                f"{p}overlay_min_edge_fraction must be in (0, 1], got {self.overlay_min_edge_fraction}",
            ),
            (
                0.0 <= self.overlay_max_extension_fraction <= 1.0,
                f"{p}overlay_max_extension_fraction must be in [0, 1], got {self.overlay_max_extension_fraction}",
            ),
            (
                0.0 < self.overlay_min_area_fraction < self.overlay_max_area_fraction <= 1.0,
                f"{p}overlay_min_area_fraction < overlay_max_area_fraction must both lie in (0, 1], got "
                f"{self.overlay_min_area_fraction}, {self.overlay_max_area_fraction}",
            ),
            (
                self.overlay_edge_threshold >= 0,
                f"{p}overlay_edge_threshold must be >= 0, got {self.overlay_edge_threshold}",
            ),
            (
                self.overlay_step_contrast >= 0,
                f"{p}overlay_step_contrast must be >= 0, got {self.overlay_step_contrast}",
            ),
            (
                1 <= self.overlay_min_interior_sides <= 4,
                f"{p}overlay_min_interior_sides must be in 1..4, got {self.overlay_min_interior_sides}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QueryExpansion:
        """Parse the ``evaluation.query_expansion`` config; an unknown key is an error naming the valid ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                "unknown key(s) "
                + ", ".join(f"evaluation.local_verification.query.{k}" for k in unknown)
                + "; valid keys: "
                + ", ".join(f"evaluation.local_verification.query.{k}" for k in known)
            )
        return cls(**dict(values))


# --------------------------------------------------------------------------------------------------
# Fixed crops (seed: center.py and dividing.py)
# --------------------------------------------------------------------------------------------------


def _check_size(width: int, height: int, what: str) -> None:
    if width < 3 or height < 3:
        raise ValueError(
            f"{what} needs an image of at least 3x3 pixels so no crop is empty, got {width}x{height}"
        )


def _frac(size: int, num: int, den: int) -> int:
    """``int(size * num / den)`` evaluated as the seed does (``size * num`` first, then true division)."""
    return int(size * num / den)


def _overlapping_four(width: int, height: int) -> list[Box]:
    """The four overlapping crops spanning 1/6..3/6 and 3/6..5/6 of each side, row-major."""
    a, b, c = (_frac(width, n, 6) for n in (1, 3, 5))
    d, e, f = (_frac(height, n, 6) for n in (1, 3, 5))
    return [(a, d, b, e), (b, d, c, e), (a, e, b, f), (b, e, c, f)]


def _centre(width: int, height: int) -> Box:
    return (int(width * 0.25), int(height * 0.25), int(width * 0.75), int(height * 0.75))


def five_crops(width: int, height: int) -> list[Box]:
    """The seed's five query crops (``Test/augmentation/query/center.py``, views ``_4``.. ``_8``).

    The centre half, then the four overlapping crops (1/6..3/6, 3/6..5/6 of each side) in row-major order;
    coordinates are ``int(size * fraction)`` like the seed's. Needs width, height >= 3.
    """
    _check_size(width, height, "five_crops")
    return [_centre(width, height), *_overlapping_four(width, height)]


def _grid(width: int, height: int, xs: list[int], ys: list[int]) -> list[Box]:
    return [(xs[j], ys[i], xs[j + 1], ys[i + 1]) for i in range(len(ys) - 1) for j in range(len(xs) - 1)]


def reference_crop_boxes(width: int, height: int) -> list[Box]:
    """The seed's 19 reference crops (``Test/augmentation/reference/dividing.py``), index 0 the whole image.

    1-4: the 2x2 grid (cuts at ``size // 2``), 5: the centre half, 6-14: the 3x3 grid (cuts at
    ``int(size * 1/3)``, ``int(size * 2/3)``), 15-18: the four overlapping crops of :func:`five_crops`;
    grids are row-major. Needs width, height >= 3.
    """
    _check_size(width, height, "reference_crop_boxes")
    boxes: list[Box] = [(0, 0, width, height)]
    boxes += _grid(width, height, [0, width // 2, width], [0, height // 2, height])
    boxes.append(_centre(width, height))
    thirds_x = [0, _frac(width, 1, 3), _frac(width, 2, 3), width]
    thirds_y = [0, _frac(height, 1, 3), _frac(height, 2, 3), height]
    boxes += _grid(width, height, thirds_x, thirds_y)
    boxes += _overlapping_four(width, height)
    return boxes


# --------------------------------------------------------------------------------------------------
# Box utilities
# --------------------------------------------------------------------------------------------------


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


def _sort_boxes(boxes: np.ndarray) -> np.ndarray:
    """Deterministic order: area descending, ties by x0, y0, x1, y1 ascending."""
    if boxes.shape[0] == 0:
        return boxes
    area = (boxes[:, 2] - boxes[:, 0]).astype(np.int64) * (boxes[:, 3] - boxes[:, 1]).astype(np.int64)
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -area))
    return boxes[order]


def _drop_full_frame(
    boxes: np.ndarray, width: int, height: int, max_iou: float = FULL_FRAME_IOU
) -> np.ndarray:
    if boxes.shape[0] == 0:
        return boxes
    iou = box_iou(boxes, np.array([[0, 0, width, height]]))[:, 0]
    return boxes[iou <= max_iou]


def _downscaled(image: Image.Image, max_side: int) -> np.ndarray:
    """RGB uint8 array ``(h, w, 3)`` with the longer side at most ``max_side`` (never upscaled)."""
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return np.ascontiguousarray(rgb)
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _to_original(boxes: np.ndarray, small_w: int, small_h: int, width: int, height: int) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------------
# Selective search proposals (seed: selective_search_nms.py)
# --------------------------------------------------------------------------------------------------


def selective_search_boxes(
    image: Image.Image,
    *,
    max_side: int = 320,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    max_aspect: float = 2.0,
    nms_iou: float = 0.5,
    max_proposals: int = 40,
    k: int = 500,
    sigma: float = 0.9,
    full_frame_iou: float = FULL_FRAME_IOU,
) -> np.ndarray:
    """Selective-search region proposals as ``(n, 4)`` int64 boxes in the original image's pixels.

    Mirrors ``Test/augmentation/query/selective_search_nms.py`` with OpenCV's single-strategy selective
    search (Felzenszwalb ``k``/``sigma`` as the seed's ``scale=500, sigma=0.9``; OpenCV's segmentation
    fixes its own ``min_size``, the seed's was 10) on a copy downscaled to ``max_side`` for speed. Then,
    as in the seed: duplicate rects dropped, rects smaller than ``min_area_fraction`` of the image dropped
    (the seed measured the segment's pixel count, OpenCV only gives rects so the rect area is used), rects
    with ``w / h`` or ``h / w`` above ``max_aspect`` dropped, then NMS at ``nms_iou`` with equal scores.
    Rects with IoU above ``full_frame_iou`` with the whole frame are dropped too (the original is already a
    view). NMS visits boxes by area descending (ties by coordinates), so the kept boxes -- at most
    ``max_proposals``, the largest -- come out in that order and the result is deterministic.
    ``cv2.setNumThreads(1)`` keeps it deterministic and off other DataLoader workers' cores.
    """
    width, height = image.size
    if max_proposals <= 0 or width < 2 or height < 2:
        return np.zeros((0, 4), dtype=np.int64)
    cv2.setNumThreads(1)
    small = _downscaled(image, max_side)
    sh, sw = small.shape[:2]
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    search.switchToSingleStrategy(int(k), float(sigma))
    rects = np.asarray(search.process(), dtype=np.int64).reshape(-1, 4)  # x, y, w, h in the small copy
    if rects.shape[0] == 0:
        return np.zeros((0, 4), dtype=np.int64)
    small_boxes = np.column_stack(
        [rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2], rects[:, 1] + rects[:, 3]]
    )
    boxes = np.unique(_to_original(small_boxes, sw, sh, width, height), axis=0)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ok = (bw > 0) & (bh > 0)
    ok &= bw * bh >= min_area_fraction * width * height
    ok &= (bw <= max_aspect * bh) & (bh <= max_aspect * bw)
    boxes = _drop_full_frame(_sort_boxes(boxes[ok]), width, height, full_frame_iou)
    kept = boxes[nms(boxes, nms_iou)]
    return kept[:max_proposals].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Pasted-region ("overlay") detection
# --------------------------------------------------------------------------------------------------


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


def overlay_boxes(
    image: Image.Image,
    *,
    max_overlays: int = 5,
    max_side: int = 384,
    min_edge_fraction: float = 0.6,
    max_extension_fraction: float = 0.5,
    min_area_fraction: float = 0.05,
    max_area_fraction: float = 0.95,
    min_interior_sides: int = 3,
    edge_threshold: float = 10.0,
    step_contrast: float = 1.5,
    nms_iou: float = 0.5,
    max_lines: int = 16,
    full_frame_iou: float = FULL_FRAME_IOU,
) -> np.ndarray:
    """Axis-aligned pasted-image rectangles as ``(n, 4)`` int64 boxes in the original image's pixels.

    A classical, offline stand-in for D2LV's YOLOv5 overlay detector (``Test/augmentation/query/yolov5``). A pasted image (a reference pasted
    onto a background, or something pasted over a reference) leaves straight horizontal and vertical step
    edges where it meets the host. On a copy downscaled to ``max_side``:

    1. step strength across each row/column boundary (max over RGB of the absolute difference of the
       lightly blurred image, 0..255), kept where it exceeds ``edge_threshold``, is at least its
       neighbouring lines' and more than ``step_contrast`` times the lines two away (see ``_ridges``);
       a boundary also counts its neighbour's edges, since a border at a sub-pixel position splits;
    2. candidate lines: at most ``max_lines`` boundaries per direction with an edge run of at least a
       tenth of the image side, plus the image borders;
    3. every rectangle on those lines (area ``min_area_fraction``..``max_area_fraction``) is scored in
       O(1) with cumulative sums: the fraction of its interior perimeter (sides not on the image border)
       on edges must reach ``min_edge_fraction``, at least ``min_interior_sides`` sides must be interior,
       and the edge fraction on the sides' extensions past the corners must stay below
       ``max_extension_fraction`` -- a paste's border ends at its corners, a horizon or a wall does not;
    4. rectangles are ranked by edge fraction of the whole perimeter (border sides count as bare, so a
       rectangle borrowing a border side does not beat the four-sided paste inside it) minus extension
       fraction, NMS'd at ``nms_iou``, those ~equal to the whole frame (IoU > ``full_frame_iou``)
       dropped, and at most ``max_overlays`` kept, best first.

    The defaults were tuned on random synthetic pastes of skimage.data images (colour and grey, JPEG
    or not) against crops of the unpasted images: about 88 % of pastes found at IoU > 0.7, about 2 % of
    plain images given a (false) box, typically brick walls and buildings. A trained detector will do
    better on real DISC21 queries; the 3-interior-side default gives up pastes in an image corner.
    """
    width, height = image.size
    if max_overlays <= 0 or min(width, height) < 32:
        return np.zeros((0, 4), dtype=np.int64)
    small = np.asarray(cv2.GaussianBlur(_downscaled(image, max_side).astype(np.float32), (0, 0), 0.7))
    sh, sw = small.shape[:2]
    # Boundary y (1..sh-1) lies between rows y-1 and y; boundary x likewise between columns.
    diff_h = np.abs(small[1:] - small[:-1]).max(axis=2)  # (sh-1, sw)
    diff_v = np.abs(small[:, 1:] - small[:, :-1]).max(axis=2).T  # (sw-1, sh)
    # A border at a sub-pixel position after resizing splits its step over two neighbouring boundaries,
    # and the peak then alternates between them along the line: boundary y also counts boundary y-1's.
    ridge_h = _ridges(diff_h, edge_threshold, step_contrast)
    ridge_v = _ridges(diff_v, edge_threshold, step_contrast)
    # Candidate lines plus the image borders: ``ys`` to score on, ``ys_at`` where the border lies.
    ys, ys_at = (
        np.concatenate([[0], a, [sh]]) for a in _line_candidates(ridge_h, max(3, sw // 10), max_lines)
    )
    xs, xs_at = (
        np.concatenate([[0], a, [sw]]) for a in _line_candidates(ridge_v, max(3, sh // 10), max_lines)
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
    ok = (area >= min_area_fraction) & (area <= max_area_fraction)
    ok &= (xs_at[ix1] - xs_at[ix0] >= 3) & (ys_at[iy1] - ys_at[iy0] >= 3)
    iy0, iy1, ix0, ix1 = (a[ok] for a in (iy0, iy1, ix0, ix1))
    if iy0.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    y0, y1, x0, x1 = ys[iy0], ys[iy1], xs[ix0], xs[ix1]

    n_inner, edge_fraction, ext_fraction, ranking = _score_rectangles(cum_h, cum_v, sw, sh, y0, y1, x0, x1)

    good = (
        (n_inner >= min_interior_sides)
        & (edge_fraction >= min_edge_fraction)
        & (ext_fraction <= max_extension_fraction)
    )
    if not good.any():
        return np.zeros((0, 4), dtype=np.int64)
    small_boxes = np.column_stack([xs_at[ix0[good]], ys_at[iy0[good]], xs_at[ix1[good]], ys_at[iy1[good]]])
    score = (ranking - ext_fraction)[good]
    # Rank by score, ties by the deterministic box order.
    order = np.lexsort((small_boxes[:, 3], small_boxes[:, 2], small_boxes[:, 1], small_boxes[:, 0], -score))
    small_boxes, score = small_boxes[order], score[order]
    small_boxes = small_boxes[nms(small_boxes, nms_iou, score)]
    boxes = _to_original(small_boxes, sw, sh, width, height)
    boxes = _drop_full_frame(boxes, width, height, full_frame_iou)
    return boxes[:max_overlays].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------


def query_views(image: Image.Image, expansion: QueryExpansion) -> list[View]:
    """The views one query expands to: the original first, then rotations, crops, proposals, overlays.

    Views with a shorter side under ``expansion.min_size`` pixels are dropped (never the original), and
    a view repeating an earlier one's box and rotation is dropped.
    """
    width, height = image.size
    full: Box = (0, 0, width, height)
    views = [View("original", full)]
    candidates: list[View] = []
    if expansion.rotations:
        candidates += [View("rotation", full, r) for r in (90, 180, 270)]
    if expansion.crops and min(width, height) >= 3:
        candidates += [View("crop", b) for b in five_crops(width, height)]
    if expansion.proposals:
        boxes = selective_search_boxes(
            image,
            max_side=expansion.proposal_max_side,
            min_area_fraction=expansion.proposal_min_area_fraction,
            max_aspect=expansion.proposal_max_aspect,
            nms_iou=expansion.proposal_nms_iou,
            max_proposals=expansion.max_proposals,
            k=expansion.proposal_k,
            sigma=expansion.proposal_sigma,
        )
        candidates += [View("proposal", _box_tuple(b)) for b in boxes]
    if expansion.overlays:
        boxes = overlay_boxes(
            image,
            max_overlays=expansion.max_overlays,
            max_side=expansion.overlay_max_side,
            min_edge_fraction=expansion.overlay_min_edge_fraction,
            max_extension_fraction=expansion.overlay_max_extension_fraction,
            min_area_fraction=expansion.overlay_min_area_fraction,
            max_area_fraction=expansion.overlay_max_area_fraction,
            min_interior_sides=expansion.overlay_min_interior_sides,
            edge_threshold=expansion.overlay_edge_threshold,
            step_contrast=expansion.overlay_step_contrast,
        )
        candidates += [View("overlay", _box_tuple(b)) for b in boxes]
    seen = {(full, 0)}
    for view in candidates:
        key = (view.box, view.rotation)
        if key in seen or min(view.width, view.height) < expansion.min_size:
            continue
        seen.add(key)
        views.append(view)
    return views


def _box_tuple(box: np.ndarray) -> Box:
    x0, y0, x1, y1 = (int(v) for v in box)
    return (x0, y0, x1, y1)


def reference_views(width: int, height: int, crops: bool = True) -> list[View]:
    """The seed's 19 reference views (see :func:`reference_crop_boxes`), or just the original.

    Index 0 is kind ``"original"``, the rest ``"reference_crop"``; the seed keeps every crop regardless of
    size, so no ``min_size`` filter applies.
    """
    if not crops:
        return [View("original", (0, 0, width, height))]
    boxes = reference_crop_boxes(width, height)
    return [View("original", boxes[0])] + [View("reference_crop", b) for b in boxes[1:]]


def apply_view(image: Image.Image, view: View) -> Image.Image:
    """Render ``view`` of ``image``: crop its box, then rotate counter-clockwise by its rotation."""
    x0, y0, x1, y1 = view.box
    width, height = image.size
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(f"view box {view.box} lies outside the {width}x{height} image")
    out = image if view.box == (0, 0, width, height) else image.crop(view.box)
    if view.rotation:
        out = out.transpose(_TRANSPOSE[view.rotation])
    elif out is image:
        out = image.copy()
    return out
