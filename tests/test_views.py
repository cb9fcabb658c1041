"""Query / reference view geometry (D2LV local verification): fixed crops, NMS, proposals, overlays."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import skimage.data
from PIL import Image

from isc.evaluation.views import (
    DEFAULT_MIN_AREA_FRACTION,
    QueryExpansion,
    View,
    apply_view,
    box_iou,
    five_crops,
    nms,
    overlay_boxes,
    query_views,
    reference_crop_boxes,
    reference_views,
    selective_search_boxes,
)

W, H = 301, 199  # odd sizes so every int(size * fraction) truncates

# Hand-computed for 301x199: 301 * 0.25 = 75.25, 199 * 0.75 = 149.25, 301 / 6 = 50.17, 301 * 3 / 6 = 150.5,
# 301 * 5 / 6 = 250.8, 199 / 6 = 33.2, 199 * 3 / 6 = 99.5, 199 * 5 / 6 = 165.8, 301 // 2 = 150, 199 // 2 = 99,
# 301 / 3 = 100.3, 301 * 2 / 3 = 200.7, 199 / 3 = 66.3, 199 * 2 / 3 = 132.7.
CENTRE = (75, 49, 225, 149)
OVERLAPPING = [(50, 33, 150, 99), (150, 33, 250, 99), (50, 99, 150, 165), (150, 99, 250, 165)]
GRID_2X2 = [(0, 0, 150, 99), (150, 0, 301, 99), (0, 99, 150, 199), (150, 99, 301, 199)]
GRID_3X3 = [
    (0, 0, 100, 66),
    (100, 0, 200, 66),
    (200, 0, 301, 66),
    (0, 66, 100, 132),
    (100, 66, 200, 132),
    (200, 66, 301, 132),
    (0, 132, 100, 199),
    (100, 132, 200, 199),
    (200, 132, 301, 199),
]


def _sample(name: str) -> Image.Image:
    array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]))


def _paste(
    background: str, foreground: str, size: tuple[int, int], box: tuple[int, int, int, int]
) -> Image.Image:
    canvas = _sample(background).resize(size, Image.Resampling.BILINEAR)
    x0, y0, x1, y1 = box
    canvas.paste(_sample(foreground).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR), (x0, y0))
    return canvas


def _inside(boxes: np.ndarray, width: int, height: int) -> bool:
    b = np.asarray(boxes).reshape(-1, 4)
    return bool(
        ((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= width) & (b[:, 3] <= height)).all()
        and ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
    )


# ---------------------------------------------------------------------------------------------- crops


def test_five_crops_hand_computed():
    assert five_crops(W, H) == [CENTRE, *OVERLAPPING]


def test_reference_crop_boxes_hand_computed():
    boxes = reference_crop_boxes(W, H)
    assert len(boxes) == 19
    assert boxes == [(0, 0, W, H), *GRID_2X2, CENTRE, *GRID_3X3, *OVERLAPPING]


@pytest.mark.parametrize("size", [(3, 3), (4, 7), (640, 480), (1000, 37), (301, 199)])
def test_fixed_crops_inside_and_non_empty(size):
    w, h = size
    assert _inside(np.array(five_crops(w, h)), w, h)
    assert _inside(np.array(reference_crop_boxes(w, h)), w, h)
    # The grids tile the image exactly.
    boxes = reference_crop_boxes(w, h)
    for grid in (boxes[1:5], boxes[6:15]):
        assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in grid) == w * h


def test_fixed_crops_reject_tiny_images():
    with pytest.raises(ValueError, match="3x3"):
        five_crops(2, 100)
    with pytest.raises(ValueError, match="3x3"):
        reference_crop_boxes(100, 2)


# ---------------------------------------------------------------------------------------------- NMS


def _iou_slow(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _nms_slow(boxes, threshold, scores=None) -> list[int]:
    order = list(range(len(boxes)))
    if scores is not None:
        order = sorted(order, key=lambda i: -scores[i])  # stable: ties keep input order
    kept: list[int] = []
    for i in order:
        if all(_iou_slow(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 100, size=(n, 2))
    wh = rng.uniform(1, 40, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).round(0)
    boxes[n // 2 : n // 2 + 3] = boxes[0]  # exact duplicates too
    return boxes


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_slow_loop(seed, threshold):
    rng = np.random.default_rng(seed)
    boxes = _random_boxes(rng, 60)
    assert nms(boxes, threshold).tolist() == _nms_slow(boxes.tolist(), threshold)
    scores = rng.integers(0, 6, size=len(boxes)).astype(float)  # many ties
    assert nms(boxes, threshold, scores).tolist() == _nms_slow(boxes.tolist(), threshold, scores.tolist())


def test_nms_hand_worked():
    # IoU(A, B) = 90/110 = 0.82, IoU(A, C) = 50/150 = 0.33, IoU(B, C) = 60/140 = 0.43, D is apart,
    # IoU(A, E) = 50/100 = 0.5 exactly (kept: suppression is strictly above the threshold, as the seed's).
    boxes = np.array(
        [[0, 0, 10, 10], [1, 0, 11, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 5]], dtype=float
    )
    assert nms(boxes, 0.5).tolist() == [0, 2, 3, 4]
    assert nms(boxes, 0.4).tolist() == [0, 2, 3]
    scores = np.array([1.0, 2.0, 0.5, 0.1, 0.0])
    # B first suppresses A; C vs B = 0.43 and E vs B = 45/105 = 0.43 survive 0.5 but not 0.4.
    assert nms(boxes, 0.5, scores).tolist() == [1, 2, 3, 4]
    assert nms(boxes, 0.4, scores).tolist() == [1, 3]
    assert nms(np.zeros((0, 4)), 0.5).tolist() == []
    np.testing.assert_allclose(box_iou(boxes[:1], boxes)[0], [1.0, 90 / 110, 50 / 150, 0.0, 0.5])


# ---------------------------------------------------------------------------------- selective search


@pytest.mark.parametrize(
    ("name", "size"),
    [("astronaut", None), ("coffee", None), ("chelsea", (1000, 700)), ("rocket", (250, 400))],
)
def test_selective_search_filters_hold(name, size):
    image = _sample(name)
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)
    w, h = image.size
    boxes = selective_search_boxes(image)
    assert boxes.dtype == np.int64 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert 1 <= len(boxes) <= 40
    assert _inside(boxes, w, h)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (bw * bh >= DEFAULT_MIN_AREA_FRACTION * w * h).all()
    assert (bw <= 2.0 * bh).all() and (bh <= 2.0 * bw).all()
    iou = box_iou(boxes, boxes)
    np.fill_diagonal(iou, 0.0)
    assert iou.max() <= 0.5
    assert (box_iou(boxes, np.array([[0, 0, w, h]]))[:, 0] <= 0.9).all()
    area = bw * bh
    assert (np.diff(area) <= 0).all()  # largest first
    assert np.array_equal(boxes, selective_search_boxes(image))  # deterministic
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_selective_search_options():
    image = _sample("astronaut")
    w, h = image.size
    assert len(selective_search_boxes(image, max_proposals=3)) <= 3
    assert selective_search_boxes(image, max_proposals=0).shape == (0, 4)
    strict = selective_search_boxes(image, max_aspect=1.2, min_area_fraction=0.05, nms_iou=0.3)
    bw, bh = strict[:, 2] - strict[:, 0], strict[:, 3] - strict[:, 1]
    assert (bw * bh >= 0.05 * w * h).all() and (bw <= 1.2 * bh).all() and (bh <= 1.2 * bw).all()
    iou = box_iou(strict, strict)
    np.fill_diagonal(iou, 0.0)
    assert iou.max(initial=0.0) <= 0.3
    # Greyscale, palette and alpha images go through the RGB path.
    for mode in ("L", "P", "RGBA"):
        converted = selective_search_boxes(image.convert(mode))
        assert len(converted) >= 1 and _inside(converted, w, h)
    # A flat image has one segment, the whole frame, which is excluded.
    assert selective_search_boxes(Image.new("RGB", (200, 150), (90, 120, 30))).shape == (0, 4)


# ------------------------------------------------------------------------------------------ overlays

PASTES = [
    # image pasted into a larger, differently-textured background
    ("coffee", "astronaut", (640, 480), (150, 100, 450, 400)),
    ("chelsea", "rocket", (600, 500), (100, 90, 420, 300)),
    # an image pasted over part of the frame, one touching the right border
    ("astronaut", "chelsea", (512, 512), (250, 60, 470, 210)),
    ("chelsea", "rocket", (451, 300), (300, 40, 451, 200)),
]


@pytest.mark.parametrize(("background", "foreground", "size", "box"), PASTES)
def test_overlay_finds_pasted_rectangle(background, foreground, size, box):
    image = _paste(background, foreground, size, box)
    found = overlay_boxes(image)
    assert 1 <= len(found) <= 5 and _inside(found, *size)
    assert box_iou(found[:1], np.array([box]))[0, 0] > 0.7  # the best one is the paste

    # Survives JPEG and a resize that puts the borders at sub-pixel positions.
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75)
    jpeg = overlay_boxes(Image.open(io.BytesIO(buffer.getvalue())))
    assert box_iou(jpeg, np.array([box])).max() > 0.7
    small = image.resize((size[0] * 2 // 3, size[1] * 2 // 3), Image.Resampling.BILINEAR)
    scaled_box = np.array([box]) * np.array([small.width / size[0], small.height / size[1]] * 2)
    assert box_iou(overlay_boxes(small), scaled_box).max() > 0.7


def test_overlay_mostly_silent_on_plain_photos():
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "coins", "retina"]
    flagged = [name for name in names if len(overlay_boxes(_sample(name))) > 0]
    assert len(flagged) <= 1, flagged
    assert overlay_boxes(Image.new("RGB", (300, 200), (10, 200, 30))).shape == (0, 4)
    assert overlay_boxes(Image.new("RGB", (20, 20))).shape == (0, 4)


def test_overlay_cap_and_thresholds():
    image = _paste("coffee", "astronaut", (640, 480), (150, 100, 450, 400))
    assert overlay_boxes(image, max_overlays=0).shape == (0, 4)
    assert len(overlay_boxes(image, max_overlays=1)) == 1
    # The paste covers 29 % of the frame: an area window excluding it finds it no more.
    assert (
        box_iou(overlay_boxes(image, min_area_fraction=0.5), np.array([[150, 100, 450, 400]])).max(
            initial=0.0
        )
        < 0.7
    )


# ------------------------------------------------------------------------------------- query views

NO_DETECTORS = QueryExpansion(proposals=False, overlays=False, min_size=0)


def _array_view(array: np.ndarray, view: View) -> np.ndarray:
    x0, y0, x1, y1 = view.box
    return np.rot90(array[y0:y1, x0:x1], k=view.rotation // 90)


def test_query_views_order_and_toggles():
    image = Image.new("RGB", (W, H))
    views = query_views(image, NO_DETECTORS)
    assert views[0] == View("original", (0, 0, W, H))
    assert views[1:4] == [View("rotation", (0, 0, W, H), r) for r in (90, 180, 270)]
    assert [v.box for v in views[4:]] == [CENTRE, *OVERLAPPING]
    assert {v.kind for v in views[4:]} == {"crop"}
    no_rot = query_views(image, QueryExpansion(rotations=False, proposals=False, overlays=False, min_size=0))
    assert [v.kind for v in no_rot] == ["original"] + ["crop"] * 5
    only = QueryExpansion(rotations=False, crops=False, proposals=False, overlays=False)
    assert query_views(image, only) == [View("original", (0, 0, W, H))]


def test_query_views_min_size():
    image = Image.new("RGB", (W, H))
    # Centre crop is 150x100 (kept at 100), the overlapping ones 100x66 (dropped).
    views = query_views(image, QueryExpansion(proposals=False, overlays=False, min_size=100))
    assert [v.kind for v in views] == ["original", "rotation", "rotation", "rotation", "crop"]
    # Above the image's own shorter side only the original is left.
    assert query_views(image, QueryExpansion(min_size=250)) == [View("original", (0, 0, W, H))]


def test_query_views_with_detectors():
    image = _paste("coffee", "astronaut", (640, 480), (150, 100, 450, 400))
    expansion = QueryExpansion(max_proposals=6, min_size=60)
    views = query_views(image, expansion)
    kinds = [v.kind for v in views]
    assert kinds[0] == "original" and "proposal" in kinds and "overlay" in kinds
    order = ["original", "rotation", "crop", "proposal", "overlay"]
    assert [order.index(k) for k in kinds] == sorted(order.index(k) for k in kinds)
    assert kinds.count("proposal") <= 6
    assert all(min(v.width, v.height) >= 60 for v in views[1:])
    assert all(_inside(np.array([v.box]), 640, 480) for v in views)
    assert len({(v.box, v.rotation) for v in views}) == len(views)
    overlays = np.array([v.box for v in views if v.kind == "overlay"])
    assert box_iou(overlays, np.array([[150, 100, 450, 400]])).max() > 0.7
    assert views == query_views(image, expansion)
    only_proposals = query_views(image, QueryExpansion(rotations=False, crops=False, overlays=False))
    assert {v.kind for v in only_proposals} == {"original", "proposal"}


def test_apply_view_matches_numpy():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    views = query_views(image, NO_DETECTORS) + reference_views(W, H)
    views += [View("crop", (10, 20, 110, 70), r) for r in (0, 90, 180, 270)]
    for view in views:
        out = apply_view(image, view)
        x0, y0, x1, y1 = view.box
        expected_size = (y1 - y0, x1 - x0) if view.rotation in (90, 270) else (x1 - x0, y1 - y0)
        assert out.size == expected_size == (view.width, view.height)
        np.testing.assert_array_equal(np.asarray(out), _array_view(array, view))
    with pytest.raises(ValueError, match="outside"):
        apply_view(image, View("crop", (0, 0, W + 1, H)))


# --------------------------------------------------------------------------------- reference views


def test_reference_views():
    views = reference_views(W, H)
    assert len(views) == 19
    assert views[0] == View("original", (0, 0, W, H))
    assert all(v.kind == "reference_crop" and v.rotation == 0 for v in views[1:])
    assert [v.box for v in views] == reference_crop_boxes(W, H)
    assert reference_views(W, H, crops=False) == [View("original", (0, 0, W, H))]


# ------------------------------------------------------------------------------------------ config


def test_query_expansion_from_dict():
    parsed = QueryExpansion.from_dict({"rotations": False, "max_proposals": 7, "min_size": 150})
    assert parsed == QueryExpansion(rotations=False, max_proposals=7, min_size=150)
    assert QueryExpansion.from_dict({}) == QueryExpansion()
    with pytest.raises(ValueError) as error:
        QueryExpansion.from_dict({"rotation": True, "crops": False})
    message = str(error.value)
    assert "evaluation.local_verification.query.rotation" in message
    assert (
        "evaluation.local_verification.query.rotations" in message
        and "evaluation.local_verification.query.max_overlays" in message
    )
    with pytest.raises(ValueError, match="evaluation.local_verification.query.min_size"):
        QueryExpansion.from_dict({"min_size": -1})
    with pytest.raises(ValueError, match="evaluation.local_verification.query.proposal_nms_iou"):
        QueryExpansion(proposal_nms_iou=0.0)


def test_view_validation():
    with pytest.raises(ValueError, match="rotation"):
        View("crop", (0, 0, 5, 5), 45)
    with pytest.raises(ValueError, match="non-empty"):
        View("crop", (5, 0, 5, 5))
    with pytest.raises(ValueError, match="kind"):
        View("tile", (0, 0, 5, 5))  # type: ignore[arg-type]
    assert View("crop", (0, 0, 4, 2), 90).width == 2


def test_default_min_area_fraction_is_the_seeds_2000_px_on_640x480():
    assert pytest.approx(2000 / (640 * 480)) == DEFAULT_MIN_AREA_FRACTION
    assert all(isinstance(b, tuple) for b in itertools.chain(five_crops(W, H), reference_crop_boxes(W, H)))
