"""Pixel-value copy edits: colour jitter, blur, greyscale, darkening, tint, pixelization, pixel
shuffling and JPEG re-encoding."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps, ImageStat

from isc.augment.core import as_color, as_range, random_color, to_rgb, uniform
from isc.augment.geometric import resampling

_LUMA = np.array([0.299, 0.587, 0.114])


def _hue_matrix(turns: float) -> np.ndarray:
    """Rotation of RGB about the grey axis (the CSS/SVG ``hue-rotate`` matrix), luma-preserving."""
    c, s = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
    return np.array(
        [
            [0.213 + c * 0.787 - s * 0.213, 0.715 - c * 0.715 - s * 0.715, 0.072 - c * 0.072 + s * 0.928],
            [0.213 - c * 0.213 + s * 0.143, 0.715 + c * 0.285 + s * 0.140, 0.072 - c * 0.072 - s * 0.283],
            [0.213 - c * 0.213 - s * 0.787, 0.715 - c * 0.715 + s * 0.715, 0.072 + c * 0.928 + s * 0.072],
        ]
    )


def apply_affine(img: Image.Image, m: np.ndarray, offset: np.ndarray) -> Image.Image:
    """``x -> m @ x + offset`` on every RGB pixel in one PIL pass (clipped to 0..255)."""
    matrix = tuple(float(v) for v in np.concatenate([m, offset[:, None]], axis=1).ravel())
    return to_rgb(img).convert("RGB", matrix)


class ColorJitter:
    """torchvision ``ColorJitter`` ranges (factors ``1 +- b``, hue ``+- h`` turns, random order), with
    all draws from ``rng``.

    Brightness, contrast, saturation and hue are all affine maps of RGB, so the four are composed in
    the drawn order and applied in a single pass (about 15x faster than four PIL/torchvision passes;
    it differs only where torchvision would clip between steps). Hue turns about the grey axis
    instead of shifting HSV hue: same effect on colours, no HSV round trip.
    """

    def __init__(
        self, brightness: float = 0.5, contrast: float = 0.5, saturation: float = 0.3, hue: float = 0.2
    ) -> None:
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness = (max(0.0, 1 - brightness), 1 + brightness)
        self.contrast = (max(0.0, 1 - contrast), 1 + contrast)
        self.saturation = (max(0.0, 1 - saturation), 1 + saturation)
        self.hue = (-float(hue), float(hue))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        order = rng.permutation(4)
        factors = [uniform(rng, r) for r in (self.brightness, self.contrast, self.saturation, self.hue)]
        m, o = np.eye(3), np.zeros(3)
        mean = None
        eye, grey = np.eye(3), np.outer(np.ones(3), _LUMA)
        for op in order:
            f = factors[op]
            if op == 0:
                step, shift = f * eye, np.zeros(3)
            elif op == 1:
                if mean is None:
                    mean = np.asarray(ImageStat.Stat(img).mean[:3])
                cur = float(_LUMA @ np.clip(m @ mean + o, 0, 255))
                step, shift = f * eye, np.full(3, (1 - f) * round(cur))
            elif op == 2:
                step, shift = f * eye + (1 - f) * grey, np.zeros(3)
            else:
                step, shift = _hue_matrix(f), np.zeros(3)
            m, o = step @ m, step @ o + shift
        return apply_affine(img, m, o)

    def __repr__(self) -> str:
        return (
            f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue})"
        )


def _gaussian_kernel3(sigma: float) -> ImageFilter.Kernel:
    g = math.exp(-1.0 / (2 * sigma * sigma))
    w = [g, 1.0, g]
    return ImageFilter.Kernel((3, 3), [a * b for a in w for b in w], scale=sum(w) ** 2)


# variance (full-res px^2) added by a 2x2 box reduce followed by bilinear upsampling x2 (measured)
_HALF_RES_VARIANCE = 0.75


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """Fast Gaussian blur of standard deviation ``sigma`` (pixels), about 2x PIL's ``GaussianBlur``.

    sigma < 0.85: 3x3 Gaussian kernel (truncated at 1 px, where the tail is small);
    sigma >= 0.85: blur at half resolution by ``sqrt(sigma^2 - 0.75) / 2`` and upsample bilinearly,
    the reduce and upsample supplying the remaining variance.
    """
    img = to_rgb(img)
    w, h = img.size
    if sigma <= 0.05:
        return img.copy()
    if sigma < 0.85 or min(w, h) < 8:
        return img.filter(_gaussian_kernel3(sigma) if sigma < 0.85 else ImageFilter.GaussianBlur(sigma))
    small = img.reduce(2)
    rest = math.sqrt(max(sigma * sigma - _HALF_RES_VARIANCE, 0.0)) / 2
    if rest > 0.05:
        small = small.filter(ImageFilter.GaussianBlur(rest))
    return small.resize((w, h), Image.Resampling.BILINEAR)


class GaussianBlur:
    """Gaussian blur with standard deviation (pixels) drawn from ``sigma``.

    ``exact=False`` (default) uses :func:`gaussian_blur`, twice as fast as PIL's filter at 256 px
    and within a few percent of its sigma; ``exact=True`` uses PIL's ``GaussianBlur``.
    """

    def __init__(self, sigma: float | Sequence[float] = (0.1, 2.0), exact: bool = False) -> None:
        self.sigma, self.exact = as_range(sigma), exact

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        sigma = uniform(rng, self.sigma)
        if self.exact:
            return to_rgb(img).filter(ImageFilter.GaussianBlur(sigma))
        return gaussian_blur(img, sigma)

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma}, exact={self.exact})"


class Grayscale:
    """Luma greyscale kept as 3 equal channels, so shapes stay RGB downstream."""

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return to_rgb(img).convert("L").convert("RGB")

    def __repr__(self) -> str:
        return "Grayscale()"


class Brightness:
    """Scale brightness by a factor drawn from ``factor`` (< 1 darkens: the D2LV ``dark`` set)."""

    def __init__(self, factor: float | Sequence[float] = (0.1, 0.5)) -> None:
        self.factor = as_range(factor)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return apply_affine(img, uniform(rng, self.factor) * np.eye(3), np.zeros(3))

    def __repr__(self) -> str:
        return f"Brightness(factor={self.factor})"


class Colorize:
    """Tint: blend the image with a three-colour map of its luminance (``black`` -> ``color`` -> ``white``).

    ``strength`` is the blend weight of the tinted version; ``color=None`` draws a random mid tone, which
    gives sepia/cyanotype-looking copies, also from greyscale inputs. ``black``/``white`` default to
    black and white (the tint keeps the tonal range); ``None`` draws them too: with ``strength`` 1 that
    is D2LV's ``RandomColorize`` (``ImageOps.colorize`` with three random colours, false-colour copies).
    """

    def __init__(
        self,
        strength: float | Sequence[float] = (0.3, 0.8),
        color: Sequence[int] | None = None,
        black: Sequence[int] | None = (0, 0, 0),
        white: Sequence[int] | None = (255, 255, 255),
    ) -> None:
        self.strength, self.color = as_range(strength), as_color(color)
        self.black, self.white = as_color(black), as_color(white)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        strength = uniform(rng, self.strength)
        color = random_color(rng) if self.color is None else self.color
        black = random_color(rng) if self.black is None else self.black
        white = random_color(rng) if self.white is None else self.white
        tinted = ImageOps.colorize(img.convert("L"), black=black, white=white, mid=color)
        return tinted if strength >= 1.0 else Image.blend(img, tinted, strength)

    def __repr__(self) -> str:
        return (
            f"Colorize(strength={self.strength}, color={self.color}, black={self.black}, white={self.white})"
        )


class Pixelize:
    """Downscale by ``ratio`` and scale back up: box down / nearest up (the defaults) gives visible blocks.

    augly's ``pixelization``, which D2LV calls, resizes both ways with PIL's default filter (bicubic):
    ``down="bicubic", up="bicubic"`` reproduces that softer, blurred look.
    """

    def __init__(
        self, ratio: float | Sequence[float] = (0.1, 0.5), down: str = "box", up: str = "nearest"
    ) -> None:
        self.ratio = as_range(ratio)
        if self.ratio[0] <= 0:
            raise ValueError("ratio must be positive")
        self.down, self.up = resampling(down), resampling(up)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        w, h = img.size
        r = uniform(rng, self.ratio)
        small = img.resize((max(1, round(w * r)), max(1, round(h * r))), self.down)
        return small.resize((w, h), self.up)

    def __repr__(self) -> str:
        return f"Pixelize(ratio={self.ratio}, down={self.down.name.lower()}, up={self.up.name.lower()})"


class ShufflePixels:
    """Permute ``int(factor * pixels)`` randomly chosen pixels among themselves (augly's edit, without
    its ``np.random.seed(10)`` call that resets global state and repeats the same choice)."""

    def __init__(self, factor: float | Sequence[float] = (0.05, 0.35)) -> None:
        self.factor = as_range(factor)
        if not 0.0 <= self.factor[0] <= self.factor[1] <= 1.0:
            raise ValueError(f"factor must be within [0, 1], got {list(self.factor)}")

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        arr = np.array(to_rgb(img))
        flat = arr.reshape(-1, 3)
        n = int(uniform(rng, self.factor) * flat.shape[0])
        if n < 2:
            return to_rgb(img)
        idx = rng.choice(flat.shape[0], size=n, replace=False)
        flat[idx] = flat[rng.permutation(idx)]
        return Image.fromarray(arr)

    def __repr__(self) -> str:
        return f"ShufflePixels(factor={self.factor})"


class JpegQuality:
    """Re-encode as JPEG at a quality drawn from ``quality`` (in memory, no file round trip)."""

    def __init__(self, quality: int | Sequence[int] = (10, 50)) -> None:
        lo, hi = as_range(quality)
        if not 1 <= lo <= hi <= 95:
            raise ValueError("quality must be within [1, 95]")
        self.quality = (int(lo), int(hi))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        q = int(rng.integers(self.quality[0], self.quality[1] + 1))
        buf = io.BytesIO()
        to_rgb(img).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        with Image.open(buf) as out:
            return out.convert("RGB")

    def __repr__(self) -> str:
        return f"JpegQuality(quality={self.quality})"
