"""Class-balanced P x K batches of copies for metric fine-tuning (thin Lightning glue over isc.data.copies)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from isc.augment import ImagePool, Transform, with_default_source
from isc.data.benchmark import package_photos
from isc.data.copies import EpochLoader, GeneratedCopiesDataset, OnlineCopiesDataset, PKSampler
from isc.data.images import find_images, screen_for_training


def train_transform(image_size: int, pad: int = 10) -> T.Compose:
    """D2LV's fine-tuning input pipeline: resize, flip, pad and random crop, then [0, 1] tensors."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize((image_size, image_size), antialias=True),
            T.RandomHorizontalFlip(),
            T.Pad(pad),
            T.RandomCrop(image_size),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


class CopiesDataModule(L.LightningDataModule):
    """Training classes of copies, either generated on disk or made on the fly.

    - ``generated``: a folder written by ``task=generate`` (``<class_id>/NN.jpg``).
    - ``sources`` + ``recipe``: online mode; every source image is a class and ``recipe`` makes fresh
      copies each epoch (no disk). ``sources`` is a folder (searched recursively), a file listing image
      paths, or ``"embedded"`` for the package photos (use the embedded benchmark's ``training/``
      split through ``sources=<benchmark>/training`` to keep training disjoint from its queries).
      With ``paste_from_sources`` (default) the recipe's underlay/overlay/blend edits that were built
      without a source (``paste_source: null``) paste these same training images, as D2LV pastes real
      photos; an explicit ``paste_source`` is kept, and textures remain only for recipes used alone.

    Every image is checked before training (:func:`isc.data.images.screen_for_training`): an unreadable one
    stops the run at once, or with ``skip_bad`` is left out and kept in ``skipped``.

    Batches hold ``p`` classes x ``k`` members; under DDP each rank draws its own classes. Every epoch
    draws new classes, copies and batches, and is a pure function of ``(seed, epoch, rank)``: the
    loader (:class:`isc.data.copies.EpochLoader`) takes the trainer's epoch at the first batch and
    reseeds every random stream from it, so a run resumed from an end-of-epoch ``last.ckpt`` replays
    exactly the epochs the uninterrupted run would have trained.
    """

    shards_itself = True  # run.py then turns off Lightning's distributed sampler injection

    def __init__(
        self,
        generated: str | None = None,
        sources: str | None = None,
        recipe: Transform | None = None,
        p: int = 32,
        k: int = 4,
        image_size: int = 256,
        members: int = 4,
        steps_per_epoch: int | None = None,
        max_classes: int | None = None,
        num_workers: int = 4,
        seed: int = 0,
        paste_from_sources: bool = True,
        skip_bad: bool = False,
    ) -> None:
        super().__init__()
        if (generated is None) == (sources is None):
            raise ValueError(
                "give exactly one of data.generated (a folder of copies) or data.sources (online mode)"
            )
        if sources is not None and recipe is None:
            raise ValueError("online mode (data.sources) needs a copy-edit recipe (data.recipe)")
        self.generated, self.sources, self.recipe = generated, sources, recipe
        self.p, self.k, self.image_size, self.members = p, k, image_size, members
        self.steps_per_epoch, self.max_classes = steps_per_epoch, max_classes
        self.num_workers, self.seed = num_workers, seed
        self.paste_from_sources = paste_from_sources
        self.skip_bad = skip_bad
        self.skipped: list[tuple[Path, str]] = []  # unreadable files left out (skip_bad)
        self.dataset: GeneratedCopiesDataset | OnlineCopiesDataset | None = None

    def _source_list(self) -> list[Any]:
        assert self.sources is not None
        if self.sources == "embedded":
            return [image for _, image in package_photos()]
        path = Path(self.sources).expanduser()
        if path.is_file():
            return [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]
        return list(find_images(path))

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        transform = train_transform(self.image_size)
        workers = max(8, self.num_workers)
        if self.generated is not None:
            dataset = GeneratedCopiesDataset(self.generated, transform, max_classes=self.max_classes)
            _, self.skipped = screen_for_training(
                dataset.paths, f"data.generated={self.generated}", skip_bad=self.skip_bad, num_workers=workers
            )
            if self.skipped:  # list again without them (a class left with one member drops out)
                exclude = {p for p, _ in self.skipped}
                dataset = GeneratedCopiesDataset(self.generated, transform, self.max_classes, exclude)
            self.dataset = dataset
        else:
            assert self.recipe is not None
            sources = self._source_list()[: self.max_classes]
            files = [s for s in sources if not isinstance(s, Image.Image)]
            _, self.skipped = screen_for_training(
                files, f"data.sources={self.sources}", skip_bad=self.skip_bad, num_workers=workers
            )
            bad = {p for p, _ in self.skipped}
            sources = [s for s in sources if isinstance(s, Image.Image) or s not in bad]
            recipe = self.recipe
            if self.paste_from_sources:  # D2LV pastes real photos, not textures: the training images
                recipe = with_default_source(recipe, ImagePool(sources))
            self.dataset = OnlineCopiesDataset(
                sources, recipe, members=self.members, transform=transform, seed=self.seed
            )

    @property
    def num_classes(self) -> int:
        self.setup()
        assert self.dataset is not None
        return self.dataset.num_classes

    def _trainer_epoch(self) -> int:
        """The epoch the trainer is running: what a pass must draw, on a fresh or a resumed fit."""
        assert self.trainer is not None
        return int(self.trainer.current_epoch)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.dataset is not None
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = PKSampler(
            self.dataset.targets,
            p=self.p,
            k=self.k,
            num_replicas=world,
            rank=rank,
            seed=self.seed,
            steps_per_epoch=self.steps_per_epoch,
            on_epoch=getattr(self.dataset, "set_epoch", None),
        )
        workers = min(self.num_workers, os.cpu_count() or 1)
        return EpochLoader(  # workers are re-created each epoch, so they copy the dataset's new epoch
            self.dataset,
            sampler,
            seed=self.seed,
            rank=rank,
            epoch_fn=self._trainer_epoch if trainer is not None else None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
        )
