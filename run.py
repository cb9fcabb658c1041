"""Single entry point: ``python run.py task=<task> [overrides...]`` (Hydra).

Each task is a plain function that takes the composed config and returns a metrics dict, so a Hydra
sweeper can optimise what it returns. Everything a run produces goes into its Hydra run dir.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from isc.data.benchmark import build_benchmark, ensure_embedded_benchmark
from isc.data.generate import generate_copies_dataset
from isc.data.images import Disc21Layout, find_images
from isc.evaluation.extract import extract_descriptors, image_dataset
from isc.evaluation.io import (
    DescriptorSource,
    atomic_write,
    read_descriptors,
    write_descriptors,
    write_predictions,
)
from isc.evaluation.pipeline import EvaluationSettings, headline_metrics, match_descriptors
from isc.models.descriptor import DescriptorModel, load_descriptor_model, save_descriptor_model

log = logging.getLogger("run")


def dataset_root(cfg: DictConfig) -> Path:
    """The DISC21-layout folder to use: ``dataset.root``, or the embedded benchmark (built on first use)."""
    if cfg.dataset.root:  # `dataset=disc21` without a root stops here (conf/dataset/disc21.yaml)
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


def evaluation_settings(cfg: DictConfig) -> EvaluationSettings:
    """The ``evaluation:`` config parsed once; every task and the retrieval callback use this object."""
    return EvaluationSettings.from_dict(OmegaConf.to_container(cfg.evaluation, resolve=True))  # type: ignore[arg-type]


def descriptor_model(cfg: DictConfig) -> DescriptorModel:
    """The model to evaluate or export: ``ckpt_path`` (a training checkpoint or an exported file), else ``backbone``."""
    if cfg.ckpt_path:
        return load_descriptor_model(Path(cfg.ckpt_path).expanduser())
    model: DescriptorModel = instantiate(cfg.backbone)
    return model


def evaluate(cfg: DictConfig) -> dict[str, object]:
    """Extract descriptors on a DISC21-layout folder, match them, and score them against its ground truth."""
    out_dir = Path(cfg.paths.output_dir)
    settings = evaluation_settings(cfg)
    layout = Disc21Layout(dataset_root(cfg))
    layout.validate()
    log.info("dataset: %s", layout.root)
    if settings.descriptors:
        ids, descriptors, skipped = read_descriptor_file(settings.descriptors)
        settings.for_training_set(len(ids.get("training", ())))
    else:
        n_training = len(layout.paths("training")) if layout.has_split("training") else 0
        settings.for_training_set(n_training)  # refuse impossible post-processing before extracting
        model = descriptor_model(cfg)
        max_dim = settings.descriptor_track_max_dim
        out_dim = settings.whitening.dim if settings.whitening.enabled else model.dim
        if max_dim is not None and out_dim > max_dim:
            raise ValueError(
                f"the descriptors would have {out_dim} dims but evaluation.descriptor_track_max_dim={max_dim}: "
                "enable evaluation.whitening with dim <= that, or raise the limit"
            )
        ids, descriptors, skipped = extract_splits(cfg, layout, model, settings)
    ground_truth = layout.ground_truth() if layout.has_ground_truth() else None
    result = match_descriptors(
        ids["queries"],
        descriptors["queries"],
        ids["references"],
        descriptors["references"],
        descriptors.get("training"),
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
        max_dim=settings.descriptor_track_max_dim,
    )
    write_predictions(out_dir / "predictions.csv", result.predictions, max_rows=settings.max_predictions)
    metrics: dict[str, object] = dict(headline_metrics(result))
    metrics["postprocessing"] = settings.for_training_set(len(ids.get("training", ()))).describe()
    metrics["num_predictions"] = len(result.predictions)
    metrics["skipped_images"] = skipped
    write_json(out_dir / "metrics.json", metrics)
    if result.metrics is None:
        print(f"no ground truth: predictions written to {out_dir / 'predictions.csv'}")
    else:
        print(
            f"uAP {_fmt(metrics['uAP'])} with {metrics['postprocessing']} (raw {_fmt(metrics['uAP_raw'])}), "
            f"recall@P90 {_fmt(metrics['recall_at_p90'])}, recall@rank1 {_fmt(metrics['recall_at_rank1'])}"
        )
        print(f"outputs in {out_dir}")
    return metrics


def export(cfg: DictConfig) -> dict[str, object]:
    """Write the descriptor model (``ckpt_path`` or the configured backbone) as one self-contained file."""
    settings = evaluation_settings(cfg)
    model = descriptor_model(cfg)
    if model.image_size is None:
        model.image_size = settings.image_size
    path = save_descriptor_model(model, Path(cfg.paths.output_dir) / "descriptor_model.pt")
    print(f"exported a {model.dim}-d descriptor model ({model.image_size} px input) to {path}")
    print(f"evaluate it with: python run.py task=evaluate ckpt_path={path}")
    return {"path": str(path), "descriptor_dim": model.dim, "image_size": model.image_size}


Splits = dict[str, np.ndarray]


def read_descriptor_file(source: DescriptorSource) -> tuple[Splits, Splits, dict[str, int]]:
    """Precomputed descriptors: a submission HDF5 file, or per-split files {queries, references, training}."""
    d = read_descriptors(source)
    ids = {"queries": d.query_ids, "references": d.reference_ids}
    descriptors = {"queries": d.query, "references": d.reference}
    if d.training is not None:
        ids["training"], descriptors["training"] = d.training_ids, d.training
    log.info("descriptors from %s: %s", source, {k: v.shape for k, v in descriptors.items()})
    return ids, descriptors, {}


def extract_splits(
    cfg: DictConfig, layout: Disc21Layout, model: DescriptorModel, settings: EvaluationSettings
) -> tuple[Splits, Splits, dict[str, int]]:
    """Descriptors of every split of ``layout`` with ``model`` at its recorded input size."""
    image_size = model.image_size or settings.image_size
    if model.image_size and model.image_size != settings.image_size:
        log.info(
            "evaluating at the model's %d px (evaluation.image_size=%d)",
            model.image_size,
            settings.image_size,
        )
    ids: Splits = {}
    descriptors: Splits = {}
    skipped: dict[str, int] = {}
    splits = ["queries", "references"] + (["training"] if layout.has_split("training") else [])
    started = time.perf_counter()
    for split in splits:
        dataset = image_dataset(layout.paths(split), image_size, skip_bad=cfg.dataset.skip_bad_images)
        skipped[split] = len(dataset.skipped)
        ids[split] = np.asarray(dataset.ids)
        descriptors[split] = extract_descriptors(
            model,
            dataset,
            batch_size=settings.batch_size,
            num_workers=settings.num_workers,
            device=settings.device,
            desc=f"{split} ({len(dataset)} images)",
        )
    n_images = sum(len(v) for v in ids.values())
    seconds = time.perf_counter() - started
    log.info("extracted %d descriptors in %.1f s (%.1f images/s)", n_images, seconds, n_images / seconds)
    if any(skipped.values()):
        log.warning("skipped unreadable images: %s", skipped)
    return ids, descriptors, skipped


def check_training_task(cfg: DictConfig) -> None:
    """The task must match the model the experiment picks: ``task=pretrain`` never runs fine-tuning."""
    if cfg.model is None or cfg.data is None:
        raise ValueError(
            f"task={cfg.task} needs model and data configs: pick an experiment, e.g. "
            "experiment=pretrain_barlow_r50 (pretraining) or experiment=embedded_demo (fine-tuning)"
        )
    model_task = getattr(get_class(cfg.model._target_), "task", None)
    if model_task is not None and model_task != cfg.task:
        hint = (
            "experiment=pretrain_barlow_r50, pretrain_m2t_r152 or pretrain_m2t_r50ibn"
            if cfg.task == "pretrain"
            else "experiment=embedded_demo or finetune_d2lv_r50 (r152, r50ibn)"
        )
        raise ValueError(
            f"task={cfg.task} but model={cfg.model._target_} is a {model_task} model: pick {hint}, "
            f"or drop the task override"
        )


def train(cfg: DictConfig) -> dict[str, object]:
    """Fit ``cfg.model`` on ``cfg.data`` with the configured trainer, loggers and callbacks.

    Pretraining and fine-tuning are both this task with different model/data configs. The model is built
    first, so a wrong combination (a pretraining loss in a fine-tuning model, ...) fails before any data
    or evaluation work. Loggers are closed (wandb ``finish``) even when training fails, so an offline run
    is never left half-written.
    """
    import lightning.pytorch as L

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # Hydra's root handler prints them
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    check_training_task(cfg)
    L.seed_everything(cfg.seed, workers=True)
    model = instantiate(cfg.model)
    if cfg.dataset.root is None and "retrieval" in (cfg.get("callbacks") or {}):
        cfg.dataset.root = str(dataset_root(cfg))  # build the embedded benchmark the callback evaluates on
    datamodule = instantiate(cfg.data)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    # A datamodule whose batch sampler shards by rank itself (P x K) must not get Lightning's sampler.
    from lightning_modules import wants_sync_batchnorm

    extra: dict[str, object] = (
        {"use_distributed_sampler": False} if getattr(datamodule, "shards_itself", False) else {}
    )
    if cfg.trainer.get("sync_batchnorm") is None:  # null = auto: global-batch BN on multi-GPU runs only
        t = cfg.trainer
        extra["sync_batchnorm"] = wants_sync_batchnorm(t.accelerator, t.devices, t.get("num_nodes", 1))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)
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
        _print_training_summary(cfg, callbacks)
    return metrics


def _print_training_summary(cfg: DictConfig, callbacks: list[object]) -> None:
    """Off-the-shelf uAP next to the fine-tuned one (configured post-processing and raw), and what to run next."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.retrieval import RetrievalEvaluation

    for cb in callbacks:
        if isinstance(cb, RetrievalEvaluation) and cb.history:
            before, history = cb.baseline, cb.history
            best = max(range(len(history)), key=lambda i: history[i]["val/uAP"])
            print(
                f"uAP before training {_fmt(before.get('val/uAP'))} -> after {len(history)} epoch(s) "
                f"{_fmt(history[-1]['val/uAP'])} (best {_fmt(history[best]['val/uAP'])} at epoch {best}) "
                f"with {cb.settings.describe()}; raw {_fmt(before.get('val/uAP_raw'))} -> "
                f"{_fmt(history[-1]['val/uAP_raw'])}"
            )
    checkpoints = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.best_model_path]
    checkpoints.sort(key=lambda cb: cb.monitor is None)  # the one ranked by val/uAP first
    print(f"outputs in {cfg.paths.output_dir}")
    if checkpoints:
        which = "best" if checkpoints[0].monitor else "last"
        print(f"evaluate the {which} checkpoint with:")
        print(f"  python run.py {_evaluate_overrides(cfg)}ckpt_path={checkpoints[0].best_model_path}")


