"""DISC21-style benchmark builder and the embedded default benchmark."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isc.augment import synthetic_image
from isc.data.benchmark import build_benchmark, ensure_embedded_benchmark, package_photos
from isc.data.images import Disc21Layout


def identity(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image


def pool(n: int) -> list[Image.Image]:
    return [synthetic_image(np.random.default_rng(i), (80, 60)) for i in range(n)]


def digests(folder: Path) -> dict[str, str]:
    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_layout_and_ground_truth(tmp_path: Path) -> None:
    out = build_benchmark(
        pool(20), tmp_path / "b", query_transform=identity, n_references=6, n_training=4, n_queries=8,
        matched_fraction=0.5, seed=3,
    )  # fmt: skip
    layout = Disc21Layout(out)
    layout.validate()
    assert len(layout.ids("references")) == 6 and len(layout.ids("training")) == 4
    gt = layout.ground_truth()
    assert len(gt) == 8 and gt.num_positives == 4
    refs, train, queries = (digests(out / s) for s in ("references", "training", "queries"))
    # With an identity edit a matched query is byte-identical to its reference (same JPEG encoder) ...
    for q, r in zip(*gt.pairs(), strict=True):
        assert queries[q] == refs[r]
    # ... and an unmatched query is none of the references or training images.
    unmatched = gt.query_ids[~gt.matched]
    others = set(refs.values()) | set(train.values())
    assert all(queries[q] not in others for q in unmatched)
    assert not set(refs.values()) & set(train.values())


def test_query_edits_are_applied_and_seeded(tmp_path: Path) -> None:
    def darken(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return Image.eval(image, lambda v: int(v * rng.uniform(0.2, 0.5)))

    kwargs = dict(query_transform=darken, n_references=4, n_training=2, n_queries=4, matched_fraction=1.0)
    a = build_benchmark(pool(10), tmp_path / "a", seed=1, **kwargs)
    b = build_benchmark(pool(10), tmp_path / "b", seed=1, **kwargs)
    assert digests(a / "queries") == digests(b / "queries")
    gt = Disc21Layout(a).ground_truth()
    q, r = gt.pairs()
    query = np.asarray(Image.open(a / "queries" / f"{q[0]}.jpg"), dtype=float)
    ref = np.asarray(Image.open(a / "references" / f"{r[0]}.jpg"), dtype=float)
    assert query.mean() < 0.6 * ref.mean()


def test_refuses_impossible_sizes_and_existing_output(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pool has 5 images"):
        build_benchmark(
            pool(5), tmp_path / "x", query_transform=identity, n_references=4, n_training=2, n_queries=2
        )
    build_benchmark(
        pool(6), tmp_path / "y", query_transform=identity, n_references=2, n_training=2, n_queries=2
    )
    with pytest.raises(FileExistsError):
        build_benchmark(
            pool(6), tmp_path / "y", query_transform=identity, n_references=2, n_training=2, n_queries=2
        )


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_benchmark(
            pool(8), tmp_path / "z", query_transform=broken, n_references=2, n_training=2, n_queries=2
        )
    assert list(tmp_path.iterdir()) == []


def test_package_photos_are_distinct_real_images() -> None:
    photos = package_photos()
    assert len(photos) >= 50
    hashes = {hashlib.sha256(im.tobytes()).hexdigest() for _, im in photos}
    assert len(hashes) == len(photos)
    assert all(im.mode == "RGB" and min(im.size) >= 150 for _, im in photos)


def test_embedded_benchmark_is_built_once_and_cached(tmp_path: Path) -> None:
    root = ensure_embedded_benchmark(identity, tmp_path, "mini", n_references=6, n_training=4, n_queries=6)
    Disc21Layout(root).validate()
    stamp = (root / "ground_truth.csv").stat().st_mtime_ns

    def never(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        raise AssertionError("the cached benchmark must not be rebuilt")

    assert ensure_embedded_benchmark(never, tmp_path, "mini") == root
    assert (root / "ground_truth.csv").stat().st_mtime_ns == stamp
