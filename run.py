"""Single entry point: ``python run.py task=<task> [overrides...]`` (Hydra).

Each task is a plain function that takes the composed config and returns a metrics dict, so a Hydra
sweeper can optimise what it returns. Everything a run produces goes into its Hydra run dir.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from isc.data.benchmark import build_benchmark, ensure_embedded_benchmark
from isc.data.generate import generate_copies_dataset
from isc.data.images import Disc21Layout, find_images
from isc.evaluation.extract import extract_descriptors, image_dataset
from isc.evaluation.io import atomic_write, read_descriptors, write_descriptors, write_predictions
from isc.evaluation.pipeline import MatchingSettings, match_descriptors

log = logging.getLogger("run")


def dataset_root(cfg: DictConfig) -> Path:
    """The DISC21-layout folder to use: ``dataset.root``, or the embedded benchmark (built on first use)."""
    if cfg.dataset.root:
        return Path(cfg.dataset.root).expanduser()
    d = cfg.dataset
    return ensure_embedded_benchmark(
        instantiate(cfg.query_augmentation),
        cfg.paths.cache_dir,
        d.name,
        n_references=d.n_references,
        n_training=d.n_training,
        n_queries=d.n_queries,
        matched_fraction=d.matched_fraction,
        seed=d.build_seed,
    )


def write_json(path: Path, obj: object) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def evaluate(cfg: DictConfig) -> dict[str, object]:
    """Extract descriptors on a DISC21-layout folder, match them, and score them against its ground truth."""
    out_dir = Path(cfg.paths.output_dir)
    e = cfg.evaluation
    layout = Disc21Layout(dataset_root(cfg))
    layout.validate()
    log.info("dataset: %s", layout.root)
    if e.descriptors:
        ids, descriptors, skipped = read_descriptor_file(Path(e.descriptors))
    else:
        ids, descriptors, skipped = extract_splits(cfg, layout)
    settings = MatchingSettings(
        k=e.k,
        whitening_dim=e.whitening.dim if e.whitening.enabled else None,
        eigen_power=e.whitening.eigen_power,
        score_norm_beta=e.score_normalization.beta if e.score_normalization.enabled else None,
        score_norm_k=e.score_normalization.k,
        backend=e.search_backend,
        device=None if e.device == "auto" else e.device,
        max_predictions=e.max_predictions,
    )
    training = descriptors.get("training")
    if training is None and settings.score_norm_beta:
        log.warning("no training descriptors: score normalisation disabled")
        settings = replace(settings, score_norm_beta=None)
    ground_truth = layout.ground_truth() if layout.has_ground_truth() else None
    result = match_descriptors(
        ids["queries"],
        descriptors["queries"],
        ids["references"],
        descriptors["references"],
        training,
        ground_truth,
        settings,
    )

    write_descriptors(
        out_dir / "descriptors.h5",
        ids["queries"],
        result.query,
        ids["references"],
        result.reference,
        ids.get("training"),
        result.training,
        max_dim=e.descriptor_track_max_dim,
    )
    write_predictions(out_dir / "predictions.csv", result.predictions, max_rows=e.max_predictions)
    metrics = result.metrics_dict()
    metrics["skipped_images"] = skipped
    write_json(out_dir / "metrics.json", metrics)
    if result.metrics is None:
        log.info("no ground truth: wrote %s", out_dir / "predictions.csv")
    else:
        raw = f" (without score normalisation: {_fmt(result.raw_metrics.uAP)})" if result.raw_metrics else ""
        print(f"uAP = {_fmt(result.metrics.uAP)}{raw}  recall@P90 = {_fmt(result.metrics.recall_at_p90)}")
        print(f"outputs in {out_dir}")
    return metrics


Splits = dict[str, np.ndarray]


def read_descriptor_file(path: Path) -> tuple[Splits, Splits, dict[str, int]]:
    """Precomputed descriptors (official HDF5 layout, optional training) instead of extraction."""
    d = read_descriptors(path)
    ids = {"queries": d.query_ids, "references": d.reference_ids}
    descriptors = {"queries": d.query, "references": d.reference}
    if d.training is not None:
        ids["training"], descriptors["training"] = d.training_ids, d.training
    log.info("descriptors from %s: %s", path, {k: v.shape for k, v in descriptors.items()})
    return ids, descriptors, {}


def extract_splits(cfg: DictConfig, layout: Disc21Layout) -> tuple[Splits, Splits, dict[str, int]]:
    """Descriptors of every split of ``layout`` with the configured backbone."""
    e = cfg.evaluation
    model = instantiate(cfg.backbone)
    ids: Splits = {}
    descriptors: Splits = {}
    skipped: dict[str, int] = {}
    splits = ["queries", "references"] + (["training"] if layout.has_split("training") else [])
    started = time.perf_counter()
    for split in splits:
        dataset = image_dataset(layout.paths(split), e.image_size, skip_bad=cfg.dataset.skip_bad_images)
        skipped[split] = len(dataset.skipped)
        ids[split] = np.asarray(dataset.ids)
        descriptors[split] = extract_descriptors(
            model,
            dataset,
            batch_size=e.batch_size,
            num_workers=e.num_workers,
            device=e.device,
            desc=f"{split} ({len(dataset)} images)",
        )
    n_images = sum(len(v) for v in ids.values())
    seconds = time.perf_counter() - started
    log.info("extracted %d descriptors in %.1f s (%.1f images/s)", n_images, seconds, n_images / seconds)
    if any(skipped.values()):
        log.warning("skipped unreadable images: %s", skipped)
    return ids, descriptors, skipped


def train(cfg: DictConfig) -> dict[str, object]:
    """Fit ``cfg.model`` on ``cfg.data`` with the configured trainer, loggers and callbacks.

    Pretraining and fine-tuning are both this task with different model/data configs. Loggers are
    closed (wandb ``finish``) even when training fails, so an offline run is never left half-written.
    """
    import lightning.pytorch as L

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # Hydra's root handler prints them
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    if cfg.model is None or cfg.data is None:
        raise ValueError(
            f"task={cfg.task} needs model and data configs: pick an experiment, e.g. experiment=..."
        )
    L.seed_everything(cfg.seed, workers=True)
    if cfg.dataset.root is None and "retrieval" in (cfg.get("callbacks") or {}):
        cfg.dataset.root = str(dataset_root(cfg))  # build the embedded benchmark the callback evaluates on
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    # A datamodule whose batch sampler shards by rank itself (P x K) must not get Lightning's sampler.
    sharding = {"use_distributed_sampler": False} if getattr(datamodule, "shards_itself", False) else {}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **sharding)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    finally:
        for logger in loggers:
            if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
                logger.experiment.finish()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        _print_uap_summary(callbacks)
    return metrics


def _print_uap_summary(callbacks: list[object]) -> None:
    """Off-the-shelf uAP next to the fine-tuned one, from the retrieval callback's record."""
    from callbacks.retrieval import RetrievalEvaluation

    for cb in callbacks:
        if isinstance(cb, RetrievalEvaluation) and cb.history:
            before, after = cb.baseline.get("val/uAP"), cb.history[-1]["val/uAP"]
            best = max(range(len(cb.history)), key=lambda i: cb.history[i]["val/uAP"])
            print(
                f"uAP before training {_fmt(before)} -> after {len(cb.history)} epoch(s) {_fmt(after)} "
                f"(best {_fmt(cb.history[best]['val/uAP'])} at epoch {best}; with score normalisation "
                f"{_fmt(cb.baseline.get('val/uAP_snorm'))} -> {_fmt(cb.history[-1].get('val/uAP_snorm'))})"
            )


def _recipe_name(group: str) -> str:
    from hydra.core.hydra_config import HydraConfig

    try:
        return str(HydraConfig.get().runtime.choices.get(group) or "")
    except ValueError:  # composed outside @hydra.main (tests, notebooks)
        return ""


def generate(cfg: DictConfig) -> dict[str, object]:
    """Write a D2LV-style training set of augmented copies (sharded, resumable) with the chosen recipe."""
    g = cfg.generate
    recipe = _recipe_name("augmentation")
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
    print(f"benchmark written to {out}: evaluate it with `python run.py dataset.root={out}`")
    return {"out_dir": str(out)}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


TASKS: dict[str, Callable[[DictConfig], dict[str, object]]] = {
    "evaluate": evaluate,
    "generate": generate,
    "build_benchmark": build_benchmark_task,
    "pretrain": train,
    "finetune": train,
}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose one of {sorted(TASKS)}")
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config_resolved.yaml", resolve=True)
    metrics = TASKS[cfg.task](cfg)
    value = metrics.get(cfg.optimized_metric, metrics.get("uAP"))
    return float(value) if isinstance(value, int | float) else None


if __name__ == "__main__":
    main()
