"""Where "another image" comes from: pastes, underlays and overlays draw from a source.

A source is any callable ``source(rng, size) -> PIL.Image`` (``size`` is a (w, h) hint that lets a
source decode or render no more pixels than needed; ``None`` asks for the image at its own size, which
D2LV's underlay and overlay need because they scale relative to it). :class:`ImagePool` serves real
images (a list of paths or images, or a file listing paths); :class:`RandomTexture` renders procedural
textures so every recipe runs without data. Edits built without a source fall back to textures until
:func:`with_default_source` hands them real images (the fine-tuning data module does this with its
training images).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

from isc.augment.core import Size, to_rgb

ImageSource = Callable[[np.random.Generator, Size | None], Image.Image]
T = TypeVar("T")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class RandomTexture:
    """Smooth random colour field: a k x k grid upscaled bicubically (k=2: a gradient).

    The grid varies around a random base colour, mostly in brightness with a little chroma, so it
    looks more like an out-of-focus photo than confetti; about 0.2 ms at 256 px. ``size=None`` (an
    image "at its own size") renders ``native``: a stand-in for a photo when no real images are given.
    """

    def __init__(self, cells: Sequence[int] = (2, 10), native: Sequence[int] = (640, 480)) -> None:
        self.cells = (int(cells[0]), int(cells[1]))
        self.native = (int(native[0]), int(native[1]))

    def __call__(self, rng: np.random.Generator, size: Size | None = (256, 256)) -> Image.Image:
        size = self.native if size is None else size
        k = int(rng.integers(self.cells[0], self.cells[1] + 1))
        base = rng.uniform(30, 225, size=3)
        luma = rng.normal(0, 1, size=(k, k, 1)) * rng.uniform(15, 70)
        chroma = rng.normal(0, 1, size=(k, k, 3)) * rng.uniform(0, 40)
        grid = np.clip(base + luma + chroma, 0, 255).astype(np.uint8)
        return Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)

    def scaled(
        self, rng: np.random.Generator, scale: float, resample: Image.Resampling = Image.Resampling.BICUBIC
    ) -> Image.Image | None:
        """The ``native`` texture at ``scale`` of its size, rendered at that size (see :func:`draw_scaled`)."""
        box = (int(self.native[0] * scale), int(self.native[1] * scale))
        return self(rng, box) if min(box) >= 1 else None

    def __repr__(self) -> str:
        return f"RandomTexture(cells={self.cells}, native={self.native})"


def synthetic_image(rng: np.random.Generator, size: Size = (500, 375)) -> Image.Image:
    """Photo-like test image: textured background, random shapes with edges, a little noise.

    Used by tests and benchmarks (and anyone without data) as a stand-in for a DISC21 photo.
    """
    w, h = size
    img = RandomTexture((2, 6))(rng, size)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, x1 = sorted(rng.integers(-w // 4, w + w // 4, size=2).tolist())
        y0, y1 = sorted(rng.integers(-h // 4, h + h // 4, size=2).tolist())
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            pts = [(int(rng.integers(0, max(1, w))), int(rng.integers(0, max(1, h)))) for _ in range(3)]
            draw.polygon(pts, fill=color)
    noise = rng.normal(0, 6, size=(h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


class ImagePool:
    """Uniformly pick one of a fixed set of images (e.g. DISC21 training images for underlays).

    Give ``images`` (paths or PIL images), and/or ``paths_file`` (one path per line; relative paths
    are taken from ``root``, else from the file's folder), and/or ``root`` alone (every image under
    it). JPEGs are decoded at reduced scale when the wanted size allows (PIL draft mode).
    """

    def __init__(
        self,
        images: Sequence[str | os.PathLike[str] | Image.Image] | None = None,
        paths_file: str | os.PathLike[str] | None = None,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        items: list[str | Image.Image] = [x if isinstance(x, Image.Image) else str(x) for x in (images or [])]
        if paths_file is not None:
            base = Path(root) if root is not None else Path(paths_file).parent
            for line in Path(paths_file).read_text().splitlines():
                if line.strip():
                    items.append(str(base / line.strip()))
        elif root is not None and not items:
            items.extend(
                sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            )
        if not items:
            raise ValueError("ImagePool is empty: give images, a paths_file or a root with images")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __call__(self, rng: np.random.Generator, size: Size | None = None) -> Image.Image:
        item = self.items[int(rng.integers(len(self.items)))]
        if isinstance(item, Image.Image):
            return to_rgb(item)
        try:
            with Image.open(item) as img:
                if size is not None:
                    img.draft("RGB", size)
                out = to_rgb(img)
                return out.copy() if out is img else out
        except OSError as e:
            raise OSError(f"ImagePool could not read {item!r}: {e}") from e

    def scaled(
        self, rng: np.random.Generator, scale: float, resample: Image.Resampling = Image.Resampling.BICUBIC
    ) -> Image.Image | None:
        """One image resized to ``scale`` of its own size; a JPEG is decoded at reduced scale (draft).

        Same draw as ``__call__``; ``None`` when that is under one pixel. See :func:`draw_scaled`.
        """
        item = self.items[int(rng.integers(len(self.items)))]
        if isinstance(item, Image.Image):
            return _resized(to_rgb(item), scale, resample)
        try:
            with Image.open(item) as img:
                box = (int(img.width * scale), int(img.height * scale))
                if min(box) < 1:
                    return None
                img.draft("RGB", box)  # decodes at 1/2, 1/4 or 1/8 when that still covers box
                return to_rgb(img).resize(box, resample)
        except OSError as e:
            raise OSError(f"ImagePool could not read {item!r}: {e}") from e

    def __repr__(self) -> str:
        return f"ImagePool({len(self.items)} images)"


def _resized(img: Image.Image, scale: float, resample: Image.Resampling) -> Image.Image | None:
    box = (int(img.width * scale), int(img.height * scale))
    return img.resize(box, resample) if min(box) >= 1 else None


def draw_scaled(
    source: ImageSource,
    rng: np.random.Generator,
    scale: float,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image | None:
    """Another image resized to ``scale`` of its own size (``int`` of each side), or ``None`` if empty.

    Why: D2LV's underlay keeps 4-10 % of the other image's side, so decoding or rendering all of it
    would cost more than the rest of the copy; sources with a ``scaled`` method (:class:`ImagePool`,
    :class:`RandomTexture`) produce the small image directly, any other callable is asked for its
    image at its own size (``size=None``) and resized here.
    """
    fast = getattr(source, "scaled", None)
    if fast is not None:
        out: Image.Image | None = fast(rng, scale, resample)
        return out
    return _resized(to_rgb(source(rng, None)), scale, resample)


def as_source(source: ImageSource | Sequence[str | os.PathLike[str] | Image.Image] | None) -> ImageSource:
    """Normalise what a transform was given: ``None`` -> procedural textures, a list -> a pool."""
    if source is None:
        return RandomTexture()
    if isinstance(source, str | os.PathLike):
        raise TypeError(
            f"source={source!r}: give a list of images, or ImagePool(paths_file=...) / ImagePool(root=...)"
        )
    if callable(source):
        return source
    return ImagePool(list(source))


def fit(img: Image.Image, size: Size) -> Image.Image:
    """Scale to cover ``size`` and centre-crop: a background that fills the canvas."""
    img = to_rgb(img)
    if img.size == size:
        return img
    w, h = img.size
    tw, th = size
    s = max(tw / w, th / h)
    cw, ch = min(w, tw / s), min(h, th / s)
    left, top = (w - cw) / 2, (h - ch) / 2
    return img.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch), reducing_gap=3.0)


def _children(transform: object) -> list[object]:
    """Sub-transforms of the containers (Compose steps, RandomApply, OneOf), found by duck typing."""
    out: list[object] = [t for _, t in getattr(transform, "steps", [])]
    inner = getattr(transform, "transform", None)
    if inner is not None:
        out.append(inner)
    out.extend(getattr(transform, "transforms", None) or [])
    return out


def _bind(transform: object, source: ImageSource) -> int:
    n = 0
    if getattr(transform, "source_is_default", False):
        transform.source = source  # type: ignore[attr-defined]
        transform.source_is_default = False  # type: ignore[attr-defined]
        n += 1
    return n + sum(_bind(child, source) for child in _children(transform))


def with_default_source(transform: T, source: ImageSource) -> T:
    """A copy of ``transform`` in which every edit built without a source uses ``source``.

    Recipes are built from YAML before anyone knows the images (so their pastes default to textures);
    the caller that does know them (e.g. the fine-tuning data module with its training images) binds
    them here. Edits given an explicit source keep it, and the original ``transform`` is untouched.
    """
    out = copy.deepcopy(transform)
    _bind(out, source)
    return out


def uses_default_source(transform: object) -> bool:
    """Whether any edit in ``transform`` still draws procedural textures for want of a source."""
    return bool(getattr(transform, "source_is_default", False)) or any(
        uses_default_source(c) for c in _children(transform)
    )
