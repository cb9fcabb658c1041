"""Training data for metric fine-tuning: classes of copies, on disk or generated on the fly.

A class is one source image; its members are the original and its edited copies. Two datasets serve
the same ``(image, class_index)`` items, so a fine-tuning run can switch between a generated set on
disk (``isc.data.generate``) and the same recipe applied on the fly (no disk) with one config change. The
:class:`PKSampler` draws batches of P classes x K members, the batch layout that batch-hard triplet and
InfoNCE losses need, and gives each DDP rank disjoint classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from isc.augment import Transform, rng_for
from isc.data.images import IMAGE_EXTENSIONS, load_image

__all__ = ["GeneratedCopiesDataset", "OnlineCopiesDataset", "PKSampler"]


class GeneratedCopiesDataset(Dataset):
    """A generated set (``root/<class_id>/NN.jpg``, see :mod:`isc.data.generate`) as ``(image, class_index)``.

    ``classes`` may cap how many classes are used (the first ones in sorted order) for quick runs.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        max_classes: int | None = None,
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
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
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
            image = image.resize((self.original_size, self.original_size), Image.Resampling.BICUBIC)
        else:
            image = self.recipe(image, rng_for(self.seed, class_index, self.epoch, member))
        return (self.transform(image) if self.transform else image), class_index


class PKSampler:
    """Batches of ``p`` classes x ``k`` members each, sharded across DDP ranks by class.

    Every epoch the classes are shuffled (seeded by ``seed + epoch``) and cut into global steps of
    ``p * num_replicas`` classes; rank ``r`` takes its own ``p`` of them, so ranks never share a class
    in a step and together cover each class once per epoch. A class with fewer than ``k`` members is
    sampled with replacement. ``steps_per_epoch`` overrides the epoch length (several passes over the
    classes for small sets). Yields lists of dataset indices (use as a DataLoader ``batch_sampler``).
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

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; also tells an on-the-fly dataset which epoch it is."""
        self.epoch = int(epoch)
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch or len(self.classes) // (self.p * self.num_replicas)

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def __iter__(self) -> Iterator[list[int]]:
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
