"""Batched descriptor extraction: images on disk -> (N, D) float32 unit vectors."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

from isc.data.images import ImageFolderDataset

log = logging.getLogger(__name__)

__all__ = ["resolve_device", "eval_transform", "extract_descriptors"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` picks CUDA when present, so the same config runs on a laptop and a GPU node."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to a square ``image_size`` and scale to [0, 1]: the model normalises its own inputs."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


@torch.no_grad()
def extract_descriptors(
    model: nn.Module,
    dataset: ImageFolderDataset,
    *,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    desc: str = "descriptors",
) -> np.ndarray:
    """Run ``model`` over every image of ``dataset`` (which must yield tensors) in order: (N, D) float32.

    A non-finite descriptor is an error that names the image: it would silently poison the search.
    """
    dev = resolve_device(device)
    model = model.to(dev).eval()
    num_workers = min(num_workers, os.cpu_count() or 1)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    out: list[np.ndarray] = []
    for images, indices in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        descriptors = model(images.to(dev, non_blocking=True)).float().cpu().numpy()
        bad = ~np.isfinite(descriptors).all(axis=1)
        if bad.any():
            first = int(indices[np.flatnonzero(bad)[0]])
            raise ValueError(f"non-finite descriptor for image {dataset.paths[first]}")
        zero = ~descriptors.any(axis=1)
        if zero.any():  # caught here, naming the image, rather than when the file is written
            first = int(indices[np.flatnonzero(zero)[0]])
            raise ValueError(
                f"all-zero descriptor for image {dataset.paths[first]}: it would match nothing "
                "(a collapsed model, or an input size too small for the backbone?)"
            )
        out.append(descriptors)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def image_dataset(
    paths: Sequence[os.PathLike[str] | str], image_size: int, skip_bad: bool = False
) -> ImageFolderDataset:
    """An evaluation dataset over ``paths`` with the standard resize-to-square transform."""
    return ImageFolderDataset(paths, transform=eval_transform(image_size), skip_bad=skip_bad)
