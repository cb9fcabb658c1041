"""Query / reference view geometry (D2LV local verification): fixed crops, query views, their config."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image
from view_images import inside, paste

from isc.evaluation.boxes import box_iou
from isc.evaluation.overlays import OverlaySettings
from isc.evaluation.proposals import ProposalSettings
from isc.evaluation.views import (
    QueryViews,
    View,
    apply_view,
    five_crops,
    query_views,
    reference_crop_boxes,
    reference_views,
    small_views,
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
    assert inside(np.array(five_crops(w, h)), w, h)
    assert inside(np.array(reference_crop_boxes(w, h)), w, h)
    # The grids tile the image exactly.
    boxes = reference_crop_boxes(w, h)
    for grid in (boxes[1:5], boxes[6:15]):
        assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in grid) == w * h


def test_fixed_crops_reject_tiny_images():
    with pytest.raises(ValueError, match="3x3"):
        five_crops(2, 100)
    with pytest.raises(ValueError, match="3x3"):
        reference_crop_boxes(100, 2)


# ------------------------------------------------------------------------------------- query views

NO_DETECTORS = QueryViews(
    proposals=ProposalSettings(enabled=False), overlays=OverlaySettings(enabled=False), min_size=0
)


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
    no_rot = query_views(image, dataclasses.replace(NO_DETECTORS, rotations=False))
    assert [v.kind for v in no_rot] == ["original"] + ["crop"] * 5
    only = dataclasses.replace(NO_DETECTORS, rotations=False, crops=False, min_size=100)
    assert query_views(image, only) == [View("original", (0, 0, W, H))]


def test_small_views_are_kept_as_views_and_marked_originals_included():
    image = Image.new("RGB", (W, H))
    # min_size no longer drops views: the seed extracts and searches them, then drops their rows
    views = query_views(image, dataclasses.replace(NO_DETECTORS, min_size=100))
    assert len(views) == 9
    # Centre crop is 150x100 (not small at 100), the overlapping ones 100x66 (small).
    assert small_views(views, 100).tolist() == [False] * 5 + [True] * 4
    # Above the image's own shorter side (199) every view is small, the original and rotations too.
    assert small_views(views, 200).all()
    assert not small_views(views, 0).any()
    # width or height: a 300 x 150 view is small at 151, whatever its rotation
    assert small_views([View("crop", (0, 0, 300, 150), r) for r in (0, 90)], 151).tolist() == [True, True]


def test_query_views_with_detectors():
    image = paste("coffee", "astronaut", (640, 480), (150, 100, 450, 400))
    config = QueryViews(proposals=ProposalSettings(max_proposals=6, max_side=320), min_size=60)
    views = query_views(image, config)
    kinds = [v.kind for v in views]
    assert kinds[0] == "original" and "proposal" in kinds and "overlay" in kinds
    order = ["original", "rotation", "crop", "proposal", "overlay"]
    assert [order.index(k) for k in kinds] == sorted(order.index(k) for k in kinds)
    assert kinds.count("proposal") <= 6
    assert all(inside(np.array([v.box]), 640, 480) for v in views)
    assert len({(v.box, v.rotation) for v in views}) == len(views)
    overlays = np.array([v.box for v in views if v.kind == "overlay"])
    assert box_iou(overlays, np.array([[150, 100, 450, 400]])).max() > 0.7
    assert views == query_views(image, config)
    only_proposals = query_views(
        image,
        QueryViews(
            rotations=False,
            crops=False,
            proposals=ProposalSettings(max_side=320),
            overlays=OverlaySettings(enabled=False),
        ),
    )
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


def test_query_views_from_dict():
    parsed = QueryViews.from_dict({"rotations": False, "proposals": {"max_proposals": 7}, "min_size": 150})
    assert parsed == QueryViews(rotations=False, proposals=ProposalSettings(max_proposals=7), min_size=150)
    assert QueryViews.from_dict({}) == QueryViews()
    with pytest.raises(ValueError) as error:
        QueryViews.from_dict({"rotation": True, "crops": False})
    message = str(error.value)
    assert "evaluation.local_verification.query.rotation" in message
    assert (
        "evaluation.local_verification.query.rotations" in message
        and "evaluation.local_verification.query.overlays" in message
    )
    with pytest.raises(ValueError, match="evaluation.local_verification.query.min_size"):
        QueryViews.from_dict({"min_size": -1})
    with pytest.raises(ValueError, match="evaluation.local_verification.query.proposals.nms_iou"):
        QueryViews(proposals=ProposalSettings(nms_iou=0.0))
    with pytest.raises(ValueError, match="evaluation.local_verification.query.proposals.nms_iou"):
        QueryViews.from_dict({"proposals": {"nms_iou": 0.0}})


@pytest.mark.parametrize("group", ["proposals", "overlays"])
def test_query_views_refuse_unknown_nested_keys_with_their_full_path(group):
    with pytest.raises(ValueError) as error:
        # The unknown key is reported even next to an invalid value (keys are checked first).
        QueryViews.from_dict({"min_size": -1, group: {"bogus": 1, "enabled": False}})
    message = str(error.value)
    assert f"unknown key(s) evaluation.local_verification.query.{group}.bogus;" in message
    assert f"evaluation.local_verification.query.{group}.enabled" in message  # the valid keys
    assert f"evaluation.local_verification.query.{group}.max_side" in message


def test_query_views_refuse_the_old_flat_switches():
    with pytest.raises(ValueError, match=r"query\.proposals\.enabled=false"):
        QueryViews.from_dict({"proposals": False})
    with pytest.raises(ValueError, match="evaluation.local_verification.query.proposal_max_side"):
        QueryViews.from_dict({"proposal_max_side": 320})


def test_view_validation():
    with pytest.raises(ValueError, match="rotation"):
        View("crop", (0, 0, 5, 5), 45)
    with pytest.raises(ValueError, match="non-empty"):
        View("crop", (5, 0, 5, 5))
    with pytest.raises(ValueError, match="kind"):
        View("tile", (0, 0, 5, 5))  # type: ignore[arg-type]
    assert View("crop", (0, 0, 4, 2), 90).width == 2


def test_default_proposal_filters_are_the_seeds():
    s = ProposalSettings()
    # selective_search_nms.py:57-58 (scale 500, sigma 0.9, min_size 10), :64-66 (2000 px), :69 (2), :77 (0.5)
    assert (s.scale, s.sigma, s.min_size, s.min_pixels, s.max_aspect, s.nms_iou) == (
        500,
        0.9,
        10,
        2000,
        2,
        0.5,
    )
    assert s.max_side is None  # full resolution
    assert all(isinstance(b, tuple) for b in itertools.chain(five_crops(W, H), reference_crop_boxes(W, H)))
