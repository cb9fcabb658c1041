"""Selective-search region proposals (seed selective_search_nms.py): filters, options, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from view_images import inside, sample

from isc.evaluation.boxes import box_iou
from isc.evaluation.proposals import DEFAULT_MIN_AREA_FRACTION, ProposalSettings, selective_search_boxes

# ---------------------------------------------------------------------------------- selective search


@pytest.mark.parametrize(
    ("name", "size"),
    [("astronaut", None), ("coffee", None), ("chelsea", (1000, 700)), ("rocket", (250, 400))],
)
def test_selective_search_filters_hold(name, size):
    image = sample(name)
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)
    w, h = image.size
    boxes = selective_search_boxes(image)
    assert boxes.dtype == np.int64 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert 1 <= len(boxes) <= 40
    assert inside(boxes, w, h)
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
    image = sample("astronaut")
    w, h = image.size
    assert len(selective_search_boxes(image, ProposalSettings(max_proposals=3))) <= 3
    assert selective_search_boxes(image, ProposalSettings(max_proposals=0)).shape == (0, 4)
    strict = selective_search_boxes(
        image, ProposalSettings(max_aspect=1.2, min_area_fraction=0.05, nms_iou=0.3)
    )
    bw, bh = strict[:, 2] - strict[:, 0], strict[:, 3] - strict[:, 1]
    assert (bw * bh >= 0.05 * w * h).all() and (bw <= 1.2 * bh).all() and (bh <= 1.2 * bw).all()
    iou = box_iou(strict, strict)
    np.fill_diagonal(iou, 0.0)
    assert iou.max(initial=0.0) <= 0.3
    # Greyscale, palette and alpha images go through the RGB path.
    for mode in ("L", "P", "RGBA"):
        converted = selective_search_boxes(image.convert(mode))
        assert len(converted) >= 1 and inside(converted, w, h)
    # A flat image has one segment, the whole frame, which is excluded.
    assert selective_search_boxes(Image.new("RGB", (200, 150), (90, 120, 30))).shape == (0, 4)


def test_disabled_settings_give_no_proposals():
    assert selective_search_boxes(sample("astronaut"), ProposalSettings(enabled=False)).shape == (0, 4)


def test_proposal_settings_are_checked_with_their_config_path():
    with pytest.raises(ValueError, match="evaluation.local_verification.query.proposals.nms_iou"):
        ProposalSettings(nms_iou=0.0)
    with pytest.raises(ValueError, match="evaluation.local_verification.query.proposals.max_side"):
        ProposalSettings(max_side=8)
