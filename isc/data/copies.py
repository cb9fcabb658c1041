"""Training data for metric fine-tuning: classes of copies, on disk or generated on the fly.

A class is one source image; its members are the original and its edited copies. Two datasets serve
the same ``(image, class_index)`` items, so a fine-tuning run can switch between a generated set on
disk (``isc.data.generate``) and the same recipe applied on the fly (no disk) with one config change. The
:class:`PKSampler` draws batches of P classes x K members, the batch layout that batch-hard triplet and
InfoNCE losses need, and gives each DDP rank disjoint classes. :class:`EpochLoader` serves those batches
so that every epoch is a pure function of ``(seed, epoch, rank)``: new classes, copies and batches each
epoch, and a run resumed at an epoch boundary replays exactly what the uninterrupted run did.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from isc.augment import Transform, rng_for
from isc.data.images import IMAGE_EXTENSIONS, load_image

__all__ = [
    "DeferredPass",
    "EpochLoader",
    "GeneratedCopiesDataset",
    "OnlineCopiesDataset",
    "PKSampler",
    "seed_epoch_streams",
]


class GeneratedCopiesDataset(Dataset):
    """A generated set (``root/<class_id>/NN.jpg``, see :mod:`isc.data.generate`) as ``(image, class_index)``.

    ``classes`` may cap how many classes are used (the first ones in sorted order) for quick runs;
    ``exclude`` leaves out files (unreadable ones a skip-and-count run found).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        max_classes: int | None = None,
        exclude: Collection[Path] = (),
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"generated copies folder {root} does not exist")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if max_classes is not None:
            class_dirs = class_dirs[:max_classes]
        self.paths: list[Path] = []
        targets: list[int] = []
        self.class_ids: list[str] = []
        for class_dir in class_dirs:
            members = sorted(
                p
                for p in class_dir.iterdir()
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p not in exclude
            )
            if len(members) < 2:
                continue  # a class needs at least two members to give a positive pair
            self.class_ids.append(class_dir.name)
            self.paths += members
            targets += [len(self.class_ids) - 1] * len(members)
        if not self.class_ids:
            raise ValueError(
                f"{root} holds no class folders with at least two images (expected <class_id>/NN.jpg)"
            )
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = load_image(self.paths[index])
        return (self.transform(image) if self.transform else image), int(self.targets[index])


class OnlineCopiesDataset(Dataset):
    """Copies made on the fly with a copy-edit recipe: no disk, a fresh copy every epoch.

    Item ``i`` is member ``i % members`` of class ``i // members``; member 0 is the (resized) original
    when ``include_original`` is set. Member ``m`` of class ``c`` in epoch ``e`` is a pure function of
    ``(seed, c, e, m)``, so runs are reproducible and every DataLoader worker agrees; call
    :meth:`set_epoch` at the start of each epoch.
    """

    def __init__(
        self,
        sources: Sequence[str | os.PathLike[str] | Image.Image],
        recipe: Transform,
        members: int = 4,
        include_original: bool = True,
        original_size: int = 256,
        transform: Callable[[Image.Image], Any] | None = None,
        seed: int = 0,
    ) -> None:
        if not sources:
            raise ValueError("OnlineCopiesDataset needs at least one source image")
        if members < 2:
            raise ValueError(f"members must be >= 2 to give positive pairs, got {members}")
        self.sources = list(sources)
        self.recipe = recipe
        self.members = members
        self.include_original = include_original
        self.original_size = original_size
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.targets = np.repeat(np.arange(len(self.sources), dtype=np.int64), members)

    @property
    def num_classes(self) -> int:
        return len(self.sources)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.targets)

    def _source(self, index: int) -> Image.Image:
        source = self.sources[index]
        return source.convert("RGB") if isinstance(source, Image.Image) else load_image(source)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        class_index, member = divmod(int(index), self.members)
        image = self._source(class_index)
        if member == 0 and self.include_original:
            original = getattr(self.recipe, "original", None)  # D2LV's bw sets: greyscale originals
            if original is not None:
                image = original(image, rng_for(self.seed, class_index, self.epoch, member))
            image = image.resize((self.original_size, self.original_size), Image.Resampling.BICUBIC)
        else:
            image = self.recipe(image, rng_for(self.seed, class_index, self.epoch, member))
        return (self.transform(image) if self.transform else image), class_index


