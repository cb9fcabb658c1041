"""Call convention, seeding and composition for copy-edit transforms.

Every transform is a callable ``t(img, rng) -> img`` on PIL images: parameters are fixed in
``__init__`` (so Hydra's ``_target_`` can build it from YAML) and all randomness comes from the
``numpy.random.Generator`` passed at call time. Nothing touches global random state, so the same
generator state always gives the same bytes, whatever ran before and in whichever worker.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from isc.augment.paste_boxes import moved, scaled
from isc.formats.pixels import to_rgb  # one conversion for loading and editing (alpha on white)

Size = tuple[int, int]  # (width, height), PIL order
Range = tuple[float, float]


@runtime_checkable
class Transform(Protocol):
    """What every edit is: a pure function of the image and an explicit generator."""

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image: ...


# ----------------------------------------------------------------------------- seeding
def _key_to_int(key: int | str) -> int:
    # blake2b, not hash(): Python salts str hashes per process, which would break reproducibility
    tag = f"{type(key).__name__}:{key}".encode()
    return int.from_bytes(hashlib.blake2b(tag, digest_size=8).digest(), "little")


def rng_for(seed: int, *keys: int | str) -> np.random.Generator:
    """Generator for one (seed, image id, copy index, ...) tuple.

    Each key is hashed stably, so copy 7 of image ``T000123`` gets the same edits on any machine,
    in any worker and in any order of generation, and neighbouring ids get unrelated streams.
    """
    entropy = [_key_to_int(seed) if seed < 0 else int(seed)] + [_key_to_int(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


# ----------------------------------------------------------------------------- helpers


def as_range(value: float | Sequence[float], symmetric: bool = False) -> Range:
    """``x`` -> ``(x, x)`` (or ``(-x, x)`` when symmetric); ``[lo, hi]`` -> ``(lo, hi)``.

    Lets YAML say ``degrees: 50`` or ``sigma: [0.1, 2.0]`` with the same field.
    """
    if isinstance(value, int | float):
        v = float(value)
        return (-v, v) if symmetric else (v, v)
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise ValueError(f"range must be [low, high], got {list(value)}")
    return lo, hi


def uniform(rng: np.random.Generator, r: Range) -> float:
    """One draw from ``[lo, hi]``; always consumes exactly one number so streams stay aligned."""
    u = rng.random()
    return r[0] + (r[1] - r[0]) * u


def as_color(value: Sequence[int] | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    r, g, b = (int(v) for v in value)
    return r, g, b


def random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(0, 256, size=3))
    return r, g, b


def as_size(size: int | Sequence[int]) -> Size:
    """``256`` -> ``(256, 256)``; ``[h, w]`` (torchvision order) -> PIL ``(w, h)``."""
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = (int(v) for v in size)
    return w, h


# ----------------------------------------------------------------------------- composition
def _step_key(name: int | str) -> int:
    return zlib.crc32(str(name).encode()) if isinstance(name, str) else int(name)


class Compose:
    """Run steps in order, each with its own child generator.

    ``transforms`` is a list or an ordered mapping ``name -> transform`` (``None`` entries are
    skipped). Children are derived from one draw of ``rng`` plus the step's name (or index), so a
    recipe that overrides, disables or appends a step leaves the random choices of every other step
    unchanged: a variant's copy differs from the base copy only by what the variant changes.

    ``sources_file`` and ``original`` are metadata for generators, which the pipeline itself ignores:
    an optional text file listing the images this recipe is meant for (e.g. the face-rich subset), and
    an optional edit for the stored original of each class (D2LV's bw sets store greyscale originals;
    see :func:`generate_copies`).
    """

    def __init__(
        self,
        transforms: Sequence[Transform | None] | Mapping[str, Transform | None],
        sources_file: str | None = None,
        original: Transform | None = None,
    ) -> None:
        items = transforms.items() if hasattr(transforms, "items") else enumerate(transforms)
        self.steps: list[tuple[int | str, Transform]] = [(k, t) for k, t in items if t is not None]
        self.sources_file = sources_file
        self.original = original

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        base = int(rng.integers(0, 2**63))
        img = to_rgb(img)
        for name, t in self.steps:
            img = t(img, np.random.default_rng([base, _step_key(name)]))
        return img

    def __repr__(self) -> str:
        body = "".join(f"\n  {k}: {t!r}" for k, t in self.steps)
        return f"Compose({body}\n)"


class RandomApply:
    """Apply ``transform`` with probability ``p`` (the coin is always drawn, keeping streams aligned)."""

    def __init__(self, transform: Transform, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.transform, self.p = transform, float(p)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.p:
            return self.transform(img, rng)
        return to_rgb(img)

    def __repr__(self) -> str:
        return f"RandomApply({self.transform!r}, p={self.p})"


class OneOf:
    """Apply exactly one of ``transforms``, chosen with optional relative ``weights``."""

    def __init__(self, transforms: Sequence[Transform], weights: Sequence[float] | None = None) -> None:
        self.transforms = list(transforms)
        if not self.transforms:
            raise ValueError("OneOf needs at least one transform")
        w = np.ones(len(self.transforms)) if weights is None else np.asarray(list(weights), dtype=float)
        if w.shape != (len(self.transforms),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be non-negative, one per transform, not all zero")
        self.cdf = np.cumsum(w / w.sum())

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        i = min(int(np.searchsorted(self.cdf, rng.random(), side="right")), len(self.transforms) - 1)
        return self.transforms[i](img, rng)

    def __repr__(self) -> str:
        return f"OneOf({self.transforms!r})"


class Identity:
    """No edit (useful as a 'nothing' branch of :class:`OneOf`)."""

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return "Identity()"


class Resize:
    """Final resize so every stored copy has the configured size.

    ``size`` is an int (square) or ``[h, w]``; with ``keep_aspect`` the longer side becomes ``size``
    (int only) instead, for query-style outputs that should not be squashed.
    """

    def __init__(self, size: int | Sequence[int] = 256, keep_aspect: bool = False) -> None:
        if keep_aspect and not isinstance(size, int | np.integer):
            raise ValueError("keep_aspect needs an int size (the longer side)")
        self.size = int(size) if isinstance(size, int | np.integer) else tuple(int(v) for v in size)
        self.keep_aspect = keep_aspect

    def target(self, w: int, h: int) -> Size:
        if not self.keep_aspect:
            return as_size(self.size)
        s = self.size if isinstance(self.size, int) else int(self.size[0])
        return (s, max(1, round(h * s / w))) if w >= h else (max(1, round(w * s / h)), s)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img = to_rgb(img)
        size = self.target(*img.size)
        if img.size == size:
            return img
        moved(scaled(size[0] / img.width, size[1] / img.height), size)
        return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)

    def __repr__(self) -> str:
        return f"Resize(size={self.size}, keep_aspect={self.keep_aspect})"


def generate_copies(
    img: Image.Image,
    transform: Transform,
    n: int,
    seed: int,
    image_id: int | str,
    original_size: int | Sequence[int] | None = 256,
) -> list[Image.Image]:
    """D2LV-style class: the original (resized) followed by ``n`` edited copies.

    Copy ``i`` uses ``rng_for(seed, image_id, i)``, so any single copy can be regenerated alone. The
    original goes through the recipe's ``original`` edit first when it has one (bw sets: greyscale).
    """
    first = getattr(transform, "original", None)
    img0 = first(img, rng_for(seed, image_id, "original")) if first is not None else img
    out = [Resize(original_size)(img0, rng_for(seed, image_id, "original"))] if original_size else []
    out += [transform(img, rng_for(seed, image_id, i)) for i in range(n)]
    return out
