"""Model families of D2LV's 33-model test stage: which models vote together, and what each sees.

D2LV (seed ``WangWenhao0716/ISC-Track1-Submission``, ``Test/README.md:7-21``) trained three backbones
(ResNet-50, ResNet-152, ResNet-50-IBN-a) on each of eleven training sets -- base, bw, blur, blur_bw,
color, color_bw, dark, opa, u, face, face_bw -- and tested each trio as a *family*
(``Test/final/V5_<family>/``): its three models' rows vote 2 of 3 on (view, reference)
(``V5_*/aggregate.py``), the agreeing rows of every family are concatenated (``Test/final/combine.py``),
and some families see their test images changed first (``extract_features.py:95-102`` in each folder):

- ``grey`` (the ``_BW`` families, ``--bw`` on every ``extract_*.sh``): every query, reference and
  training image is turned grey (``RandomGrayscale(p=1)``: luminance copied to three channels);
- ``blur`` (the ``blur`` families, ``--blur`` on ``extract_reference_*.sh`` and
  ``extract_training_*.sh`` only): references and training images are blurred with a Gaussian of
  radius 5 (``GaussianBlur([5, 5])``, ``extract_features.py:27-34, 99-100``); queries are not;
- ``min_size``: the family's rows of query views smaller than this are dropped (``combine.py`` applies
  ``clean_small_query`` (100), ``_150`` or ``_200`` per family, ``Test/final/generate_100_150_200.py``).

:class:`Family` is one entry of ``evaluation.ensemble.families``; :class:`ImagePrep` is the picklable,
cache-keyed image change the extraction engine applies to every view before resizing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image, ImageFilter

__all__ = ["SEED_BLUR_RADIUS", "Family", "ImagePrep"]

SEED_BLUR_RADIUS = 5.0  # Test/final/V5_blur_CC/extract_features.py:27-34, 99-100: GaussianBlur([5, 5])


@dataclass(frozen=True)
class ImagePrep:
    """What a family does to an image before the model sees it: greyscale, then a Gaussian blur.

    Applied to each view's crop (so to the whole image for whole-image views), at the image's own
    resolution, before the resize, as the seed does on each (pre-cut) view file. Its ``repr`` is part of
    the extraction cache key, so grey and colour descriptors never share a shard.
    """

    grey: bool = False
    blur: float = 0.0

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.grey:
            image = image.convert("L").convert("RGB")
        if self.blur > 0:
            image = image.filter(ImageFilter.GaussianBlur(radius=self.blur))
        return image

    @property
    def changes_anything(self) -> bool:
        return self.grey or self.blur > 0


@dataclass(frozen=True)
class Family:
    """One family of ``evaluation.ensemble.families``: its models and its test-time changes.

    ``blur`` is the radius applied to references and training images (0: none; the seed: 5).
    ``min_size``: rows of the family's query views whose shorter side is under it are dropped
    (``None``: ``evaluation.local_verification.query.min_size``).
    """

    KEY: ClassVar[str] = "evaluation.ensemble.families"

    name: str
    models: tuple[str, ...]
    grey: bool = False
    blur: float = 0.0
    min_size: int | None = None

    def __post_init__(self) -> None:
        where = f"{self.KEY}[{self.name!r}]"
        if not str(self.name).strip():
            raise ValueError(f"{self.KEY}: every family needs a name")
        if isinstance(self.models, str) or not self.models:
            raise ValueError(f"{where}.models must be a non-empty list of model files")
        object.__setattr__(self, "models", tuple(str(m) for m in self.models))
        if not self.blur >= 0:
            raise ValueError(f"{where}.blur must be >= 0 (a Gaussian radius in pixels), got {self.blur}")
        if self.min_size is not None and self.min_size < 0:
            raise ValueError(f"{where}.min_size must be >= 0 or null, got {self.min_size}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Family:
        """One config entry; an unknown key is an error naming the valid ones."""
        known = {"name", "models", "grey", "blur", "min_size"}
        bad = set(values) - known
        if bad:
            raise ValueError(f"unknown key(s) {sorted(bad)} in {cls.KEY}; valid: {sorted(known)}")
        if "name" not in values or "models" not in values:
            raise ValueError(f"every entry of {cls.KEY} needs a name and its models, got {dict(values)}")
        kwargs: dict[str, Any] = dict(values)
        if not isinstance(kwargs["models"], str):
            kwargs["models"] = tuple(kwargs["models"])
        return cls(**kwargs)

    def prep(self, split: str) -> ImagePrep | None:
        """The change to ``split``'s images (``queries``, ``references``, ``training``), None if none."""
        prep = ImagePrep(grey=self.grey, blur=self.blur if split != "queries" else 0.0)
        return prep if prep.changes_anything else None