def _evaluate_overrides(cfg: DictConfig) -> str:
    """The overrides that make ``task=evaluate`` score a checkpoint with this run's evaluation settings."""
    from hydra.core.hydra_config import HydraConfig

    words = []
    try:
        hydra_cfg = HydraConfig.get()
        experiment = hydra_cfg.runtime.choices.get("experiment")
        if experiment and experiment != "embedded_demo":
            words.append(f"experiment={experiment}")
        words += [
            o for o in hydra_cfg.overrides.task if o.startswith(("evaluation.", "evaluation=", "dataset="))
        ]
    except ValueError:  # composed outside @hydra.main (tests, notebooks)
        pass
    words += ["task=evaluate", f"dataset.root={cfg.dataset.root}"]
    return " ".join(words) + " "


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
    print(f"benchmark written to {out}: evaluate it with `python run.py task=evaluate dataset.root={out}`")
    return {"out_dir": str(out)}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


TASKS: dict[str, Callable[[DictConfig], dict[str, object]]] = {
    "evaluate": evaluate,
    "export": export,
    "generate": generate,
    "build_benchmark": build_benchmark_task,
    "pretrain": train,
    "finetune": train,
}


def _required(message: str) -> object:
    """``${required:...}``: a config value the user must give; resolving it stops with ``message``."""
    raise ValueError(f"missing setting: {message}")


OmegaConf.register_new_resolver("required", _required, replace=True)


def run_task(cfg: DictConfig) -> float | None:
    """What ``main`` does with the composed config (also callable from tests and notebooks)."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose one of {sorted(TASKS)}")
    for key in ("loss", "optimizer", "scheduler"):
        if key in cfg:  # `+loss=...` would add a key nothing reads
            raise ValueError(f"the {key} belongs to the model: use model/{key}=<name> (see --help)")
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config_resolved.yaml", resolve=True)  # also checks required settings
    metrics = TASKS[cfg.task](cfg)
    value = metrics.get(cfg.optimized_metric, metrics.get("uAP"))
    return float(value) if isinstance(value, int | float) else None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_task(cfg)


if __name__ == "__main__":
    main()
