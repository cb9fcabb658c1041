"""Copy-edit transforms for image copy detection (D2LV training sets, ISC-style queries).

Every transform is called as ``t(img, rng)`` with a PIL image and a ``numpy.random.Generator``
and returns an RGB PIL image; parameters go to ``__init__`` so recipes are plain Hydra YAML
(``conf/augmentation/``)::

    from isc.augment import Compose, RandomApply, RandomResizedCrop, Rotate, Resize, rng_for
    t = Compose([RandomResizedCrop(256, scale=(0.2, 1)), RandomApply(Rotate(50), p=0.3), Resize(256)])
    copy = t(img, rng_for(0, "T000123", 7))   # same (seed, id, copy) -> same bytes
"""

from __future__ import annotations

from isc.augment.core import (
    Compose,
    Identity,
    OneOf,
    RandomApply,
    Resize,
    Transform,
    generate_copies,
    rng_for,
    to_rgb,
)
from isc.augment.geometric import HorizontalFlip, Pad, Perspective, RandomResizedCrop, Rotate
from isc.augment.overlays import (
    EmojiOverlay,
    ImageOverlay,
    ImageUnderlay,
    MemeFormat,
    OpacityOverlay,
    PasteOnBackground,
    PasteOver,
    ScreenshotFrame,
    TextOverlay,
)
from isc.augment.paste_boxes import PasteRecord, record_pastes
from isc.augment.photometric import (
    Brightness,
    Colorize,
    ColorJitter,
    GaussianBlur,
    Grayscale,
    JpegQuality,
    Pixelize,
    ShufflePixels,
)
from isc.augment.sources import (
    ImagePool,
    ImageSource,
    RandomTexture,
    as_source,
    synthetic_image,
    uses_default_source,
    with_default_source,
)

__all__ = [
    "Brightness",
    "ColorJitter",
    "Colorize",
    "Compose",
    "EmojiOverlay",
    "GaussianBlur",
    "Grayscale",
    "HorizontalFlip",
    "Identity",
    "ImageOverlay",
    "ImagePool",
    "ImageSource",
    "ImageUnderlay",
    "JpegQuality",
    "MemeFormat",
    "OneOf",
    "OpacityOverlay",
    "Pad",
    "PasteOnBackground",
    "PasteOver",
    "PasteRecord",
    "Perspective",
    "Pixelize",
    "RandomApply",
    "RandomResizedCrop",
    "RandomTexture",
    "Resize",
    "Rotate",
    "ScreenshotFrame",
    "ShufflePixels",
    "TextOverlay",
    "Transform",
    "as_source",
    "generate_copies",
    "record_pastes",
    "rng_for",
    "synthetic_image",
    "to_rgb",
    "uses_default_source",
    "with_default_source",
]
