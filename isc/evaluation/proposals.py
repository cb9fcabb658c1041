"""Selective-search region proposals for query views (seed ``Test/augmentation/query/selective_search_nms.py``).

D2LV (ISC2021 matching track winner, WangWenhao0716/ISC-Track1-Submission) adds selective-search regions to
each query's views (files ``_10``..), so a copy pasted into a larger picture meets a view of its own extent.
Here OpenCV's single-strategy selective search runs on a downscaled copy instead of the ``selectivesearch``
package; :class:`ProposalSettings` holds its thresholds (``evaluation.local_verification.query.proposals``)
and :func:`selective_search_boxes` returns the boxes. Framework-free (numpy, PIL, OpenCV) so DataLoader
workers can call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
from PIL import Image

from isc.evaluation.boxes import FULL_FRAME_IOU, downscaled, drop_full_frame, nms, sort_boxes, to_original

__all__ = ["DEFAULT_MIN_AREA_FRACTION", "ProposalSettings", "selective_search_boxes"]

# The seed dropped selective-search regions under 2000 pixels on DISC21 queries, whose longer side is
# 640 px (typically 640x480): 2000 / (640 * 480) ~ 0.0065 of the image, kept as a fraction so the filter
# means the same on any resolution.
DEFAULT_MIN_AREA_FRACTION = 2000 / (640 * 480)


@dataclass(frozen=True)
class ProposalSettings:
    """Selective-search proposals of a query: whether to look for them, and the filters they pass.

    Defaults mirror the seed (``selective_search_nms.py``): Felzenszwalb ``k=500, sigma=0.9``
    (``selectivesearch`` ``scale=500, sigma=0.9``), aspect limit 2, NMS IoU 0.5, minimum region 2000 px on
    ~640x480 images (as a fraction, see ``DEFAULT_MIN_AREA_FRACTION``). ``max_proposals`` caps the seed's
    "fewer than 90" per query for speed; ``max_side`` is the downscaled size selective search runs at.
    """

    KEY: ClassVar[str] = "evaluation.local_verification.query.proposals"  # where errors say to look

    enabled: bool = True  # selective search + NMS (selective_search_nms.py), OpenCV's implementation
    max_proposals: int = 40  # the seed kept up to ~90 per query
    max_side: int = 320  # selective search runs on a copy at most this long
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION  # the seed's 2000 px on 640x480 queries
    max_aspect: float = 2.0  # the seed's w / h and h / w limit
    nms_iou: float = 0.5  # the seed's NMS threshold
    k: int = 500  # Felzenszwalb scale / sigma as the seed's selectivesearch call
    sigma: float = 0.9

    def __post_init__(self) -> None:
        p = self.KEY + "."
        checks = [
            (self.max_proposals >= 0, f"{p}max_proposals must be >= 0, got {self.max_proposals}"),
            (self.max_side >= 16, f"{p}max_side must be >= 16, got {self.max_side}"),
            (
                0.0 <= self.min_area_fraction < 1.0,
                f"{p}min_area_fraction must be in [0, 1), got {self.min_area_fraction}",
            ),
            (self.max_aspect >= 1.0, f"{p}max_aspect must be >= 1, got {self.max_aspect}"),
            (0.0 < self.nms_iou <= 1.0, f"{p}nms_iou must be in (0, 1], got {self.nms_iou}"),
            (self.k > 0, f"{p}k must be > 0, got {self.k}"),
            (self.sigma > 0, f"{p}sigma must be > 0, got {self.sigma}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def selective_search_boxes(image: Image.Image, settings: ProposalSettings | None = None) -> np.ndarray:
    """Selective-search region proposals as ``(n, 4)`` int64 boxes in the original image's pixels.

    Mirrors ``Test/augmentation/query/selective_search_nms.py`` with OpenCV's single-strategy selective
    search (Felzenszwalb ``k``/``sigma`` as the seed's ``scale=500, sigma=0.9``; OpenCV's segmentation
    fixes its own ``min_size``, the seed's was 10) on a copy downscaled to ``settings.max_side`` for speed.
    Then, as in the seed: duplicate rects dropped, rects smaller than ``min_area_fraction`` of the image
    dropped (the seed measured the segment's pixel count, OpenCV only gives rects so the rect area is used),
    rects with ``w / h`` or ``h / w`` above ``max_aspect`` dropped, then NMS at ``nms_iou`` with equal
    scores. Rects with IoU above ``FULL_FRAME_IOU`` with the whole frame are dropped too (the original is
    already a view). NMS visits boxes by area descending (ties by coordinates), so the kept boxes -- at
    most ``max_proposals``, the largest -- come out in that order and the result is deterministic.
    ``cv2.setNumThreads(1)`` keeps it deterministic and off other DataLoader workers' cores. ``settings``
    defaults to :class:`ProposalSettings`'s; with ``enabled`` false no box is returned.
    """
    s = ProposalSettings() if settings is None else settings
    width, height = image.size
    if not s.enabled or s.max_proposals <= 0 or width < 2 or height < 2:
        return np.zeros((0, 4), dtype=np.int64)
    cv2.setNumThreads(1)
    small = downscaled(image, s.max_side)
    sh, sw = small.shape[:2]
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    search.switchToSingleStrategy(int(s.k), float(s.sigma))
    rects = np.asarray(search.process(), dtype=np.int64).reshape(-1, 4)  # x, y, w, h in the small copy
    if rects.shape[0] == 0:
        return np.zeros((0, 4), dtype=np.int64)
    small_boxes = np.column_stack(
        [rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2], rects[:, 1] + rects[:, 3]]
    )
    boxes = np.unique(to_original(small_boxes, sw, sh, width, height), axis=0)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ok = (bw > 0) & (bh > 0)
    ok &= bw * bh >= s.min_area_fraction * width * height
    ok &= (bw <= s.max_aspect * bh) & (bh <= s.max_aspect * bw)
    boxes = drop_full_frame(sort_boxes(boxes[ok]), width, height, FULL_FRAME_IOU)
    kept = boxes[nms(boxes, s.nms_iou)]
    return kept[: s.max_proposals].astype(np.int64)
