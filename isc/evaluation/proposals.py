"""Selective-search region proposals for query views (seed ``Test/augmentation/query/selective_search_nms.py``).

D2LV (ISC2021 matching track winner, WangWenhao0716/ISC-Track1-Submission) adds selective-search regions to
each query's views (files ``_10``..), so a copy pasted into a larger picture meets a view of its own extent.
The seed calls the ``selectivesearch`` package (AlpacaDB/selectivesearch) and filters regions by their
*pixel count*, which OpenCV's implementation does not report; this module follows that package's algorithm
instead (:func:`selective_search`: Felzenszwalb segments, then hierarchical grouping by colour, texture,
size and fill similarity, each region keeping its pixel count), vectorised with numpy where it matters.
:class:`ProposalSettings` holds the seed's filters (``evaluation.local_verification.query.proposals``) and
:func:`selective_search_boxes` returns the boxes. Framework-free (numpy, PIL, scikit-image, scipy) so
DataLoader workers can call it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import skimage.color
import skimage.feature
import skimage.segmentation
import skimage.util
from PIL import Image
from scipy import ndimage

from isc.evaluation.boxes import FULL_FRAME_IOU, downscaled, drop_full_frame, nms, sort_boxes, to_original

__all__ = ["ProposalSettings", "Regions", "group_regions", "selective_search", "selective_search_boxes"]

# The selectivesearch package's histograms (selectivesearch.py:85/95 and :129/141): 25 bins on (0, 255) per
# HSV channel, 10 bins on (0, 1) per channel of an 8-neighbour LBP. Its HSV is skimage's rgb2hsv of the
# 0..255 float image, so only V spreads over the bins (H and S, in [0, 1], all fall in the first one), and
# LBP codes are 0..255, so the (0, 1) range counts only codes 0 and 1. Kept as the package computes them:
# the seed's proposals come from exactly these similarities.
_COLOUR_BINS, _COLOUR_RANGE = 25, (0.0, 255.0)
_TEXTURE_BINS, _TEXTURE_RANGE = 10, (0.0, 1.0)


@dataclass(frozen=True)
class ProposalSettings:
    """Selective-search proposals of a query: whether to look for them, and the filters they pass.

    Defaults are the seed's (``selective_search_nms.py:57-77``): ``selectivesearch.selective_search(img,
    scale=500, sigma=0.9, min_size=10)`` on the full-resolution query, regions of at least 2000 pixels,
    ``w / h`` and ``h / w`` at most 2, NMS at IoU 0.5, every proposal kept. ``max_side`` (run on a copy
    at most that long, pixel counts scaled back) and ``max_proposals`` (keep the largest) are cost options
    the seed does not have; ``None`` means off.
    """

    KEY: ClassVar[str] = "evaluation.local_verification.query.proposals"  # where errors say to look

    enabled: bool = True  # selective search + NMS (selective_search_nms.py)
    max_proposals: int | None = 40  # None: every proposal, as the seed (selective_search_nms.py:77-80)
    max_side: int | None = None  # None: full resolution, as the seed (selective_search_nms.py:53-58)
    min_pixels: int = 2000  # the seed's r['size'] < 2000 (selective_search_nms.py:64-66), original pixels
    max_aspect: float = 2.0  # the seed's w / h and h / w limit (selective_search_nms.py:67-70)
    nms_iou: float = 0.5  # the seed's NMS threshold (selective_search_nms.py:77)
    scale: float = 500.0  # Felzenszwalb scale / sigma / min_size as the seed's call (:57-58)
    sigma: float = 0.9
    min_size: int = 10

    def __post_init__(self) -> None:
        p = self.KEY + "."
        checks = [
            (
                self.max_proposals is None or self.max_proposals >= 0,
                f"{p}max_proposals must be >= 0 or null (no cap), got {self.max_proposals}",
            ),
            (
                self.max_side is None or self.max_side >= 16,
                f"{p}max_side must be >= 16 or null (full resolution), got {self.max_side}",
            ),
            (self.min_pixels >= 0, f"{p}min_pixels must be >= 0, got {self.min_pixels}"),
            (self.max_aspect >= 1.0, f"{p}max_aspect must be >= 1, got {self.max_aspect}"),
            (0.0 < self.nms_iou <= 1.0, f"{p}nms_iou must be in (0, 1], got {self.nms_iou}"),
            (self.scale > 0, f"{p}scale must be > 0, got {self.scale}"),
            (self.sigma >= 0, f"{p}sigma must be >= 0, got {self.sigma}"),
            (self.min_size >= 1, f"{p}min_size must be >= 1, got {self.min_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class Regions:
    """Every region of a selective search: the initial segments, then one per merge, in that order.

    ``boxes`` (n, 4) int64 ``min_x, min_y, max_x, max_y`` with *inclusive* maxima (the package's ``rect``
    is ``(min_x, min_y, max_x - min_x, max_y - min_y)``); ``sizes`` (n,) int64 pixel counts (a merged
    region's is the sum of its parts', selectivesearch.py:219).
    """

    boxes: np.ndarray
    sizes: np.ndarray


def _histograms(values: np.ndarray, index: np.ndarray, n: int, bins: int, lo: float, hi: float) -> np.ndarray:
    """(n, channels * bins) per-region counts with ``np.histogram``'s rule: ``[e_i, e_i+1)`` bins, the
    last closed, values outside ``[lo, hi]`` not counted. ``values`` (pixels, channels), ``index`` (pixels,)."""
    edges = np.linspace(lo, hi, bins + 1)
    channels = values.shape[1]
    out = np.zeros((n, channels * bins), dtype=np.float64)
    for c in range(channels):
        v = values[:, c]
        b = np.searchsorted(edges, v, side="right") - 1
        b[v == hi] = bins - 1
        ok = (v >= lo) & (v <= hi)
        out[:, c * bins : (c + 1) * bins] = np.bincount(index[ok] * bins + b[ok], minlength=n * bins).reshape(
            n, bins
        )
    return out


def _initial_regions(rgb: np.ndarray, labels: np.ndarray) -> tuple[Regions, np.ndarray]:
    """The segments of ``labels`` in the package's order (first occurrence in raster order,
    selectivesearch.py:157-165) with boxes, pixel counts and L1-normalised colour + texture histograms."""
    flat = labels.ravel()
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    index = rank[inverse.reshape(-1)]
    n = len(first)
    sizes = np.bincount(index, minlength=n).astype(np.int64)
    boxes = np.empty((n, 4), dtype=np.int64)
    for i, (ys, xs) in enumerate(ndimage.find_objects(index.reshape(labels.shape) + 1)):
        boxes[i] = (xs.start, ys.start, xs.stop - 1, ys.stop - 1)
    hsv = skimage.color.rgb2hsv(rgb.astype(np.float64)).reshape(-1, 3)  # as the package: on 0..255 floats
    lbp = np.stack(
        [skimage.feature.local_binary_pattern(rgb[:, :, c], 8, 1.0) for c in range(3)], axis=-1
    ).reshape(-1, 3)
    colour = _histograms(hsv, index, n, _COLOUR_BINS, *_COLOUR_RANGE)
    texture = _histograms(lbp, index, n, _TEXTURE_BINS, *_TEXTURE_RANGE)
    hists = np.concatenate([colour, texture], axis=1) / sizes[:, None]  # selectivesearch.py:98/144
    return Regions(boxes, sizes), hists


def _neighbour_pairs(boxes: np.ndarray) -> np.ndarray:
    """(m, 2) pairs ``(a, b)``, ``a < b``, in the package's order, that it calls neighbours
    (selectivesearch.py:194-215): a corner of ``b``'s box lies strictly inside ``a``'s box. (Not pixel
    adjacency: two segments sharing a straight edge are no pair; only ``b``'s corners are tested.)"""
    x0, y0, x1, y1 = (boxes[:, k] for k in range(4))

    def inside(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return (lo[:, None] < v[None, :]) & (v[None, :] < hi[:, None])  # [a, b]

    meet = (inside(x0, x0, x1) | inside(x1, x0, x1)) & (inside(y0, y0, y1) | inside(y1, y0, y1))
    return np.argwhere(np.triu(meet, k=1))  # row-major: the package's nested loop order


def group_regions(regions: Regions, hists: np.ndarray, image_size: int) -> Regions:
    """The package's hierarchical grouping (selectivesearch.py:279-307) of the initial ``regions``.

    Repeatedly merges the pair of highest similarity ``colour + texture + size + fill`` (histogram
    intersections, ``1 - (s_a + s_b) / image_size`` and ``1 - (bbox - s_a - s_b) / image_size``,
    :37-71) until no pair is left; the merged region gets the union box, the summed pixel count and the
    size-weighted histograms (:218-232), and similarities to every neighbour of either part. Equal
    similarities go to the pair inserted last, as the package's stable ``sorted(...)[-1]`` picks. A heap
    with lazy deletion replaces its quadratic re-sort.
    """
    n = len(regions.sizes)
    total = max(1, 2 * n - 1)
    boxes = np.zeros((total, 4), dtype=np.int64)
    sizes = np.zeros(total, dtype=np.int64)
    hist = np.zeros((total, hists.shape[1]), dtype=np.float64)
    boxes[:n], sizes[:n], hist[:n] = regions.boxes, regions.sizes, hists
    alive = np.zeros(total, dtype=bool)
    alive[:n] = True
    links: list[dict[int, int]] = [{} for _ in range(total)]  # region -> {neighbour: insertion counter}
    heap: list[tuple[float, int, int, int]] = []
    counter = 0

    def similarity(t: int, others: np.ndarray) -> np.ndarray:
        s = sizes[t] + sizes[others]
        bw = np.maximum(boxes[t, 2], boxes[others, 2]) - np.minimum(boxes[t, 0], boxes[others, 0])
        bh = np.maximum(boxes[t, 3], boxes[others, 3]) - np.minimum(boxes[t, 1], boxes[others, 1])
        shared = np.minimum(hist[t][None, :], hist[others]).sum(axis=1)
        return np.asarray(shared + (1.0 - s / image_size) + (1.0 - (bw * bh - s) / image_size))

    def link(a: int, others: np.ndarray) -> None:
        nonlocal counter
        for b, sim in zip(others.tolist(), similarity(a, others).tolist(), strict=True):
            links[a][b] = links[b][a] = counter
            heapq.heappush(heap, (-sim, -counter, a, b))
            counter += 1

    pairs = _neighbour_pairs(regions.boxes)  # row-major: linking each a's run keeps the package's order
    if len(pairs):
        starts = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]).tolist()
        for lo, hi in zip(starts, [*starts[1:], len(pairs)], strict=True):
            link(int(pairs[lo, 0]), pairs[lo:hi, 1])
    t = n
    while heap:
        _, _, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        boxes[t, :2] = np.minimum(boxes[i, :2], boxes[j, :2])
        boxes[t, 2:] = np.maximum(boxes[i, 2:], boxes[j, 2:])
        sizes[t] = sizes[i] + sizes[j]
        hist[t] = (hist[i] * sizes[i] + hist[j] * sizes[j]) / sizes[t]
        alive[i] = alive[j] = False
        alive[t] = True
        # the neighbours of either part, in the order their pairs were inserted, each once (:295-307)
        old = sorted(
            [(c, k) for k, c in links[i].items() if k != j] + [(c, k) for k, c in links[j].items() if k != i]
        )
        others = list(dict.fromkeys(k for _, k in old))
        for k in others:
            links[k].pop(i, None)
            links[k].pop(j, None)
        links[i], links[j] = {}, {}
        if others:
            link(t, np.asarray(others, dtype=np.int64))
        t += 1
    return Regions(boxes[:t], sizes[:t])


