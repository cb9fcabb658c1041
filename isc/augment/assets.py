"""augly's bundled assets (fonts, emoji, screenshot templates), located and cached once.

Only file paths are taken from augly: its functional API reloads assets from disk on every call
and two of its functions break on current numpy/Pillow, so the edits themselves live here.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pickle
from pathlib import Path

from PIL import Image, ImageFont


@functools.cache
def augly_assets_dir() -> Path:
    """``augly/assets`` without importing augly.utils (which pulls in iopath)."""
    spec = importlib.util.find_spec("augly")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("augly is needed for emoji, font and screenshot assets: pip install augly")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets"
    if not path.is_dir():
        raise FileNotFoundError(f"augly assets not found at {path}")
    return path


@functools.cache
def emoji_paths(directory: str | None = None) -> tuple[str, ...]:
    """All emoji PNGs (augly ships ~870 twemojis) under ``directory`` (default: all categories)."""
    root = Path(directory) if directory else augly_assets_dir() / "twemojis"
    paths = tuple(sorted(str(p) for p in root.rglob("*.png")))
    if not paths:
        raise FileNotFoundError(f"no emoji PNGs under {root}")
    return paths


@functools.cache
def load_rgba(path: str) -> Image.Image:
    """Decoded RGBA image, cached (emoji are 72x72, all of them fit in ~18 MB)."""
    with Image.open(path) as img:
        return img.convert("RGBA")


@functools.cache
def font_paths(directory: str | None = None) -> tuple[str, ...]:
    """TrueType fonts that come with a character list (augly's ``.pkl`` next to each ``.ttf``)."""
    root = Path(directory) if directory else augly_assets_dir() / "fonts"
    paths = tuple(sorted(str(p) for p in root.glob("*.ttf") if p.with_suffix(".pkl").exists()))
    if not paths:
        raise FileNotFoundError(f"no .ttf fonts with .pkl character lists under {root}")
    return paths


@functools.cache
def font_chars(path: str) -> tuple[str, ...]:
    """Characters the font can draw (augly pickles a list of code points per font)."""
    pkl = Path(path).with_suffix(".pkl")
    if pkl.exists():
        with open(pkl, "rb") as f:
            chars = tuple(chr(c) for c in pickle.load(f) if chr(c).isprintable() and not chr(c).isspace())
        if chars:
            return chars
    return tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


@functools.cache
def font_codepoints(path: str) -> tuple[int, ...]:
    """augly's raw code-point list for a font, in its order: ``OverlayText`` maps integer text to
    ``chr(list[i % len(list)])``, so recipes that draw indices (D2LV: 0-99) need the list unfiltered."""
    pkl = Path(path).with_suffix(".pkl")
    if not pkl.exists():
        raise FileNotFoundError(f"no augly character list {pkl} for font {path}")
    with open(pkl, "rb") as f:
        points = tuple(int(c) for c in pickle.load(f))
    if not points:
        raise ValueError(f"empty character list {pkl}")
    return points


@functools.lru_cache(maxsize=128)  # a FreeType face holds ~0.1 MB; loading one takes ~30 us
def font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, max(1, int(size)))


def meme_font_path() -> str:
    return str(augly_assets_dir() / "fonts" / "Raleway-ExtraBold.ttf")


@functools.cache
def screenshot_templates(
    directory: str | None = None,
) -> tuple[tuple[Image.Image, tuple[int, int, int, int]], ...]:
    """(template, bbox) pairs; ``bboxes.json`` gives where the picture goes in each template."""
    root = Path(directory) if directory else augly_assets_dir() / "screenshot_templates"
    boxes = json.loads((root / "bboxes.json").read_text())
    out = []
    for name in sorted(boxes):
        with Image.open(root / name) as img:
            template = img.convert("RGB")
        x0, y0, x1, y1 = (int(v) for v in boxes[name])
        out.append((template, (x0, y0, x1, y1)))
    return tuple(out)
