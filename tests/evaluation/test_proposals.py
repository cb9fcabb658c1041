"""Selective-search region proposals (seed selective_search_nms.py): the search, the filters, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.color
import skimage.feature
import skimage.segmentation
import skimage.util
from PIL import Image
from view_images import inside, sample

from isc.evaluation import proposals
from isc.evaluation.boxes import box_iou
from isc.evaluation.proposals import (
    ProposalSettings,
    Regions,
    group_regions,
    selective_search,
    selective_search_boxes,
)

# ------------------------------------------------------------------------- the search itself


def test_grouping_merges_by_similarity_and_sums_pixel_counts():
    # 6x6 labels: background A (28 px) around squares B (4 px) and C (4 px). B's and C's corners lie
    # inside A's box, so (A, B) and (A, C) are pairs; neither square's corners lie inside the other's.
    boxes = np.array([[0, 0, 5, 5], [1, 1, 2, 2], [3, 3, 4, 4]])
    sizes = np.array([28, 4, 4])
    # histograms: A and B alike (intersection 1), C unlike (0); size and fill terms are equal for both
    out = group_regions(Regions(boxes, sizes), np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), 36)
    assert out.boxes.tolist() == [*boxes.tolist(), [0, 0, 5, 5], [0, 0, 5, 5]]
    assert out.sizes.tolist() == [28, 4, 4, 32, 36]  # A + B first, then (A + B) + C
    # equal similarities: the pair inserted last, (A, C), merges first (the package's sorted(...)[-1])
    tied = group_regions(Regions(boxes, sizes), np.array([[1.0, 0.0]] * 3), 36)
    assert tied.sizes.tolist() == [28, 4, 4, 32, 36]
    assert tied.boxes.tolist()[3] == [0, 0, 5, 5]


def test_flat_rectangles_give_their_pixel_counts():
    image = np.full((120, 160, 3), (200, 40, 40), np.uint8)
    image[30:70, 50:110] = (20, 200, 60)  # 60 x 40 = 2400 px
    regions = selective_search(image, sigma=0.0)  # no smoothing: the segments are the two colours
    assert regions.boxes.tolist() == [[0, 0, 159, 119], [50, 30, 109, 69], [0, 0, 159, 119]]
    assert regions.sizes.tolist() == [19200 - 2400, 2400, 19200]


def _reference_search(rgb: np.ndarray, scale: float, sigma: float, min_size: int) -> list[tuple]:
    """A pixel-loop transcription of the selectivesearch package's algorithm (its dicts, its re-sort)."""
    labels = skimage.segmentation.felzenszwalb(
        skimage.util.img_as_float(rgb), scale=scale, sigma=sigma, min_size=min_size
    )
    R: dict[float, dict] = {}
    for y in range(labels.shape[0]):
        for x in range(labels.shape[1]):
            lab = float(labels[y, x])
            r = R.setdefault(lab, {"min_x": 0xFFFF, "min_y": 0xFFFF, "max_x": 0, "max_y": 0})
            r["min_x"], r["min_y"] = min(r["min_x"], x), min(r["min_y"], y)
            r["max_x"], r["max_y"] = max(r["max_x"], x), max(r["max_y"], y)
    hsv = skimage.color.rgb2hsv(rgb.astype(np.float64))
    lbp = np.stack([skimage.feature.local_binary_pattern(rgb[:, :, c], 8, 1.0) for c in range(3)], -1)
    for k, r in R.items():
        mask = labels == k
        r["size"] = int(mask.sum())
        r["hist_c"] = np.concatenate([np.histogram(hsv[mask][:, c], 25, (0.0, 255.0))[0] for c in range(3)])
        r["hist_c"] = r["hist_c"] / r["size"]
        r["hist_t"] = np.concatenate([np.histogram(lbp[mask][:, c], 10, (0.0, 1.0))[0] for c in range(3)])
        r["hist_t"] = r["hist_t"] / r["size"]
    imsize = labels.size

    def sim(a: dict, b: dict) -> float:
        bb = (max(a["max_x"], b["max_x"]) - min(a["min_x"], b["min_x"])) * (
            max(a["max_y"], b["max_y"]) - min(a["min_y"], b["min_y"])
        )
        return float(
            sum(min(u, v) for u, v in zip(a["hist_c"], b["hist_c"], strict=True))
            + sum(min(u, v) for u, v in zip(a["hist_t"], b["hist_t"], strict=True))
            + 1.0
            - (a["size"] + b["size"]) / imsize
            + 1.0
            - (bb - a["size"] - b["size"]) / imsize
        )

    def intersect(a: dict, b: dict) -> bool:
        xs = [a["min_x"] < v < a["max_x"] for v in (b["min_x"], b["max_x"])]
        ys = [a["min_y"] < v < a["max_y"] for v in (b["min_y"], b["max_y"])]
        return (xs[0] and ys[0]) or (xs[1] and ys[1]) or (xs[0] and ys[1]) or (xs[1] and ys[0])

    items = list(R.items())
    S = {
        (ai, bi): sim(ar, br)
        for n, (ai, ar) in enumerate(items[:-1])
        for bi, br in items[n + 1 :]
        if intersect(ar, br)
    }
    while S:
        i, j = sorted(S.items(), key=lambda kv: kv[1])[-1][0]
        t = max(R) + 1.0
        a, b = R[i], R[j]
        size = a["size"] + b["size"]
        R[t] = {
            "min_x": min(a["min_x"], b["min_x"]),
            "min_y": min(a["min_y"], b["min_y"]),
            "max_x": max(a["max_x"], b["max_x"]),
            "max_y": max(a["max_y"], b["max_y"]),
            "size": size,
            "hist_c": (a["hist_c"] * a["size"] + b["hist_c"] * b["size"]) / size,
            "hist_t": (a["hist_t"] * a["size"] + b["hist_t"] * b["size"]) / size,
        }
        gone = [k for k in S if i in k or j in k]
        for k in gone:
            del S[k]
        for k in [g for g in gone if g != (i, j)]:
            other = k[1] if k[0] in (i, j) else k[0]
            S[(t, other)] = sim(R[t], R[other])
    return [(r["min_x"], r["min_y"], r["max_x"], r["max_y"], r["size"]) for r in R.values()]


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_search_equals_a_transcription_of_the_package(name):
    image = sample(name)
    image.thumbnail((56, 56))
    rgb = np.asarray(image)
    expected = _reference_search(rgb, 500, 0.9, 10)
    regions = selective_search(rgb, 500, 0.9, 10)
    got = [(*map(int, b), int(s)) for b, s in zip(regions.boxes, regions.sizes, strict=True)]
    assert len(expected) > 10
    assert got == expected  # same regions, same merge order


