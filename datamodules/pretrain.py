"""Unlabelled image folders for self-supervised pretraining: two augmented views per image.

Any folder of images works, searched recursively (DISC21 ``training/``, ImageNet ``train/``, Caltech-101
class folders...). Batches are ``((view1, view2), index)`` with each view (B, 3, S, S) in [0, 1].
Under DDP, Lightning's distributed sampler shards the images; the batch size is per process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from PIL import Image
from torch.utils.data import DataLoader

from isc.data.images import IMAGE_EXTENSIONS, ImageFolderDataset, screen_images
from isc.data.images import find_images as isc_find_images
from isc.train.views import TwoViews

log = logging.getLogger(__name__)

__all__ = ["PretrainDataModule", "find_images"]


def find_images(root: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Image files under ``root`` (sub-folders too if ``recursive``), sorted by path; hidden entries skipped.

    Unlike :func:`isc.data.images.list_images`, names may repeat across sub-folders (``cat/0001.jpg``,
    ``dog/0001.jpg``): pretraining never uses ids. Raises ``FileNotFoundError`` when there is none.
    """
    root = Path(root).expanduser()
    if recursive:
        return isc_find_images(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    found = sorted(
        p
        for p in root.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not found:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) directly in {root}")
    return found


class PretrainDataModule(L.LightningDataModule):
    """Every image under ``root`` seen through ``views`` (default: BYOL's asymmetric pair at ``image_size``).

    ``max_images`` keeps an evenly spaced subset (quick runs on DISC21's million); ``skip_bad`` decodes
    every image once up front and drops unreadable ones (kept in ``skipped``) instead of failing mid-epoch;
    without it the pre-pass (:func:`isc.data.images.screen_images`) stops at a bad file before training. ``batch_size`` is
    per process; ``pin_memory: null`` pins only when CUDA is present.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
        views: Callable[[Image.Image], Any] | None = None,
        recursive: bool = True,
        max_images: int | None = None,
        skip_bad: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.views = views if views is not None else TwoViews(image_size)
        self.recursive = recursive
        self.max_images = max_images
        self.skip_bad = skip_bad
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.train_dataset: ImageFolderDataset | None = None
        self.skipped: list[tuple[Path, str]] = []  # unreadable files left out (skip_bad)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        paths = find_images(self.root, self.recursive)
        if self.max_images is not None and len(paths) > self.max_images:
            step = len(paths) / self.max_images
            paths = [paths[int(i * step)] for i in range(self.max_images)]
        paths, self.skipped = screen_images(
            paths, f"data.root={self.root}", skip_bad=self.skip_bad, num_workers=max(8, self.num_workers)
        )
        ids = [str(p.relative_to(self.root)) for p in paths]
        self.train_dataset = ImageFolderDataset(paths, ids=ids, transform=self.views)
        log.info("pretraining on %d images under %s", len(self.train_dataset), self.root)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        if len(self.train_dataset) < self.batch_size:
            raise ValueError(
                f"{len(self.train_dataset)} images under {self.root} but batch_size={self.batch_size}: "
                "full batches are dropped, so nothing would be trained"
            )
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=True,  # equal batches: batch statistics and DDP shards stay comparable
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )
