"""Geometric copy edits: crop, rotation, perspective, padding, flip.

Implemented directly on PIL with parameters drawn from the explicit generator: torchvision's random
transforms draw from torch's global generator, and PIL is faster at 256 px than the tensor path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from isc.augment.core import as_color, as_range, as_size, random_color, to_rgb, uniform
from isc.augment.paste_boxes import moved, scaled, shifted


class RandomResizedCrop:
    """torchvision's RandomResizedCrop (area ``scale``, aspect ``ratio``) with an explicit generator.

    Cropping and resizing happen in one PIL call (``resize(box=...)``), and running it first means
    every later edit works on ``size`` pixels rather than the full source. ``size=None`` keeps the
    crop at its native resolution (a plain random crop, for query-style edits).
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = 256,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size = None if size is None else as_size(size)
        self.scale, self.ratio = as_range(scale), as_range(ratio)

    def params(self, w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Box ``(left, top, crop_w, crop_h)``, same algorithm as torchvision's ``get_params``."""
        area = w * h
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * uniform(rng, self.scale)
            aspect = math.exp(uniform(rng, log_ratio))
            cw = round(math.sqrt(target_area * aspect))
            ch = round(math.sqrt(target_area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(rng.integers(0, h - ch + 1))
                left = int(rng.integers(0, w - cw + 1))
                return left, top, cw, ch
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, max(1, min(h, round(w / self.ratio[0])))
        elif in_ratio > self.ratio[1]:
            ch, cw = h, max(1, min(w, round(h * self.ratio[1])))
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        left, top, cw, ch = self.params(*img.size, rng)
        box = (left, top, left + cw, top + ch)
        if self.size is None:
            moved(shifted(-left, -top), (cw, ch))
            return img.crop(box)
        moved(scaled(self.size[0] / cw, self.size[1] / ch, -left, -top), self.size)
        return img.resize(self.size, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class Rotate:
    """Rotate by an angle drawn from ``degrees`` (``50`` means [-50, 50]).

    ``expand`` grows the canvas to keep the corners (ISC queries show both styles); the uncovered
    area is filled with ``fill`` (``None``: a random colour per call). ``resample`` defaults to
    nearest like torchvision's RandomRotation and augly's rotate (and it is 15x faster than bilinear
    in PIL).
    """

    def __init__(
        self,
        degrees: float | Sequence[float] = 50.0,
        expand: bool = False,
        fill: Sequence[int] | None = (0, 0, 0),
        resample: str = "nearest",
    ) -> None:
        self.degrees, self.expand, self.fill = as_range(degrees, symmetric=True), expand, as_color(fill)
        self.resample = resampling(resample)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        angle = uniform(rng, self.degrees)
        fill = random_color(rng) if self.fill is None else self.fill
        out = to_rgb(img).rotate(angle, self.resample, expand=self.expand, fillcolor=fill)
        if angle != 0.0:  # a rotated paste is no axis-aligned rectangle
            moved(None, out.size)
        return out

    def __repr__(self) -> str:
        return f"Rotate(degrees={self.degrees}, expand={self.expand}, fill={self.fill})"


def resampling(name: str) -> Image.Resampling:
    """``"nearest" | "box" | "bilinear" | "bicubic"`` -> PIL filter (YAML-friendly).

    ``bicubic`` is what augly and the D2LV scripts get from PIL's ``resize`` default.
    """
    try:
        return {
            "nearest": Image.Resampling.NEAREST,
            "box": Image.Resampling.BOX,
            "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC,
        }[name]
    except KeyError:
        raise ValueError(f"resample must be nearest, box, bilinear or bicubic, got {name!r}") from None


def perspective_coeffs(start: np.ndarray, end: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE data so that the points ``start`` of the input land on ``end`` in the output."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((xs, ys), (xe, ye)) in enumerate(zip(start, end, strict=True)):
        a[2 * i] = [xe, ye, 1, 0, 0, 0, -xs * xe, -xs * ye]
        a[2 * i + 1] = [0, 0, 0, xe, ye, 1, -ys * xe, -ys * ye]
        b[2 * i], b[2 * i + 1] = xs, ys
    return tuple(float(v) for v in np.linalg.solve(a, b))


class Perspective:
    """Move each corner by a Gaussian offset, as if the picture were re-photographed.

    ``sigma`` is a fraction of the image side, or pixels with ``unit="px"`` (augly's
    ``perspective_transform`` and D2LV's 0-50 px); this keeps augly's model with explicit randomness
    (augly draws the offsets from a fixed seed). Offsets are clipped to ±0.45 of the side so the
    quad never folds over. The uncovered border stays ``fill`` (D2LV keeps the black border).
    """

    def __init__(
        self,
        sigma: float | Sequence[float] = (0.02, 0.1),
        fill: Sequence[int] = (0, 0, 0),
        resample: str = "bilinear",
        unit: str = "fraction",
    ) -> None:
        if unit not in ("fraction", "px"):
            raise ValueError(f"unit must be fraction or px, got {unit!r}")
        self.sigma, self.fill, self.resample = as_range(sigma), as_color(fill), resampling(resample)
        self.unit = unit

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        w, h = img.size
        s = uniform(rng, self.sigma)
        if w < 2 or h < 2:
            return img
        scale = np.array([1.0, 1.0]) if self.unit == "px" else np.array([w, h], dtype=float)
        limit = 0.45 * np.array([w, h], dtype=float)
        offsets = np.clip(rng.normal(0.0, s, size=(4, 2)) * scale, -limit, limit)
        start = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=float)
        end = start + offsets
        coeffs = perspective_coeffs(start, end)
        if np.any(offsets != 0.0):  # a warped paste is no rectangle
            moved(None, img.size)
        return img.transform(
            img.size, Image.Transform.PERSPECTIVE, coeffs, self.resample, fillcolor=self.fill
        )

    def __repr__(self) -> str:
        return f"Perspective(sigma={self.sigma}, unit={self.unit!r}, fill={self.fill})"


class Pad:
    """Add borders: each side gets ``amount`` (fraction of width/height) of a uniform colour.

    ``color=None`` draws a random colour per call (the D2LV edit). By default all four sides draw
    their own amount; ``symmetric`` draws one for left = right and one for top = bottom, as augly's
    ``pad(w_factor, h_factor)`` that D2LV calls.
    """

    def __init__(
        self,
        amount: float | Sequence[float] = (0.0, 0.3),
        color: Sequence[int] | None = None,
        symmetric: bool = False,
    ) -> None:
        self.amount, self.color, self.symmetric = as_range(amount), as_color(color), symmetric

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        w, h = img.size
        if self.symmetric:
            left = right = int(uniform(rng, self.amount) * w)
            top = bottom = int(uniform(rng, self.amount) * h)
        else:
            left, right = (round(uniform(rng, self.amount) * w) for _ in range(2))
            top, bottom = (round(uniform(rng, self.amount) * h) for _ in range(2))
        color = random_color(rng) if self.color is None else self.color
        canvas = Image.new("RGB", (w + left + right, h + top + bottom), color)
        canvas.paste(img, (left, top))
        moved(shifted(left, top), canvas.size)
        return canvas

    def __repr__(self) -> str:
        return f"Pad(amount={self.amount}, color={self.color}, symmetric={self.symmetric})"


class HorizontalFlip:
    """Mirror left-right (wrap in ``RandomApply`` for the usual p=0.5)."""

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        w = img.width
        moved(lambda b: (w - b[2], b[1], w - b[0], b[3]), img.size)
        return to_rgb(img).transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    def __repr__(self) -> str:
        return "HorizontalFlip()"
