"""Edits that mix the image with other content: pastes onto/under other images, blends, emoji,
text, screenshot frames and meme captions.

"Another image" comes from a source (see :mod:`isc.augment.sources`); the default renders random
textures, so every edit works without data (and :func:`~isc.augment.sources.with_default_source`
swaps in real images later). Assets come from augly but are cached here, and all randomness comes
from the generator passed at call time. D2LV's underlay and overlay are :class:`ImageUnderlay` and
:class:`ImageOverlay`; the parameters of the published recipe are in ``docs/recipe.md``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import isc.augment.assets as assets
from isc.augment.core import Size, as_color, as_range, as_size, random_color, to_rgb, uniform
from isc.augment.geometric import resampling
from isc.augment.paste_boxes import moved, pasted, scaled
from isc.augment.sources import ImageSource, as_source, draw_scaled, fit

SourceArg = ImageSource | Sequence[str | os.PathLike[str] | Image.Image] | None

_WORD_TEXT = (  # short caption words for memes
    "when you me that moment lol omg nope yes cat dog monday friday coffee life be like why not so "
    "much wow hello world best day ever mood real fake news guess what true story my face nobody no "
    "one else literally me again every time finally weekend boss level win fail"
)
WORDS = tuple(_WORD_TEXT.split())


def _scaled_box(w: int, h: int, area: float, aspect: float = 1.0) -> Size:
    """(w, h) covering ``area`` of a w x h canvas with ``aspect`` = new_w/new_h, within the canvas."""
    nh = math.sqrt(area * w * h / aspect)
    nw = nh * aspect
    k = min(1.0, w / nw, h / nh)
    return max(1, round(nw * k)), max(1, round(nh * k))


def _position(rng: np.random.Generator, canvas: Size, box: Size) -> tuple[int, int]:
    x = int(rng.integers(0, max(0, canvas[0] - box[0]) + 1))
    y = int(rng.integers(0, max(0, canvas[1] - box[1]) + 1))
    return x, y


class PasteOnBackground:
    """Shrink the image and paste it onto another image ("underlay" / scale-and-paste).

    ``scale`` is the fraction of the canvas *area* the copy covers (as in RandomResizedCrop), so
    0.04-0.1 leaves the copy 20-32 % of the side. The canvas keeps the input size and the copy keeps
    its aspect ratio.
    """

    def __init__(self, scale: float | Sequence[float] = (0.04, 0.1), source: SourceArg = None) -> None:
        self.scale, self.source = as_range(scale), as_source(source)
        self.source_is_default = source is None

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        w, h = img.size
        # a copy: a pool of in-memory images hands out its own image when it already has the size
        canvas = fit(self.source(rng, (w, h)), (w, h)).copy()
        box = _scaled_box(w, h, uniform(rng, self.scale), w / h)
        x, y = _position(rng, (w, h), box)
        canvas.paste(img.resize(box, Image.Resampling.BILINEAR, reducing_gap=3.0), (x, y))
        pasted((x, y, x + box[0], y + box[1]), (w, h))
        return canvas

    def __repr__(self) -> str:
        return f"PasteOnBackground(scale={self.scale}, source={self.source!r})"


class PasteOver:
    """Paste another image over part of this one (covering ``scale`` of the area, aspect from
    ``ratio``) with an opacity drawn from ``opacity``."""

    def __init__(
        self,
        scale: float | Sequence[float] = (0.05, 0.3),
        opacity: float | Sequence[float] = (0.6, 1.0),
        ratio: Sequence[float] = (0.5, 2.0),
        source: SourceArg = None,
    ) -> None:
        self.scale, self.opacity, self.ratio = as_range(scale), as_range(opacity), as_range(ratio)
        self.source, self.source_is_default = as_source(source), source is None

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img).copy()
        w, h = img.size
        aspect = math.exp(uniform(rng, (math.log(self.ratio[0]), math.log(self.ratio[1]))))
        box = _scaled_box(w, h, uniform(rng, self.scale), aspect)
        patch = fit(self.source(rng, box), box)
        alpha = round(255 * uniform(rng, self.opacity))
        img.paste(patch, _position(rng, (w, h), box), Image.new("L", box, alpha))
        return img

    def __repr__(self) -> str:
        return f"PasteOver(scale={self.scale}, opacity={self.opacity}, source={self.source!r})"


class OpacityOverlay:
    """Show the image with opacity ``alpha`` over another image: ``alpha * img + (1-alpha) * other``.

    alpha = 1 leaves the copy unchanged; low values make it a faint ghost on a different picture
    (the D2LV ``opa`` set draws alpha from 0.2-1.0). By default the other image is scaled to cover the
    copy and the output keeps the copy's size; with ``size`` both are first squashed to ``size`` (an
    int or ``[h, w]``), as D2LV's ``random_image_opaque`` does with 256.
    """

    def __init__(
        self,
        opacity: float | Sequence[float] = (0.2, 1.0),
        source: SourceArg = None,
        size: int | Sequence[int] | None = None,
        resample: str = "bicubic",
    ) -> None:
        self.opacity, self.source = as_range(opacity), as_source(source)
        self.source_is_default = source is None
        self.size = None if size is None else as_size(size)
        self.resample = resampling(resample)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        if self.size is None:
            other = fit(self.source(rng, img.size), img.size)
        else:
            other = to_rgb(self.source(rng, self.size)).resize(self.size, self.resample)
            moved(scaled(self.size[0] / img.width, self.size[1] / img.height), self.size)
            img = img.resize(self.size, self.resample)
        return Image.blend(other, img, uniform(rng, self.opacity))

    def __repr__(self) -> str:
        return f"OpacityOverlay(opacity={self.opacity}, size={self.size}, source={self.source!r})"


class ImageUnderlay:
    """D2LV's "underlay": paste a small patch of another image onto the copy, which keeps its frame.

    The other image, at its own size, is resized by ``scale`` (0.04-0.1 of its own width and height in
    the seed; ``u`` uses 0.2-0.3) and pasted with its top-left corner at ``(x_pos * w, y_pos * h)``
    of the copy (0-0.5: the top-left quarter); whatever passes the copy's border is cut off. The
    patch size follows the other image's resolution, not the copy's, exactly as in the seed; a patch
    under one pixel is no edit.
    """

    def __init__(
        self,
        scale: float | Sequence[float] = (0.04, 0.1),
        x_pos: float | Sequence[float] = (0.0, 0.5),
        y_pos: float | Sequence[float] = (0.0, 0.5),
        source: SourceArg = None,
        resample: str = "bicubic",
    ) -> None:
        self.scale, self.x_pos, self.y_pos = as_range(scale), as_range(x_pos), as_range(y_pos)
        self.source, self.source_is_default = as_source(source), source is None
        self.resample = resampling(resample)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        s, x, y = uniform(rng, self.scale), uniform(rng, self.x_pos), uniform(rng, self.y_pos)
        patch = draw_scaled(self.source, rng, s, self.resample)
        if patch is None:
            return img
        out = img.copy()
        out.paste(to_rgb(patch), (int(img.width * x), int(img.height * y)))
        return out

    def __repr__(self) -> str:
        return f"ImageUnderlay(scale={self.scale}, x_pos={self.x_pos}, y_pos={self.y_pos}, source={self.source!r})"


class ImageOverlay:
    """D2LV's "overlay": enlarge the copy and paste it onto another image, of which it covers a part.

    The copy is resized by ``scale`` (2.5-3.5 of its own size in the seed) and pasted with its
    top-left corner at ``(x_pos * W, y_pos * H)`` of the other image (0-0.5); the output is the other
    image at its own size, so it shows that image's top and left as background and as much of the
    enlarged copy as fits (the recipe's final resize then brings it to 256 x 256).
    """

    def __init__(
        self,
        scale: float | Sequence[float] = (2.5, 3.5),
        x_pos: float | Sequence[float] = (0.0, 0.5),
        y_pos: float | Sequence[float] = (0.0, 0.5),
        source: SourceArg = None,
        resample: str = "bicubic",
    ) -> None:
        self.scale, self.x_pos, self.y_pos = as_range(scale), as_range(x_pos), as_range(y_pos)
        self.source, self.source_is_default = as_source(source), source is None
        self.resample = resampling(resample)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        canvas = to_rgb(self.source(rng, None)).copy()
        s, x, y = uniform(rng, self.scale), uniform(rng, self.x_pos), uniform(rng, self.y_pos)
        box = (int(img.width * s), int(img.height * s))
        left, top = int(canvas.width * x), int(canvas.height * y)
        if box[0] < 1 or box[1] < 1:
            moved(None, canvas.size)  # the image is gone: an earlier paste has no box any more
            return canvas
        # only the part that lands on the canvas is resized: same pixels as resizing it all, less work
        vis = (min(box[0], canvas.width - left), min(box[1], canvas.height - top))
        if vis[0] < 1 or vis[1] < 1:
            moved(None, canvas.size)
            return canvas
        kx, ky = img.width / box[0], img.height / box[1]
        part = img.resize(vis, self.resample, box=(0.0, 0.0, vis[0] * kx, vis[1] * ky))
        canvas.paste(part, (left, top))
        pasted((left, top, left + vis[0], top + vis[1]), canvas.size)
        return canvas

    def __repr__(self) -> str:
        return f"ImageOverlay(scale={self.scale}, x_pos={self.x_pos}, y_pos={self.y_pos}, source={self.source!r})"


def _scale_alpha(alpha: Image.Image, opacity: float) -> Image.Image:
    if opacity >= 1.0:
        return alpha
    lut = [round(v * opacity) for v in range(256)]
    return alpha.point(lut)


class EmojiOverlay:
    """Paste a random emoji (augly's twemoji set by default, ``category`` e.g. ``smileys`` for one folder).

    The emoji's side is ``size`` x ``relative_to`` (``min_side`` of the image, or ``height`` as augly's
    ``overlay_emoji`` does) and its opacity is drawn from ``opacity``. Without ``x_pos``/``y_pos`` it
    lands fully inside the image; with them its top-left corner is at ``(x_pos * w, y_pos * h)`` and the
    part past the border is cut off, as in augly. An emoji under one pixel is no edit.
    """

    def __init__(
        self,
        size: float | Sequence[float] = (0.1, 0.4),
        opacity: float | Sequence[float] = (0.6, 1.0),
        emoji_dir: str | None = None,
        category: str | None = None,
        x_pos: float | Sequence[float] | None = None,
        y_pos: float | Sequence[float] | None = None,
        relative_to: str = "min_side",
    ) -> None:
        if relative_to not in ("min_side", "height"):
            raise ValueError(f"relative_to must be min_side or height, got {relative_to!r}")
        if (x_pos is None) != (y_pos is None):
            raise ValueError("give both x_pos and y_pos, or neither")
        self.size, self.opacity, self.emoji_dir, self.category = (
            as_range(size),
            as_range(opacity),
            emoji_dir,
            category,
        )
        self.x_pos = None if x_pos is None else as_range(x_pos)
        self.y_pos = None if y_pos is None else as_range(y_pos)
        self.relative_to = relative_to

    def _paths(self) -> tuple[str, ...]:
        if self.category is not None:
            return assets.emoji_paths(str(assets.augly_assets_dir() / "twemojis" / self.category))
        return assets.emoji_paths(self.emoji_dir)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        paths = self._paths()
        emoji = assets.load_rgba(paths[int(rng.integers(len(paths)))])
        ew, eh = emoji.size
        if self.relative_to == "height":  # augly: the emoji's height is size x the image's height
            side = round(uniform(rng, self.size) * img.height)
            box = (round(side * ew / eh), side)
        else:
            side = round(uniform(rng, self.size) * min(img.size))
            box = (side, round(side * eh / ew))
        opacity = uniform(rng, self.opacity)
        if self.x_pos is None or self.y_pos is None:
            xy = _position(rng, img.size, box)
        else:
            xy = (int(uniform(rng, self.x_pos) * img.width), int(uniform(rng, self.y_pos) * img.height))
        if min(box) < 1 or opacity <= 0.0:
            return img
        emoji = emoji.resize(box, Image.Resampling.BILINEAR, reducing_gap=2.0)
        out = img.copy()
        out.paste(emoji.convert("RGB"), xy, _scale_alpha(emoji.getchannel("A"), opacity))
        return out

    def __repr__(self) -> str:
        return (
            f"EmojiOverlay(size={self.size}, opacity={self.opacity}, category={self.category}, "
            f"x_pos={self.x_pos}, y_pos={self.y_pos}, relative_to={self.relative_to!r})"
        )


@functools.lru_cache(maxsize=64)
def _leading_chars(font_path: str, n: int) -> tuple[str, ...]:
    """What augly's ``OverlayText`` draws for indices ``0..n-1``: ``chr(points[i % len(points)])``."""
    points = assets.font_codepoints(font_path)
    return tuple(chr(points[i % len(points)]) for i in range(n))


class TextOverlay:
    """Draw random text: ``lines`` lines of ``length`` characters, in a random augly font or ``font``.

    Characters come from the font's own character list (as augly does, so glyphs exist and scripts vary
    like in ISC queries) unless ``words`` is given; ``charset=n`` keeps only the first ``n`` entries of
    augly's list, which is what augly's ``OverlayText`` draws from integer indices below ``n`` (D2LV:
    100). ``font_size`` is a fraction of min(w, h); ``color=None`` draws a random colour; the top-left
    of the text is at ``(x_pos * w, y_pos * h)``. No characters, a font under one pixel or opacity 0
    is no edit.
    """

    def __init__(
        self,
        font_size: float | Sequence[float] = (0.05, 0.2),
        length: Sequence[int] = (3, 15),
        lines: Sequence[int] = (1, 2),
        opacity: float | Sequence[float] = (0.6, 1.0),
        color: Sequence[int] | None = None,
        words: Sequence[str] | None = None,
        fonts_dir: str | None = None,
        font: str | None = None,
        charset: int | None = None,
        x_pos: float | Sequence[float] = (0.0, 0.8),
        y_pos: float | Sequence[float] = (0.0, 0.85),
    ) -> None:
        self.font_size, self.opacity = as_range(font_size), as_range(opacity)
        self.length = (int(length[0]), int(length[1]))
        self.lines = (int(lines[0]), int(lines[1]))
        if min(self.length) < 0 or min(self.lines) < 0:
            raise ValueError("length and lines must be non-negative")
        self.color, self.words, self.fonts_dir = as_color(color), (list(words) if words else None), fonts_dir
        self.font, self.charset = font, (None if charset is None else int(charset))
        if self.charset is not None and self.charset < 1:
            raise ValueError(f"charset must be >= 1, got {charset}")
        self.x_pos, self.y_pos = as_range(x_pos), as_range(y_pos)

    def _font_path(self, rng: np.random.Generator) -> str:
        if self.font is None:
            fonts = assets.font_paths(self.fonts_dir)
            return fonts[int(rng.integers(len(fonts)))]
        path = Path(self.font)
        if not path.is_absolute() and not path.exists():
            path = (Path(self.fonts_dir) if self.fonts_dir else assets.augly_assets_dir() / "fonts") / path
        return str(path)

    def _chars(self, font_path: str) -> tuple[str, ...]:
        if self.charset is None:
            return assets.font_chars(font_path)
        return _leading_chars(font_path, self.charset)

    def _text(self, rng: np.random.Generator, font_path: str) -> str:
        out = []
        for _ in range(int(rng.integers(self.lines[0], self.lines[1] + 1))):
            n = int(rng.integers(self.length[0], self.length[1] + 1))
            if self.words:
                out.append(
                    " ".join(self.words[int(i)] for i in rng.integers(len(self.words), size=max(1, n // 5)))
                )
            else:
                chars = self._chars(font_path)
                out.append("".join(chars[int(i)] for i in rng.integers(len(chars), size=n)))
        return "\n".join(out)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        w, h = img.size
        font_path = self._font_path(rng)
        size = round(uniform(rng, self.font_size) * min(w, h))
        text = self._text(rng, font_path)
        color = random_color(rng) if self.color is None else self.color
        alpha = round(255 * uniform(rng, self.opacity))
        xy = (uniform(rng, self.x_pos) * w, uniform(rng, self.y_pos) * h)
        if size < 1 or alpha <= 0 or not text.strip("\n"):
            return img
        font = assets.font(font_path, size)
        mask = Image.new("L", img.size, 0)
        ImageDraw.Draw(mask).multiline_text(xy, text, fill=alpha, font=font, spacing=max(1, font.size // 5))
        box = mask.getbbox()
        if box is None:  # nothing visible (e.g. only blank glyphs, or all of it past the border)
            return img
        out = img.copy()
        out.paste(color, box, mask.crop(box))  # blend only where text was drawn
        return out

    def __repr__(self) -> str:
        return (
            f"TextOverlay(font_size={self.font_size}, length={self.length}, lines={self.lines}, "
            f"opacity={self.opacity}, font={self.font!r}, charset={self.charset})"
        )


class ScreenshotFrame:
    """Put the image into a social-media screenshot (augly's web/mobile templates by default).

    The picture is scaled to fit the template's picture box and centred on black, like augly's
    ``overlay_onto_screenshot``; the output has the template's size.
    """

    def __init__(self, templates_dir: str | None = None) -> None:
        self.templates_dir = templates_dir

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        templates = assets.screenshot_templates(self.templates_dir)
        template, (x0, y0, x1, y1) = templates[int(rng.integers(len(templates)))]
        bw, bh = x1 - x0, y1 - y0
        k = min(bw / img.width, bh / img.height)
        size = (max(1, min(bw, round(img.width * k))), max(1, min(bh, round(img.height * k))))
        out = template.copy()
        out.paste((0, 0, 0), (x0, y0, x1, y1))
        at = (x0 + (bw - size[0]) // 2, y0 + (bh - size[1]) // 2)
        out.paste(img.resize(size, Image.Resampling.BILINEAR), at)
        pasted((at[0], at[1], at[0] + size[0], at[1] + size[1]), out.size)
        return out

    def __repr__(self) -> str:
        return "ScreenshotFrame()"


class MemeFormat:
    """Add a meme caption band above the image (augly's ``meme_format``, rewritten because it calls
    Pillow's removed ``getsize_multiline``).

    ``caption`` is the band height as a fraction of the image height; the text (random ``words``)
    is the largest size of the meme font that fits the band.
    """

    def __init__(
        self,
        caption: float | Sequence[float] = (0.15, 0.35),
        words: Sequence[str] | None = None,
        n_words: Sequence[int] = (1, 4),
        text_color: Sequence[int] = (0, 0, 0),
        bg_color: Sequence[int] | None = (255, 255, 255),
        font_path: str | None = None,
    ) -> None:
        self.caption, self.words = as_range(caption), list(words) if words else list(WORDS)
        self.n_words = (int(n_words[0]), int(n_words[1]))
        self.text_color, self.bg_color, self.font_path = as_color(text_color), as_color(bg_color), font_path

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        w, h = img.size
        band = max(12, round(uniform(rng, self.caption) * h))
        n = int(rng.integers(self.n_words[0], self.n_words[1] + 1))
        text = " ".join(self.words[int(i)] for i in rng.integers(len(self.words), size=n)).upper()
        bg = random_color(rng) if self.bg_color is None else self.bg_color
        meme = Image.new("RGB", (w, h + band), bg)
        meme.paste(img, (0, band))
        pasted((0, band, w, band + h), meme.size)
        draw = ImageDraw.Draw(meme)
        path = self.font_path or assets.meme_font_path()
        size = max(1, band - 10)
        for _ in range(8):  # shrink proportionally until the text fits the band
            left, top, right, bottom = draw.textbbox((0, 0), text, font=assets.font(path, size))
            tw, th = right - left, bottom - top
            k = min((w - 10) / max(tw, 1), (band - 10) / max(th, 1))
            if k >= 1.0 or size == 1:
                break
            size = max(1, min(size - 1, int(size * k)))
        f = assets.font(path, size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
        xy = ((w - (right - left)) / 2 - left, (band - (bottom - top)) / 2 - top)
        draw.text(xy, text, fill=self.text_color, font=f)
        return meme

    def __repr__(self) -> str:
        return f"MemeFormat(caption={self.caption})"
