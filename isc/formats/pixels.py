"""Pixel-mode conversion shared by image loading and the copy edits (numpy + Pillow only, no torch).

One ``to_rgb`` for the whole project, so an image with transparency looks the same whether it is loaded
for evaluation or edited into a training copy.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["BACKGROUND", "to_rgb"]

BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited onto white: what a viewer (and so a copier's screenshot) shows."""


def _to_uint8_grey(array: np.ndarray, mode: str) -> np.ndarray:
    """Map integer / float greyscale to 0..255 by scaling (never clipping 16-bit data to white)."""
    array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if mode.startswith("I") and lo >= 0 and hi <= 65535:  # Pillow's 16-bit modes (and "I" from 16-bit files)
        scaled = array / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = array * 255.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        scaled = array
    else:  # out-of-range data (signed, 32-bit, HDR float): stretch min..max
        scaled = (array - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(array)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited onto :data:`BACKGROUND`.

    16-bit greyscale is scaled by 1/257 (65535 -> 255); float greyscale in [0, 1] by 255. Other ranges
    (signed or 32-bit integers, floats beyond 255) are stretched from their min..max.
    """
    mode = image.mode
    has_alpha = mode in {"RGBA", "RGBa", "LA", "La", "PA"} or (
        mode in {"P", "L", "RGB"} and "transparency" in image.info
    )
    if mode == "RGB" and not has_alpha:
        return image
    if mode.startswith("I") or mode == "F":
        grey = _to_uint8_grey(np.asarray(image), mode)
        return Image.fromarray(grey.reshape(image.height, image.width), mode="L").convert("RGB")
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
