"""Box arithmetic of the query-view detectors: IoU and greedy NMS against a slow reference loop."""

from __future__ import annotations

import numpy as np
import pytest

from isc.evaluation.boxes import box_iou, nms

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
