"""The classical pasted-image ("overlay") detector: finds synthetic pastes, mostly silent on plain photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from view_images import inside, paste, sample

from isc.evaluation.boxes import box_iou
from isc.evaluation.overlays import OverlaySettings, overlay_boxes

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
    image = paste(background, foreground, size, box)
    found = overlay_boxes(image)
    assert 1 <= len(found) <= 5 and inside(found, *size)
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
    flagged = [name for name in names if len(overlay_boxes(sample(name))) > 0]
    assert len(flagged) <= 1, flagged
    assert overlay_boxes(Image.new("RGB", (300, 200), (10, 200, 30))).shape == (0, 4)
    assert overlay_boxes(Image.new("RGB", (20, 20))).shape == (0, 4)


def test_overlay_cap_and_thresholds():
    image = paste("coffee", "astronaut", (640, 480), (150, 100, 450, 400))
    assert overlay_boxes(image, OverlaySettings(max_overlays=0)).shape == (0, 4)
    assert len(overlay_boxes(image, OverlaySettings(max_overlays=1))) == 1
    # The paste covers 29 % of the frame: an area window excluding it finds it no more.
    assert (
        box_iou(
            overlay_boxes(image, OverlaySettings(min_area_fraction=0.5)), np.array([[150, 100, 450, 400]])
        ).max(initial=0.0)
        < 0.7
    )


def test_disabled_settings_give_no_overlays():
    image = paste("coffee", "astronaut", (640, 480), (150, 100, 450, 400))
    assert overlay_boxes(image, OverlaySettings(enabled=False)).shape == (0, 4)


def test_overlay_settings_are_checked_with_their_config_path():
    with pytest.raises(ValueError, match="evaluation.local_verification.query.overlays.min_interior_sides"):
        OverlaySettings(min_interior_sides=5)
    with pytest.raises(ValueError, match="evaluation.local_verification.query.overlays.max_area_fraction"):
        OverlaySettings(min_area_fraction=0.5, max_area_fraction=0.4)