class PKSampler:
    """Batches of ``p`` classes x ``k`` members each, sharded across DDP ranks by class.

    Every epoch the classes are shuffled (seeded by ``(seed, epoch)``) and cut into global steps of
    ``p * num_replicas`` classes; rank ``r`` takes its own ``p`` of them, so ranks never share a class
    in a step and together cover each class once per epoch. A class with fewer than ``k`` members is
    sampled with replacement. ``steps_per_epoch`` overrides the epoch length (several passes over the
    classes for small sets). Yields lists of dataset indices (use as a DataLoader ``batch_sampler``).

    The epoch of a pass is the one given to :meth:`set_epoch` (Lightning calls it each epoch, see
    :attr:`sampler`), else the one after the previous pass: a plain ``for epoch ...: for batch in loader``
    loop draws new batches every epoch too, and a pass is a pure function of ``(seed, epoch, rank)``.
    """

    def __init__(
        self,
        targets: Sequence[int] | np.ndarray,
        p: int = 32,
        k: int = 4,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        targets = np.asarray(targets, dtype=np.int64)
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be positive, got p={p}, k={k}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        order = np.argsort(targets, kind="stable")
        classes, starts = np.unique(targets[order], return_index=True)
        self.members = np.split(order, starts[1:])
        self.classes = classes
        if len(classes) < p * num_replicas:
            raise ValueError(
                f"{len(classes)} classes cannot fill one step of p={p} classes x {num_replicas} replica(s)"
            )
        self.p, self.k = p, k
        self.num_replicas, self.rank = num_replicas, rank
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self.on_epoch = on_epoch
        self.epoch = 0
        self._started = False  # a pass has begun: the next one advances unless set_epoch pins it
        self._pinned = False

    def set_epoch(self, epoch: int) -> None:
        """Pin the next pass to ``epoch``; also tells an on-the-fly dataset (``on_epoch``) which epoch it is."""
        self.epoch = int(epoch)
        self._pinned = True
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    @property
    def next_epoch(self) -> int:
        """The epoch the next pass will draw: the pinned one, else the one after the previous pass."""
        return self.epoch + 1 if self._started and not self._pinned else self.epoch

    @property
    def sampler(self) -> PKSampler:
        """Itself: Lightning's ``_set_sampler_epoch`` calls ``set_epoch`` on ``loader.batch_sampler.sampler``
        only (a batch sampler without ``.sampler`` would never hear of the epoch)."""
        return self

    def __len__(self) -> int:
        return self.steps_per_epoch or len(self.classes) // (self.p * self.num_replicas)

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: this runs at the first batch, so an iterator made and dropped is no pass.
        epoch = self.next_epoch
        if epoch != self.epoch:
            self.set_epoch(epoch)
        self._started, self._pinned = True, False
        # Class order must agree across ranks (disjoint shards); member picks are each rank's own.
        class_rng = np.random.default_rng([self.seed, self.epoch])
        member_rng = np.random.default_rng([self.seed, self.epoch, self.rank + 1])
        step = self.p * self.num_replicas
        steps_per_pass = len(self.classes) // step
        emitted = 0
        while emitted < len(self):  # several shuffled passes when steps_per_epoch asks for more
            shuffled = class_rng.permutation(len(self.classes))
            for start in range(0, min(steps_per_pass, len(self) - emitted) * step, step):
                emitted += 1
                mine = shuffled[start + self.rank * self.p : start + (self.rank + 1) * self.p]
                batch: list[int] = []
                for c in mine:
                    members = self.members[c]
                    batch += member_rng.choice(members, size=self.k, replace=len(members) < self.k).tolist()
                yield batch


def _epoch_words(seed: int, epoch: int, rank: int) -> np.ndarray:
    """Eight independent 32-bit words from ``(seed, epoch, rank)``, two per stream (torch, numpy, the
    loader's workers, python); any signs (SeedSequence needs >= 0)."""
    entropy = [int(v) % 2**64 for v in (seed, epoch, rank)]
    return np.random.SeedSequence(entropy).generate_state(8, dtype=np.uint32)


def seed_epoch_streams(seed: int, epoch: int, rank: int = 0) -> None:
    """Reseed torch (CPU and every CUDA device), numpy and python ``random`` from ``(seed, epoch, rank)``.

    Training draws from these global streams (random flip / pad / crop of the train transform, WaveBlock,
    dropout). Reseeding them when an epoch starts makes the epoch independent of whatever consumed them
    before (an evaluation, a resumed run's restore), so resuming at an epoch boundary is exact.
    """
    words = _epoch_words(seed, epoch, rank)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))  # torch.manual_seed seeds CUDA too
    np.random.seed(words[2:4])  # noqa: NPY002  (the global stream is the one to reseed)
    random.seed(int(words[6]) << 32 | int(words[7]))


