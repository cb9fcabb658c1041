"""P x K sampler and the two sources of copy classes (on disk, on the fly)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from isc.augment import Compose, RandomResizedCrop, Resize, synthetic_image
from isc.data.copies import GeneratedCopiesDataset, OnlineCopiesDataset, PKSampler


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
