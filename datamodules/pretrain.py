"""Unlabelled image folders for self-supervised pretraining: two augmented views per image.

Any folder of images works, searched recursively (DISC21 ``training/``, ImageNet ``train/``, Caltech-101
class folders...). Batches are ``((view1, view2), index)`` with each view (B, 3, S, S) in [0, 1].
Under DDP each rank draws its own share of the images; the batch size is per process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from isc.data.copies import DeferredPass, seed_epoch_streams
from isc.data.images import ImageFolderDataset, find_images, screen_for_training
from isc.train.views import TwoViews

log = logging.getLogger(__name__)

__all__ = ["EpochSeededLoader", "EpochShuffle", "PretrainDataModule"]


class EpochShuffle:
    """Batch sampler: epoch ``e`` is a permutation of ``num_images`` seeded by ``(seed, e)``, cut into steps of
    ``batch_size x num_replicas`` images of which rank ``r`` takes the ``r``-th ``batch_size``.

    Ranks share the permutation, so their batches are disjoint; the incomplete last step is dropped (equal
    batches keep batch statistics and DDP shards comparable). An (N,) index array per epoch, nothing per
    image. The epoch is the one :meth:`set_epoch` gave last (Lightning calls it each epoch, see
    :attr:`sampler`).
    """

    def __init__(
        self, num_images: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.num_images, self.batch_size = num_images, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def sampler(self) -> EpochShuffle:
        """Itself: Lightning's ``_set_sampler_epoch`` calls ``set_epoch`` on ``loader.batch_sampler.sampler``."""
        return self

    def __len__(self) -> int:
        return self.num_images // (self.batch_size * self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_images)
        step = self.batch_size * self.num_replicas
        for start in range(0, len(self) * step, step):
            first = start + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()


class EpochSeededLoader(DataLoader):
    """A DataLoader over an :class:`EpochShuffle` whose every pass is a pure function of ``(seed, epoch, rank)``.

    Lightning creates an epoch's iterator early (e.g. ``configure_optimizers`` asks for the epoch length
    before a resumed run's epoch is restored), so the real iterator starts only at a pass's first batch:
    then the epoch is read (``epoch_fn()``, e.g. the trainer's, else the sampler's), given to the sampler,
    and the global random streams are reseeded from ``(seed, epoch, rank)``
    (:func:`isc.data.copies.seed_epoch_streams`): the main process's augmentations (``num_workers=0``) and
    the workers' base seed, which PyTorch draws from the global stream when the iterator starts. Workers
    are never persistent, so each pass's workers start from that seed.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: EpochShuffle,
        seed: int = 0,
        rank: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
        self.epoch_shuffle = batch_sampler
        self.seed, self.rank = seed, rank
        self.epoch_fn = epoch_fn

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return DeferredPass(self)

    def _start_pass(self) -> Iterator[Any]:
        epoch = int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch_shuffle.epoch
        self.epoch_shuffle.set_epoch(epoch)
        seed_epoch_streams(self.seed, epoch, self.rank)
        return DataLoader.__iter__(self)


class PretrainDataModule(L.LightningDataModule):
    """Every image under ``root`` seen through ``views`` (default: BYOL's asymmetric pair at ``image_size``).

    ``max_images`` keeps an evenly spaced subset (quick runs on DISC21's million); ``skip_bad`` decodes
    every image once up front and drops unreadable ones (kept in ``skipped``) instead of failing mid-epoch;
    without it the pre-pass (:func:`isc.data.images.screen_for_training`) stops at a bad file before training. ``batch_size`` is
    per process; ``pin_memory: null`` pins only when CUDA is present.

    Every epoch is a pure function of ``(seed, epoch, rank)``, as fine-tuning's (:mod:`datamodules.copies`):
    the image order is a permutation seeded by ``(seed, epoch)`` cut into rank-disjoint, full batches, and
    the augmentations' random streams (the main process's and the workers') are reseeded from ``(seed,
    epoch, rank)`` when the epoch's first batch is drawn, with the epoch read from the trainer then, not
    when Lightning builds an iterator early. So a run resumed from an end-of-epoch ``last.ckpt`` draws
    exactly the images and views the uninterrupted run drew. Workers are started afresh each epoch.
    """

    shards_itself = True  # run.py then turns off Lightning's distributed sampler injection

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
        seed: int = 0,
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
        self.seed = seed
        self.train_dataset: ImageFolderDataset | None = None
        self.skipped: list[tuple[Path, str]] = []  # unreadable files left out (skip_bad)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        paths = find_images(self.root, self.recursive)
        if self.max_images is not None and len(paths) > self.max_images:
            step = len(paths) / self.max_images
            paths = [paths[int(i * step)] for i in range(self.max_images)]
        paths, self.skipped = screen_for_training(
            paths, f"data.root={self.root}", skip_bad=self.skip_bad, num_workers=max(8, self.num_workers)
        )
        ids = [str(p.relative_to(self.root)) for p in paths]
        self.train_dataset = ImageFolderDataset(paths, ids=ids, transform=self.views)
        log.info("pretraining on %d images under %s", len(self.train_dataset), self.root)

    def _trainer_epoch(self) -> int:
        """The epoch the trainer is running: what a pass must draw, on a fresh or a resumed fit."""
        assert self.trainer is not None
        return int(self.trainer.current_epoch)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if len(self.train_dataset) < self.batch_size * world:
            raise ValueError(
                f"{len(self.train_dataset)} images under {self.root} but batch_size={self.batch_size} x "
                f"{world} process(es): full batches are dropped, so nothing would be trained"
            )
        shuffle = EpochShuffle(len(self.train_dataset), self.batch_size, world, rank, self.seed)
        return EpochSeededLoader(
            self.train_dataset,
            shuffle,
            seed=self.seed,
            rank=rank,
            epoch_fn=self._trainer_epoch if trainer is not None else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