class EpochLoader(DataLoader):
    """A DataLoader over a :class:`PKSampler` whose every pass is a pure function of ``(seed, epoch, rank)``.

    Why it is more than ``DataLoader(batch_sampler=...)``: Lightning creates the first epoch's iterator
    early (in ``configure_optimizers`` when a schedule asks for the epoch length, before a resumed run's
    epoch is restored), and worker processes copy the dataset when an iterator starts. So this loader
    starts the real iterator only at the first batch of a pass. Then it takes the pass's epoch
    (``epoch_fn()`` when given, e.g. the trainer's epoch, else the sampler's :attr:`~PKSampler.next_epoch`),
    gives it to the sampler and the dataset (before workers copy it), seeds the workers' base seed and,
    with ``reseed_globals``, the global random streams (:func:`seed_epoch_streams`) from ``(seed, epoch,
    rank)``, and only then starts loading. Workers are never persistent: each pass's workers copy the
    dataset at its epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: PKSampler,
        seed: int = 0,
        rank: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        reseed_globals: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        worker_init_fn: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=worker_init_fn,
            generator=torch.Generator(),
            persistent_workers=False,
        )
        self.pk_sampler = batch_sampler
        self.seed, self.rank = seed, rank
        self.epoch_fn = epoch_fn
        self.reseed_globals = reseed_globals
        self.epoch: int | None = None  # the epoch of the pass that started last

    def set_epoch(self, epoch: int) -> None:
        """Pin the next pass to ``epoch`` (without ``epoch_fn``, passes otherwise count up by one)."""
        self.pk_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return DeferredPass(self)

    def _start_pass(self) -> Iterator[Any]:
        epoch = int(self.epoch_fn()) if self.epoch_fn is not None else self.pk_sampler.next_epoch
        self.pk_sampler.set_epoch(epoch)
        set_dataset_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_dataset_epoch):
            set_dataset_epoch(epoch)
        words = _epoch_words(self.seed, epoch, self.rank)
        assert self.generator is not None
        self.generator.manual_seed(int(words[4]) << 32 | int(words[5]))  # workers' base seed
        if self.reseed_globals:
            seed_epoch_streams(self.seed, epoch, self.rank)
        self.epoch = epoch
        return DataLoader.__iter__(self)


class DeferredPass(Iterator[Any]):
    """One pass of an epoch-seeded loader (:class:`EpochLoader`, the pretraining loader): its real
    iterator (and its workers) starts at the first batch, once Lightning has set the epoch."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._iterator: Iterator[Any] | None = None

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._loader._start_pass()
        return next(self._iterator)
