"""P x K sampler and the two sources of copy classes (on disk, on the fly)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from isc.augment import Compose, RandomResizedCrop, Resize, synthetic_image
from isc.data.copies import (
    EpochLoader,
    GeneratedCopiesDataset,
    OnlineCopiesDataset,
    PKSampler,
    seed_epoch_streams,
)


def test_pk_batches_have_p_classes_of_k() -> None:
    targets = np.repeat(np.arange(20), [1, 2, 3, 4, 5] * 4)  # uneven class sizes, some below k
    sampler = PKSampler(targets, p=4, k=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    for batch in batches:
        counts = Counter(targets[batch].tolist())
        assert len(batch) == 12 and len(counts) == 4 and set(counts.values()) == {3}
    # one epoch covers every class exactly once
    seen = [c for b in batches for c in set(targets[b].tolist())]
    assert sorted(seen) == list(range(20))


def test_pk_shards_are_disjoint_across_ranks_and_cover_the_classes() -> None:
    targets = np.repeat(np.arange(24), 4)
    ranks = [list(PKSampler(targets, p=3, k=2, num_replicas=2, rank=r, seed=5)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    classes_per_rank = [{c for b in batches for c in targets[b]} for batches in ranks]
    assert not classes_per_rank[0] & classes_per_rank[1]
    assert classes_per_rank[0] | classes_per_rank[1] == set(range(24))
    for b0, b1 in zip(*ranks, strict=True):  # every step: disjoint classes
        assert not set(targets[b0]) & set(targets[b1])


def test_pk_epochs_reshuffle_and_steps_per_epoch_repeats_classes() -> None:
    targets = np.repeat(np.arange(8), 4)
    sampler = PKSampler(targets, p=2, k=2, seed=0, steps_per_epoch=10)
    first = list(sampler)
    assert len(first) == 10
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_pk_sampler_refuses_too_few_classes() -> None:
    with pytest.raises(ValueError, match="cannot fill"):
        PKSampler(np.arange(3), p=2, k=2, num_replicas=2)


def test_generated_copies_dataset(tmp_path) -> None:
    for c in ("T0", "T1"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / c / f"{i:02d}.jpg")
    (tmp_path / "T2").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "T2" / "00.jpg")  # a single member: no positive pair, skipped
    ds = GeneratedCopiesDataset(tmp_path)
    assert ds.num_classes == 2 and len(ds) == 6
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1]
    image, label = ds[4]
    assert label == 1 and image.size == (8, 8)


def test_online_copies_are_fresh_each_epoch_and_reproducible() -> None:
    sources = [synthetic_image(np.random.default_rng(i), (100, 80)) for i in range(3)]
    recipe = Compose([RandomResizedCrop(32, scale=(0.3, 1.0)), Resize(32)])
    ds = OnlineCopiesDataset(sources, recipe, members=3, original_size=32, seed=4)
    assert len(ds) == 9 and ds.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    original, label = ds[3]
    assert label == 1 and original.size == (32, 32)
    copy_e0 = np.asarray(ds[4][0])
    assert np.array_equal(copy_e0, np.asarray(ds[4][0]))  # same epoch, same copy
    ds.set_epoch(1)
    assert not np.array_equal(copy_e0, np.asarray(ds[4][0]))
    assert np.array_equal(np.asarray(original), np.asarray(ds[3][0]))  # the original never changes


def test_pk_passes_advance_the_epoch_unless_set_epoch_pins_it() -> None:
    """A plain loop that never calls set_epoch still draws new batches each epoch; set_epoch replays."""
    sampler = PKSampler(np.repeat(np.arange(8), 4), p=2, k=2, seed=0)
    assert sampler.sampler is sampler  # where Lightning's _set_sampler_epoch looks for set_epoch
    passes = [list(sampler) for _ in range(3)]
    assert sampler.epoch == 2 and sampler.next_epoch == 3
    assert passes[0] != passes[1] != passes[2]
    sampler.set_epoch(1)
    assert sampler.next_epoch == 1 and list(sampler) == passes[1]
    iter(sampler)  # an iterator made and dropped before its first batch is no pass
    assert sampler.next_epoch == 2 and list(sampler) == passes[2]


def test_seed_epoch_streams_is_a_function_of_seed_epoch_and_rank() -> None:
    def draws(seed: int, epoch: int, rank: int) -> tuple[float, float, float]:
        seed_epoch_streams(seed, epoch, rank)
        return torch.rand(1).item(), float(np.random.random()), random.random()  # noqa: NPY002

    assert draws(3, 1, 0) == draws(3, 1, 0)
    assert len({draws(3, 1, 0), draws(3, 2, 0), draws(3, 1, 1), draws(4, 1, 0), draws(-3, 1, 0)}) == 5


def _online_with_tensors() -> OnlineCopiesDataset:
    sources = [synthetic_image(np.random.default_rng(i), (64, 48)) for i in range(6)]
    recipe = Compose([RandomResizedCrop(24, scale=(0.3, 1.0)), Resize(24)])
    return OnlineCopiesDataset(sources, recipe, members=3, original_size=24, seed=1, transform=_to_tensor)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class _SpySampler(PKSampler):
    """Records every batch it yields (in the main process, also with workers)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.picks: list[list[int]] = []

    def __iter__(self):
        for batch in super().__iter__():
            self.picks.append(batch)
            yield batch


@pytest.mark.parametrize("num_workers", [0, 1])
def test_epoch_loader_replays_an_epoch_exactly(num_workers: int) -> None:
    """A pass starts at its first batch, advances the epoch in a plain loop, and reseeds the global
    streams from (seed, epoch, rank): replaying an epoch gives the same batches and random draws."""
    ds = _online_with_tensors()
    sampler = PKSampler(ds.targets, p=2, k=2, seed=1, steps_per_epoch=2)
    loader = EpochLoader(ds, sampler, seed=5, num_workers=num_workers)
    it = iter(loader)
    assert loader.epoch is None and len(it) == 2  # nothing started before the first batch
    del it

    def one_pass() -> tuple[list[torch.Tensor], float]:
        tensors = [t for images, labels in loader for t in (images, labels)]
        return tensors, torch.rand(1).item()  # the global stream after the pass

    first, second = one_pass(), one_pass()  # no set_epoch: the epoch still advances
    assert loader.epoch == 1 and ds.epoch == 1
    assert not all(torch.equal(a, b) for a, b in zip(first[0], second[0], strict=True))
    loader.set_epoch(0)
    replay = one_pass()
    assert loader.epoch == 0 and replay[1] == first[1] != second[1]
    assert all(torch.equal(a, b) for a, b in zip(replay[0], first[0], strict=True))


def test_epoch_loader_workers_see_each_epochs_copies() -> None:
    """With a worker process, every pass's pixels are exactly the main-process copies of its epoch,
    and ``epoch_fn`` (e.g. the trainer's epoch) decides which epoch that is."""
    ds = _online_with_tensors()
    sampler = _SpySampler(ds.targets, p=2, k=2, seed=1, steps_per_epoch=2)
    epochs = iter([3, 7])
    loader = EpochLoader(ds, sampler, seed=5, num_workers=1, epoch_fn=lambda: next(epochs))
    seen = [(loader.epoch, images) for _ in range(2) for images, _ in loader]
    assert [e for e, _ in seen] == [3, 3, 7, 7]
    for (epoch, images), batch in zip(seen, sampler.picks, strict=True):
        ds.set_epoch(int(epoch))
        assert torch.equal(images, torch.stack([ds[i][0] for i in batch]))
