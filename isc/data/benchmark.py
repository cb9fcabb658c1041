"""DISC21-style benchmarks built from a pool of images, and the embedded default benchmark.

A benchmark folder has ``references/``, ``training/``, ``queries/`` and ``ground_truth.csv``, and
``query_boxes.csv``: where a query's edits pasted its image into a larger canvas (the paste-box CSV of
:mod:`isc.formats.paste_boxes`, for training a learned overlay detector). Queries
are edited copies of some references (the matched fraction) or edits of pool images that appear
nowhere else (unmatched, as most DISC21 queries are). Ids are assigned in shuffled order so that
nothing about a file's name leaks whether or what it matches.

The embedded default needs no download: it tiles the real photos that scikit-image ships into
distinct images and caches the built benchmark in the user's cache directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from isc.augment import record_pastes
from isc.data.images import load_image
from isc.formats.pair_csv import write_ground_truth
from isc.formats.pairs import GroundTruth
from isc.formats.paste_boxes import PasteBox, write_paste_boxes

log = logging.getLogger(__name__)

QUERY_BOXES_NAME = "query_boxes.csv"

__all__ = ["build_benchmark", "package_photos", "ensure_embedded_benchmark", "default_cache_dir"]

QueryTransform = Callable[[Image.Image, np.random.Generator], Image.Image]
ImageSource = Path | str | Image.Image

# scikit-image sample photos that ship inside its wheel (chelsea == cat, so only one of them).
_SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)


def _tiles(
    name: str, image: Image.Image, min_side: int = 200, min_std: float = 20.0
) -> list[tuple[str, Image.Image]]:
    """Split a large photo into non-overlapping tiles: distinct images, none a crop of another in the set."""
    w, h = image.size
    cols, rows = max(1, w // min_side // 1), max(1, h // min_side // 1)
    cols, rows = min(cols, 3), min(rows, 3)
    if cols == 1 and rows == 1:
        return [(name, image)]
    out = []
    for r in range(rows):
        for c in range(cols):
            box = (c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows)
            tile = image.crop(box)
            if np.asarray(tile.convert("L"), dtype=np.float32).std() >= min_std:  # skip blank tiles
                out.append((f"{name}_{r}{c}", tile))
    return out


def package_photos() -> list[tuple[str, Image.Image]]:
    """Real photos shipped by installed packages (scikit-image), tiled into distinct RGB images."""
    import skimage.data

    photos: list[tuple[str, Image.Image]] = []
    for name in _SKIMAGE_PHOTOS:
        array = getattr(skimage.data, name)()
        photos.extend(_tiles(name, Image.fromarray(array).convert("RGB")))
    left, right, _ = skimage.data.stereo_motorcycle()
    photos.extend(_tiles("motorcycle", Image.fromarray(left).convert("RGB")))
    return photos


def _as_image(source: ImageSource) -> Image.Image:
    return source.convert("RGB") if isinstance(source, Image.Image) else load_image(source)


def _limit_size(image: Image.Image, max_side: int | None) -> Image.Image:
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def benchmark_pool_size(n_references: int, n_training: int, n_queries: int, matched_fraction: float) -> int:
    """How many distinct pool images a benchmark of these sizes needs; checked before the pool is listed.

    References, training images and unmatched queries are all different pool images; matched queries
    are edited copies of references.
    """
    for key, value in (("n_references", n_references), ("n_training", n_training), ("n_queries", n_queries)):
        if value < 0:
            raise ValueError(f"benchmark.{key} must be >= 0, got {value}")
    if not 0.0 <= matched_fraction <= 1.0:
        raise ValueError(f"benchmark.matched_fraction must be in [0, 1], got {matched_fraction}")
    n_matched = round(n_queries * matched_fraction)
    if n_matched > n_references:
        raise ValueError(
            f"{n_matched} matched queries (benchmark.n_queries x benchmark.matched_fraction) need at least "
            f"as many references: benchmark.n_references={n_references}"
        )
    return n_references + n_training + n_queries - n_matched


def build_benchmark(
    pool: Sequence[ImageSource],
    out_dir: str | Path,
    *,
    query_transform: QueryTransform,
    n_references: int,
    n_training: int,
    n_queries: int,
    matched_fraction: float = 0.5,
    seed: int = 0,
    max_side: int | None = 512,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> Path:
    """Write a DISC21-layout benchmark made from ``pool`` into ``out_dir`` and return its path.

    The folder appears atomically (built in a temporary sibling and renamed), so a killed build never
    leaves a half-written benchmark that a later run would mistake for a finished one.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to rebuild it")
    needed = benchmark_pool_size(n_references, n_training, n_queries, matched_fraction)
    if needed > len(pool):
        raise ValueError(
            f"the pool has {len(pool)} images but benchmark.n_references={n_references} + "
            f"benchmark.n_training={n_training} + the unmatched share of benchmark.n_queries={n_queries} "
            f"need {needed} distinct images: lower those sizes or give a larger benchmark.pool"
        )
    n_matched = round(n_queries * matched_fraction)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    references = order[:n_references]
    training = order[n_references : n_references + n_training]
    unmatched = order[n_references + n_training : needed]
    matched_refs = rng.choice(n_references, size=n_matched, replace=False)
    # (pool index, reference position or -1), shuffled so query ids carry no information.
    queries = [(int(references[r]), int(r)) for r in matched_refs] + [(int(i), -1) for i in unmatched]
    queries = [queries[i] for i in rng.permutation(len(queries))]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for split, prefix, width, indices in (
            ("references", "R", 6, references),
            ("training", "T", 6, training),
        ):
            (tmp / split).mkdir()
            for j, i in enumerate(indices):
                image = _limit_size(_as_image(pool[i]), max_side)
                image.save(tmp / split / f"{prefix}{j:0{width}d}.jpg", quality=jpeg_quality)
        (tmp / "queries").mkdir()
        gt_queries, gt_refs = [], []
        query_boxes: dict[str, PasteBox] = {}
        for q, (pool_index, ref_pos) in enumerate(queries):
            query_id = f"Q{q:05d}"
            query_rng = np.random.default_rng([seed, 1, q])
            with record_pastes() as record:
                image = query_transform(_limit_size(_as_image(pool[pool_index]), max_side), query_rng)
            if record.pasted:
                query_boxes[query_id] = record.box
            image.convert("RGB").save(tmp / "queries" / f"{query_id}.jpg", quality=jpeg_quality)
            gt_queries.append(query_id)
            gt_refs.append(f"R{ref_pos:06d}" if ref_pos >= 0 else "")
        write_ground_truth(tmp / "ground_truth.csv", GroundTruth(np.array(gt_queries), np.array(gt_refs)))
        write_paste_boxes(tmp / QUERY_BOXES_NAME, query_boxes)
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # fails if another process finished first: its copy is kept
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "built benchmark %s: %d references, %d training, %d queries (%d matched)",
        out_dir,
        n_references,
        n_training,
        n_queries,
        n_matched,
    )
    return out_dir


