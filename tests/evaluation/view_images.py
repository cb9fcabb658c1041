"""Sample photos, synthetic pastes and a box check shared by the query-view tests (views, proposals, overlays)."""

from __future__ import annotations

import numpy as np
import skimage.data
from PIL import Image


def sample(name: str) -> Image.Image:
    array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]))


def paste(
    background: str, foreground: str, size: tuple[int, int], box: tuple[int, int, int, int]
) -> Image.Image:
    canvas = sample(background).resize(size, Image.Resampling.BILINEAR)
    x0, y0, x1, y1 = box
    canvas.paste(sample(foreground).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR), (x0, y0))
    return canvas


def inside(boxes: np.ndarray, width: int, height: int) -> bool:
    b = np.asarray(boxes).reshape(-1, 4)
    return bool(
        ((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= width) & (b[:, 3] <= height)).all()
        and ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
    )
