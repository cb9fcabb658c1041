"""``task=generate`` (D2LV training sets of copies) and ``task=build_benchmark`` (DISC21-layout benchmarks)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from isc.data.benchmark import benchmark_pool_size, build_benchmark
from isc.data.generate import generate_copies_dataset
from isc.data.images import find_images
from isc.formats.files import atomic_write
from tasks.common import recipe_name

log = logging.getLogger(__name__)


def generate(cfg: DictConfig) -> dict[str, object]:
    """Write a D2LV-style training set of augmented copies (sharded, resumable) with the chosen recipe."""
    g = cfg.generate
    recipe = recipe_name("augmentation")
    sources = find_images(g.source)
    if cfg.paste_source is None:  # D2LV pastes other training images under/over a copy
        listing = Path(g.out_dir) / "paste_sources.txt"
        with atomic_write(listing) as tmp:
            tmp.write_text("".join(f"{p}\n" for p in sources))
        cfg.paste_source = {"_target_": "isc.augment.ImagePool", "paths_file": str(listing)}
    transform = instantiate(cfg.augmentation)
    if transform.sources_file:  # e.g. the face-rich subset: a user-given list of images
        sources = [
            Path(line.strip())
            for line in Path(transform.sources_file).read_text().splitlines()
            if line.strip()
        ]
    summary = generate_copies_dataset(
        sources,
        g.out_dir,
        transform,
        copies=g.copies,
        every=g.every,
        size=g.size,
        seed=g.seed,
        recipe=recipe,
        shard=g.shard,
        workers=g.workers,
        jpeg_quality=g.jpeg_quality,
    )
    print(
        f"{summary.classes} classes ({recipe or 'custom recipe'}): {summary.written} files written, "
        f"{summary.skipped_existing} already there, {len(summary.failed)} unreadable sources skipped"
    )
    print(f"manifest: {summary.manifest}\ncontact sheet: {summary.contact_sheet}")
    return {
        "classes": summary.classes,
        "written": summary.written,
        "skipped_existing": summary.skipped_existing,
        "failed": len(summary.failed),
    }


def build_benchmark_task(cfg: DictConfig) -> dict[str, object]:
    """Make a DISC21-layout benchmark from a pool of images with the chosen query recipe."""
    b = cfg.benchmark
    if Path(b.out_dir).exists():  # both checks before listing a pool that may hold millions of files
        raise FileExistsError(f"{b.out_dir} exists: choose another benchmark.out_dir or remove it")
    needed = benchmark_pool_size(b.n_references, b.n_training, b.n_queries, b.matched_fraction)
    log.info("listing %s for %d distinct images", b.pool, needed)
    out = build_benchmark(
        find_images(b.pool),
        b.out_dir,
        query_transform=instantiate(cfg.query_augmentation),
        n_references=b.n_references,
        n_training=b.n_training,
        n_queries=b.n_queries,
        matched_fraction=b.matched_fraction,
        seed=b.seed,
        max_side=b.max_side,
    )
    print(f"benchmark written to {out}: evaluate it with `python run.py task=evaluate dataset.root={out}`")
    return {"out_dir": str(out)}