def default_cache_dir() -> Path:
    """Where built benchmarks are cached: ``$ISC_CACHE_DIR`` or the platform's user cache directory."""
    env = os.environ.get("ISC_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("isc-copy-detection"))


def ensure_embedded_benchmark(
    query_transform: QueryTransform,
    cache_dir: str | Path | None = None,
    name: str = "embedded-v2",
    *,
    n_references: int = 24,
    n_training: int = 24,
    n_queries: int = 36,
    matched_fraction: float = 2 / 3,
    seed: int = 0,
) -> Path:
    """The embedded default benchmark, built from package photos on first use and cached afterwards.

    Change ``name`` when changing any other argument: the cache is keyed by name only.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out_dir = root / name
    if (out_dir / "ground_truth.csv").is_file():
        return out_dir
    log.info("building the embedded benchmark in %s (first use only)", out_dir)
    images = [image for _, image in package_photos()]
    try:
        return build_benchmark(
            images,
            out_dir,
            query_transform=query_transform,
            n_references=n_references,
            n_training=n_training,
            n_queries=n_queries,
            matched_fraction=matched_fraction,
            seed=seed,
            overwrite=out_dir.exists(),  # a stale folder without ground truth is rebuilt
        )
    except OSError:
        if (out_dir / "ground_truth.csv").is_file():  # built concurrently by another process
            return out_dir
        raise