def selective_search(
    rgb: np.ndarray, scale: float = 500.0, sigma: float = 0.9, min_size: int = 10
) -> Regions:
    """Every region of the ``selectivesearch`` package's search on an RGB uint8 ``(h, w, 3)`` image.

    Felzenszwalb segments of ``img_as_float(rgb)`` (selectivesearch.py:25-27) are the initial regions;
    :func:`group_regions` merges them. Defaults are the seed's call (selective_search_nms.py:57-58).
    """
    labels = skimage.segmentation.felzenszwalb(
        skimage.util.img_as_float(rgb), scale=scale, sigma=sigma, min_size=min_size
    )
    initial, hists = _initial_regions(rgb, labels)
    return group_regions(initial, hists, rgb.shape[0] * rgb.shape[1])


def selective_search_boxes(image: Image.Image, settings: ProposalSettings | None = None) -> np.ndarray:
    """Selective-search region proposals as ``(n, 4)`` int64 boxes in the original image's pixels.

    As ``Test/augmentation/query/selective_search_nms.py:57-80``: every region of :func:`selective_search`;
    those under ``min_pixels`` pixels dropped (the region's pixel count, not its box's area), those with
    ``w / h`` or ``h / w`` above ``max_aspect`` dropped, duplicate rects dropped; the crop box is the
    seed's ``(x, y, x + w, y + h)`` (``w = max_x - min_x``, so PIL's crop leaves out the last row and
    column as the seed's does); NMS at ``nms_iou`` with equal scores and the seed's inclusive-corner IoU.
    Boxes with IoU above ``FULL_FRAME_IOU`` with the whole frame are dropped (the original is already a
    view; the seed keeps them). The seed's NMS visits its rects in set order (arbitrary); here by area
    descending, ties by coordinates, so the kept boxes come out in that order, deterministically, and
    ``max_proposals`` (``None``: all) keeps the largest. With ``max_side``, the search runs on a smaller copy
    and pixel counts are scaled back to the original's. ``settings`` defaults to :class:`ProposalSettings`'s;
    with ``enabled`` false no box is returned.
    """
    s = ProposalSettings() if settings is None else settings
    width, height = image.size
    if not s.enabled or s.max_proposals == 0 or width < 2 or height < 2:
        return np.zeros((0, 4), dtype=np.int64)
    rgb = downscaled(image, s.max_side) if s.max_side is not None else np.asarray(image.convert("RGB"))
    sh, sw = rgb.shape[:2]
    regions = selective_search(rgb, s.scale, s.sigma, s.min_size)
    b = regions.boxes
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    ok = regions.sizes * (width * height) / (sw * sh) >= s.min_pixels
    ok &= (w > 0) & (h > 0) & (w <= s.max_aspect * h) & (h <= s.max_aspect * w)
    boxes = np.unique(b[ok], axis=0)  # (x, y, x + w, y + h): the seed's crop box
    if (sw, sh) != (width, height):
        boxes = to_original(boxes, sw, sh, width, height)
    boxes = drop_full_frame(sort_boxes(boxes), width, height, FULL_FRAME_IOU)
    kept = boxes[nms(boxes + np.array([0, 0, 1, 1]), s.nms_iou)]  # the seed's areas (x2 - x1 + 1) ...
    return (kept if s.max_proposals is None else kept[: s.max_proposals]).astype(np.int64)
