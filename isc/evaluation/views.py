"""Test-time view geometry of D2LV's "local verification": which views a query and a reference get.

D2LV (ISC2021 matching track winner, WangWenhao0716/ISC-Track1-Submission) describes every query by
several views and every reference by 19 crops, then matches view against view so a copy that shows only
part of a reference (or a reference pasted into a larger picture) still meets a view of the same extent.
This module only says *which* boxes and rotations to look at; describing and matching them is elsewhere,
and the two detectors live in their own modules.

Query views, in order (the seed's file suffixes in brackets), configured by :class:`QueryViews`:

- the original (``_0``);
- rotations by 90, 180, 270 degrees counter-clockwise (``_1``.. ``_3``, ``Test/augmentation/query/rotate.py``);
- five crops: the centre half and four overlapping thirds (``_4``.. ``_8``,
  ``Test/augmentation/query/center.py``);
- selective-search proposals (``_10``.., ``Test/augmentation/query/selective_search_nms.py``), the
  ``selectivesearch`` package's algorithm at full resolution (:mod:`isc.evaluation.proposals`);
- pasted-image ("overlay") regions: D2LV trained a YOLOv5 to find them; here a classical, offline detector
  of axis-aligned rectangles whose perimeter lies on step edges (:mod:`isc.evaluation.overlays`), or with
  ``overlays.detector=learned`` a torchvision detector trained on generated pastes
  (:mod:`isc.evaluation.overlay_detector`).

Every view is extracted and searched; the rows of views whose width or height is under ``min_size``
pixels, the original's too, are dropped after the search (:func:`small_views`; seed
``Test/final/generate_100_150_200.py:9-13`` lists every file of the views folder, and
``Test/final/combine.py:4-26`` drops those views' rows from each family's result).

Reference views: the whole image, the 2x2 grid, the centre, the 3x3 grid and the four overlapping
crops, 19 in all (``Test/augmentation/reference/dividing.py``).

Boxes are ``(x0, y0, x1, y1)`` in the original image's pixels with ``x1``/``y1`` exclusive, the PIL
``Image.crop`` convention. Framework-free on purpose (numpy, PIL, OpenCV) so DataLoader workers can call
it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import numpy as np
from PIL import Image

from isc.evaluation.overlays import OverlaySettings, detect_overlays
from isc.evaluation.proposals import ProposalSettings, selective_search_boxes

__all__ = [
    "QueryViews",
    "View",
    "ViewKind",
    "apply_view",
    "five_crops",
    "query_views",
    "reference_crop_boxes",
    "reference_views",
    "small_views",
]

# "face": a face found on a reference (isc.evaluation.faces), marking it for the reference-crop stage
ViewKind = Literal["original", "rotation", "crop", "proposal", "overlay", "reference_crop", "face"]
Box = tuple[int, int, int, int]

ROTATIONS = (0, 90, 180, 270)
_TRANSPOSE = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}


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
class QueryViews:
    """Which views a query gets (``evaluation.local_verification.query``); every family can be switched off.

    ``proposals`` and ``overlays`` are the detectors' own settings, each handed whole to its detector
    (:class:`isc.evaluation.proposals.ProposalSettings`, :class:`isc.evaluation.overlays.OverlaySettings`;
    ``proposals.enabled`` / ``overlays.enabled`` switch them off). Defaults mirror the seed where it has a
    value (see the module docstring for the files).
    """

    KEY: ClassVar[str] = "evaluation.local_verification.query"  # where errors say to look

    rotations: bool = True  # 90 / 180 / 270 degrees (rotate.py)
    crops: bool = True  # centre + four overlapping crops (center.py)
    # Rows of views (the original too) narrower or lower than this are dropped after the search
    # (Test/final/generate_100_150_200.py:12, combine.py:4-26); see small_views.
    min_size: int = 100
    proposals: ProposalSettings = field(default_factory=ProposalSettings)
    overlays: OverlaySettings = field(default_factory=OverlaySettings)

    def __post_init__(self) -> None:
        p = self.KEY + "."
        if self.min_size < 0:
            raise ValueError(f"{p}min_size must be >= 0, got {self.min_size}")
        for name, kind in _NESTED.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise ValueError(
                    f"{p}{name} must be a mapping of {_valid_keys(kind, p + name)} "
                    f"(switch it off with {p}{name}.enabled=false), got {value!r}"
                )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QueryViews:
        """Parse the ``evaluation.local_verification.query`` config, nested ``proposals`` / ``overlays`` too.

        An unknown key at any level is an error naming its full path and the valid keys, raised before any
        value is checked.
        """
        _check_keys(cls, values, cls.KEY)
        for name, kind in _NESTED.items():
            if isinstance(values.get(name), Mapping):
                _check_keys(kind, values[name], f"{cls.KEY}.{name}")
        kwargs: dict[str, Any] = {
            k: _NESTED[k](**dict(v)) if k in _NESTED and isinstance(v, Mapping) else v
            for k, v in values.items()
        }
        return cls(**kwargs)


_NESTED: dict[str, type[ProposalSettings] | type[OverlaySettings]] = {
    "proposals": ProposalSettings,
    "overlays": OverlaySettings,
}


def _valid_keys(kind: type, prefix: str) -> str:
    return ", ".join(f"{prefix}.{f.name}" for f in dataclasses.fields(kind))


def _check_keys(kind: type, values: Mapping[str, Any], prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            "unknown key(s) "
            + ", ".join(f"{prefix}.{k}" for k in unknown)
            + "; valid keys: "
            + _valid_keys(kind, prefix)
        )


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
# Views
# --------------------------------------------------------------------------------------------------


def query_views(image: Image.Image, config: QueryViews) -> list[View]:
    """The views one query expands to: the original first, then rotations, crops, proposals, overlays.

    A view repeating an earlier one's box and rotation is dropped. Small views are kept: the seed
    extracts and searches them, then drops their rows (``config.min_size``, :func:`small_views`).
    """
    width, height = image.size
    full: Box = (0, 0, width, height)
    views = [View("original", full)]
    candidates: list[View] = []
    if config.rotations:
        candidates += [View("rotation", full, r) for r in (90, 180, 270)]
    if config.crops and min(width, height) >= 3:
        candidates += [View("crop", b) for b in five_crops(width, height)]
    if config.proposals.enabled:
        candidates += [
            View("proposal", _box_tuple(b)) for b in selective_search_boxes(image, config.proposals)
        ]
    if config.overlays.enabled:
        candidates += [View("overlay", _box_tuple(b)) for b in detect_overlays(image, config.overlays)]
    seen = {(full, 0)}
    for view in candidates:
        key = (view.box, view.rotation)
        if key in seen:
            continue
        seen.add(key)
        views.append(view)
    return views


def small_views(views: list[View], min_size: int) -> np.ndarray:
    """(n,) bool: the views whose width or height is under ``min_size`` pixels, the original's included.

    The seed's ``size[0] < 200 or size[1] < 200`` over every file of the query-views folder
    (``Test/final/generate_100_150_200.py:9-13``, 100 at :12, 150 at :23, 200 at :34); their rows are
    dropped after the search (``Test/final/combine.py:4-26``).
    """
    return np.array([min(v.width, v.height) < min_size for v in views], dtype=bool)


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