# ------------------------------------------------------------------------------- the seed's filters


def test_filters_use_the_pixel_count_aspect_and_nms(monkeypatch):
    regions = Regions(
        np.array(
            [
                [10, 10, 109, 109],  # 100 x 100 box but 1500 px: dropped (a box-area filter keeps it)
                [200, 200, 249, 249],  # 2500 px: kept
                [200, 200, 249, 249],  # the same rect again (another segment): once
                [300, 10, 399, 39],  # 2800 px, w / h = 99 / 29 > 2: dropped
                [203, 203, 251, 251],  # IoU with the kept one above 0.5: suppressed (it is smaller)
                [400, 300, 459, 359],  # 2000 px exactly: kept
            ]
        ),
        np.array([1500, 2500, 2400, 2800, 2401, 2000]),
    )
    monkeypatch.setattr(proposals, "selective_search", lambda *a, **k: regions)
    image = Image.new("RGB", (640, 480))
    boxes = selective_search_boxes(image, ProposalSettings(max_proposals=None))
    # the seed's crop box (x, y, x + w, y + h) with w = max_x - min_x; largest first
    assert boxes.tolist() == [[400, 300, 459, 359], [200, 200, 249, 249]]
    assert selective_search_boxes(image, ProposalSettings(max_proposals=1)).tolist() == [[400, 300, 459, 359]]
    loose = selective_search_boxes(image, ProposalSettings(max_proposals=None, min_pixels=1000, max_aspect=4))
    assert len(loose) == 4  # the 1500-px region and the wide one come back
    assert selective_search_boxes(image, ProposalSettings(nms_iou=0.9, max_proposals=None)).shape == (3, 4)


def test_full_resolution_proposals_on_a_flat_scene():
    image = np.full((480, 640, 3), (200, 40, 40), np.uint8)
    image[100:180, 50:150] = (20, 200, 60)  # 8000 px: a proposal
    image[300:330, 400:430] = (40, 40, 220)  # 900 px: too small
    image[400:440, 300:500] = (240, 240, 20)  # 8000 px but 5 : 1: too wide
    boxes = selective_search_boxes(Image.fromarray(image), ProposalSettings(sigma=0.0))
    assert boxes.tolist() == [[50, 100, 149, 179]]  # merges with the background span the frame: dropped


@pytest.mark.slow
@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_selective_search_filters_hold_on_photos(name):
    image = sample(name).resize((320, 240), Image.Resampling.BILINEAR)
    w, h = image.size
    boxes = selective_search_boxes(image, ProposalSettings(max_proposals=None))
    assert boxes.dtype == np.int64 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) >= 1 and inside(boxes, w, h)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (bw <= 2.0 * bh).all() and (bh <= 2.0 * bw).all()
    iou = box_iou(boxes + [0, 0, 1, 1], boxes + [0, 0, 1, 1])
    np.fill_diagonal(iou, 0.0)
    assert iou.max(initial=0.0) <= 0.5
    assert (box_iou(boxes, np.array([[0, 0, w, h]]))[:, 0] <= 0.9).all()
    assert (np.diff(bw * bh) <= 0).all()  # largest first
    assert np.array_equal(boxes, selective_search_boxes(image, ProposalSettings(max_proposals=None)))
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_options_and_image_modes():
    image = sample("astronaut").resize((160, 160))
    small = selective_search_boxes(image, ProposalSettings(max_side=64, min_pixels=500))
    assert len(small) >= 1 and inside(small, 160, 160)  # pixel counts scaled back to the original's
    assert selective_search_boxes(image, ProposalSettings(max_proposals=0)).shape == (0, 4)
    for mode in ("L", "P", "RGBA"):
        assert inside(selective_search_boxes(image.convert(mode), ProposalSettings(max_side=64)), 160, 160)
    # A flat image has one segment, the whole frame, which is excluded.
    assert selective_search_boxes(Image.new("RGB", (200, 150), (90, 120, 30))).shape == (0, 4)


def test_disabled_settings_give_no_proposals():
    assert selective_search_boxes(sample("astronaut"), ProposalSettings(enabled=False)).shape == (0, 4)


def test_proposal_settings_are_checked_with_their_config_path():
    with pytest.raises(ValueError, match="evaluation.local_verification.query.proposals.nms_iou"):
        ProposalSettings(nms_iou=0.0)
    with pytest.raises(ValueError, match="evaluation.local_verification.query.proposals.max_side"):
        ProposalSettings(max_side=8)
    with pytest.raises(ValueError, match="evaluation.local_verification.query.proposals.min_pixels"):
        ProposalSettings(min_pixels=-1)
    with pytest.raises(ValueError, match="evaluation.local_verification.query.proposals.max_proposals"):
        ProposalSettings(max_proposals=-1)
