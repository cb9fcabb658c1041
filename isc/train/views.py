"""The two asymmetric views of BYOL / Barlow Twins pretraining.

Grill et al., "Bootstrap Your Own Latent" (NeurIPS 2020), Table 6, also used by Barlow Twins and
Momentum^2 Teacher: both views take a random resized crop (scale 0.08-1), a horizontal flip, colour
jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8 and greyscale with p = 0.2; they differ in Gaussian blur
(p = 1.0 vs 0.1) and solarisation (p = 0 vs 0.2). The asymmetry is what makes the two views carry
different nuisances. Outputs are float tensors in [0, 1]: the models normalise their own inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2 as T

__all__ = ["TwoViews", "byol_view", "blur_kernel_size"]


def blur_kernel_size(image_size: int, fraction: float = 0.1) -> int:
    """Odd Gaussian kernel of about ``fraction`` of the image side (BYOL: 23 px at 224 px)."""
    k = int(round(image_size * fraction))
    return max(3, k + 1 - k % 2)


def byol_view(
    image_size: int = 224,
    scale: Sequence[float] = (0.08, 1.0),
    blur_p: float = 1.0,
    solarize_p: float = 0.0,
    jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
) -> T.Compose:
    """One BYOL view: PIL image -> (3, image_size, image_size) float32 in [0, 1]."""
    brightness, contrast, saturation, hue = jitter
    steps: list[torch.nn.Module] = [
        T.RandomResizedCrop(
            image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC, antialias=True
        ),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),  # uint8 from here: colour ops and solarise on integers, as torchvision's PIL path
        T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p),
        T.RandomGrayscale(p=grayscale_p),
    ]
    if blur_p > 0:
        blur = T.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))
        steps.append(T.RandomApply([blur], p=blur_p))
    if solarize_p > 0:
        steps.append(T.RandomSolarize(threshold=128, p=solarize_p))
    steps.append(T.ToDtype(torch.float32, scale=True))
    return T.Compose(steps)


class TwoViews:
    """Callable PIL image -> ``(view1, view2)``, each (3, image_size, image_size) in [0, 1].

    Defaults are BYOL's asymmetric pair; every knob can be set per view from Hydra.
    """

    def __init__(
        self,
        image_size: int = 224,
        scale: Sequence[float] = (0.08, 1.0),
        blur_p: Sequence[float] = (1.0, 0.1),
        solarize_p: Sequence[float] = (0.0, 0.2),
        jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
    ) -> None:
        self.image_size = image_size
        self.views = [
            byol_view(image_size, scale, blur_p[i], solarize_p[i], jitter, jitter_p, grayscale_p)
            for i in (0, 1)
        ]

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views[0](image), self.views[1](image)

    def __repr__(self) -> str:
        return f"TwoViews(image_size={self.image_size},\n  view1={self.views[0]},\n  view2={self.views[1]})"
