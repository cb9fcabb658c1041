"""Single entry point: ``python run.py task=<task> [overrides...]`` (Hydra).

Each task is a plain function that takes the composed config and returns a metrics dict, so a Hydra
sweeper can optimise what it returns. Everything a run produces goes into its Hydra run dir.
"""

from __future__ import annotations

import dataclasses
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

from isc.data.benchmark import (
    benchmark_pool_size,
    build_benchmark,
    default_cache_dir,
    ensure_embedded_benchmark,
)
from isc.data.generate import generate_copies_dataset
from isc.data.images import Disc21Layout, ImageFolderDataset, SkippedImages, check_images, find_images
from isc.evaluation.extract import image_dataset
from isc.evaluation.inference import ConcatModel, run_test_stage
from isc.evaluation.io import (
    DescriptorSource,
    atomic_write,
    read_descriptors,
    write_descriptors,
    write_predictions,
)
from isc.evaluation.matches import GroundTruth, Predictions
from isc.evaluation.pipeline import METRIC_NAMES, EvaluationSettings, headline_metrics, match_descriptors
from isc.evaluation.report import Evidence, Stage, report_figures, write_report
from isc.evaluation.shards import extract_sharded
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


def evaluate(cfg: DictConfig, predict: bool = False) -> dict[str, object]:
    """Extract descriptors on a DISC21-layout folder, match them, and score them against its ground truth.

    With ``predict=True`` (``task=predict``) the ground truth is never read: only the official matching
    CSV and descriptor file are written. Any of ``evaluation.scales``, ``local_verification`` or
    ``ensemble`` switches to D2LV's full test stage (:mod:`isc.evaluation.inference`).
    """
    out_dir = Path(cfg.paths.output_dir)
    settings = evaluation_settings(cfg)
    layout = Disc21Layout(dataset_root(cfg))
    if not predict:
        layout.validate()
    log.info("dataset: %s", layout.root)
    ground_truth = layout.ground_truth() if layout.has_ground_truth() and not predict else None
    if settings.test_stage:
        return _evaluate_test_stage(cfg, settings, layout, ground_truth)
    if settings.descriptors:
        ids, descriptors, skipped = read_descriptor_file(settings.descriptors)
        check_descriptor_ids(ids, layout)
        if "training" in ids and settings.max_training is not None:  # as split_paths: the first N by id
            keep = np.sort(np.argsort(ids["training"], kind="stable")[: settings.max_training])
            ids["training"], descriptors["training"] = ids["training"][keep], descriptors["training"][keep]
        settings.for_training_set(len(ids.get("training", ())))
        paths = settings.split_paths(layout)  # the report shows the images the ids name
    else:
        listed, skip_log = check_splits(cfg, layout, settings.split_paths(layout))
        settings.for_training_set(len(listed.get("training", ())))  # before extracting
        model = descriptor_model(cfg)
        check_model_dims(settings, model.dim)
        ids, descriptors, skipped, paths = extract_splits(cfg, listed, model, settings, skip_log)
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
    if ground_truth is not None:
        stage = Stage("global", {k: metrics[k] for k in METRIC_NAMES})  # type: ignore[misc]
        _write_report(cfg, result.predictions, ground_truth, [stage], paths, metrics)
    return _finish(cfg, metrics, result.predictions, ground_truth if result.metrics is not None else None)


def check_descriptor_ids(ids: dict[str, np.ndarray], layout: Disc21Layout) -> None:
    """Descriptors must describe this dataset's images: none known is an error, some unknown a warning.

    Otherwise a file for another dataset (or another query set) scores uAP 0 without a word.
    """
    for split in ("queries", "references"):
        given = np.asarray(ids[split])
        unknown = ~np.isin(given, np.asarray(layout.ids(split)))
        if len(given) and unknown.all():
            raise ValueError(
                f"none of the {len(given)} {split} ids in evaluation.descriptors is an image of "
                f"{layout.root / split} (first {given[0]!r}, folder e.g. {layout.ids(split)[:1]}): "
                "descriptors of another dataset?"
            )
        if unknown.any():
            log.warning(
                "%d of %d %s ids in evaluation.descriptors are not images of %s, e.g. %s",
                int(unknown.sum()),
                len(given),
                split,
                layout.root / split,
                ", ".join(map(str, given[unknown][:5])),
            )


def _finish(
    cfg: DictConfig, metrics: dict[str, object], predictions: Predictions, ground_truth: GroundTruth | None
) -> dict[str, object]:
    """Write ``metrics.json``, log to wandb when configured, print the headline and where outputs are."""
    out_dir = Path(cfg.paths.output_dir)
    write_json(out_dir / "metrics.json", metrics)
    scored = ground_truth is not None and "uAP" in metrics
    if scored and "report" in metrics:
        _log_report_to_wandb(cfg, predictions, ground_truth, metrics, Path(str(metrics["report"])))  # type: ignore[arg-type]
    if not scored:
        print(
            f"predictions written to {out_dir / 'predictions.csv'}, descriptors to {out_dir / 'descriptors.h5'}"
        )
        return metrics
    raw = f" (raw {_fmt(metrics['uAP_raw'])})" if "uAP_raw" in metrics else ""  # type: ignore[arg-type]
    print(
        f"uAP {_fmt(metrics['uAP'])} with {metrics['postprocessing']}{raw}, "  # type: ignore[arg-type]
        f"recall@P90 {_fmt(metrics['recall_at_p90'])}, recall@rank1 {_fmt(metrics['recall_at_rank1'])}"  # type: ignore[arg-type]
    )
    if "report" in metrics:
        print(f"report: {metrics['report']}")
    print(f"outputs in {out_dir}")
    return metrics


def check_model_dims(settings: EvaluationSettings, model_dim: int) -> None:
    """Whitening and descriptor-track dims against the model's output, before any image is read."""
    if settings.whitening.enabled and settings.whitening.dim > model_dim:
        raise ValueError(
            f"evaluation.whitening.dim={settings.whitening.dim} exceeds the model's {model_dim}-d "
            "descriptor: lower it"
        )
    max_dim = settings.descriptor_track_max_dim
    out_dim = settings.whitening.dim if settings.whitening.enabled else model_dim
    if max_dim is not None and out_dim > max_dim:
        raise ValueError(
            f"the descriptors would have {out_dim} dims but evaluation.descriptor_track_max_dim={max_dim}: "
            "enable evaluation.whitening with dim <= that, or raise the limit"
        )


def predict(cfg: DictConfig) -> dict[str, object]:
    """``task=predict``: the official matching CSV and descriptor file for queries without ground truth."""
    return evaluate(cfg, predict=True)


def test_stage_models(
    cfg: DictConfig, settings: EvaluationSettings
) -> tuple[list[torch.nn.Module], EvaluationSettings]:
    """The models of the test stage: ``evaluation.ensemble.models``, else ``ckpt_path`` or the backbone.

    Every file is loaded before any image is read, so a wrong path fails at once. The ``concat`` rule
    turns them into one model whose descriptor is whitened to ``ensemble.concat_dim``.
    """
    e = settings.ensemble
    if not e.models:
        models: list[torch.nn.Module] = [descriptor_model(cfg)]
    else:
        if cfg.ckpt_path:
            raise ValueError("give either ckpt_path or evaluation.ensemble.models, not both")
        models = [load_descriptor_model(Path(p).expanduser()) for p in e.models]
        if e.rule == "concat":
            models = [ConcatModel(models)]
            whitening = dataclasses.replace(settings.whitening, enabled=True, dim=e.concat_dim)
            settings = dataclasses.replace(settings, whitening=whitening)
    if settings.scales is None:
        size = getattr(models[0], "image_size", None) or settings.image_size
        settings = dataclasses.replace(settings, scales=(size,))
    for model in models:
        check_model_dims(settings, int(model.dim))  # type: ignore[arg-type]
    return models, settings


def _evaluate_test_stage(
    cfg: DictConfig, settings: EvaluationSettings, layout: Disc21Layout, ground_truth: GroundTruth | None
) -> dict[str, object]:
    """D2LV's test stage: every configured step, scored stage by stage on one extraction."""
    if settings.descriptors:
        raise ValueError(
            "evaluation.descriptors holds one descriptor per image; scales, local_verification and "
            "ensemble need the models: drop evaluation.descriptors or those settings"
        )
    listed, skip_log = check_splits(cfg, layout, settings.split_paths(layout))
    settings.for_training_set(len(listed.get("training", ())))
    models, settings = test_stage_models(cfg, settings)
    paths, ids, skipped = {}, {}, {}
    for split, files in listed.items():
        listing = ImageFolderDataset(files, skip_bad=cfg.dataset.skip_bad_images)
        paths[split], ids[split] = listing.paths, listing.ids
        skip_log.add(split, listing.skipped)
        skipped[split] = skip_log.count(split)
    started = time.perf_counter()
    result = run_test_stage(models, paths, ids, settings, ground_truth, descriptor_cache(cfg, settings))
    log.info("test stage took %.1f s", time.perf_counter() - started)
    out_dir = Path(cfg.paths.output_dir)
    q_ids, r_ids = np.asarray(ids["queries"]), np.asarray(ids["references"])
    t_ids = np.asarray(ids["training"]) if result.training_descriptors is not None else None
    write_descriptors(
        out_dir / "descriptors.h5",
        q_ids,
        result.query_descriptors,
        r_ids,
        result.reference_descriptors,
        t_ids,
        result.training_descriptors,
        max_dim=settings.descriptor_track_max_dim,
    )
    final = result.final
    write_predictions(out_dir / "predictions.csv", final.predictions, max_rows=settings.max_predictions)
    s = settings.for_training_set(len(paths.get("training", ())))
    metrics: dict[str, object] = {}
    if final.metrics is not None:
        d = final.metrics.to_dict()
        metrics.update({k: float(d[k] or 0.0) for k in METRIC_NAMES})
    metrics["postprocessing"] = " + ".join(
        [s.describe()] + [st.name.removeprefix("+ ") for st in result.stages[1:]]
    )
    metrics["stages"] = {
        st.name: {
            **({k: st.metrics.to_dict()[k] for k in METRIC_NAMES} if st.metrics is not None else {}),
            "seconds_per_query": st.seconds_per_query,
            "num_predictions": len(st.predictions),
        }
        for st in result.stages
    }
    metrics["num_predictions"] = len(final.predictions)
    metrics["skipped_images"] = skipped
    if ground_truth is not None:
        for st in result.stages:
            m = metrics["stages"][st.name]  # type: ignore[index]
            print(
                f"  {st.name:<22} uAP {_fmt(m['uAP'])}  recall@P90 {_fmt(m['recall_at_p90'])}  "
                f"{1000 * st.seconds_per_query:.1f} ms/query"
            )
        stages = [
            Stage(st.name, {k: metrics["stages"][st.name][k] for k in METRIC_NAMES}, st.seconds_per_query)  # type: ignore[index]
            for st in result.stages
        ]
        evidence = {  # boxes only where a part of the image won (the whole frame needs none)
            key: Evidence(
                None if qv.kind == "original" else qv.box, None if rv.kind == "original" else rv.box, label
            )
            for key, (qv, rv, label) in result.evidence().items()
        }
        _write_report(cfg, final.predictions, ground_truth, stages, paths, metrics, evidence)
    return _finish(cfg, metrics, final.predictions, ground_truth)


def _write_report(
    cfg: DictConfig,
    predictions: Predictions,
    ground_truth: GroundTruth,
    stages: list[Stage],
    paths: dict[str, list[Path]],
    metrics: dict[str, object],
    evidence: dict | None = None,
) -> None:
    """The HTML report beside the outputs (and its figures in wandb when that logger is configured)."""
    path = write_report(
        Path(cfg.paths.output_dir) / "report.html",
        predictions=predictions,
        ground_truth=ground_truth,
        stages=stages,
        query_paths={p.stem: p for p in paths["queries"]},  # ids are file stems (isc.data.images.image_id)
        reference_paths={p.stem: p for p in paths["references"]},
        evidence=evidence,
        subtitle=f"{dataset_root(cfg)} · model {_model_name(cfg)} · {metrics['postprocessing']}",
    )
    metrics["report"] = str(path)


def _model_name(cfg: DictConfig) -> str:
    models = cfg.evaluation.ensemble.models
    if models:
        return f"ensemble of {len(models)} ({cfg.evaluation.ensemble.rule})"
    return str(cfg.ckpt_path or _recipe_name("backbone") or cfg.backbone.get("_target_", ""))


def _log_report_to_wandb(
    cfg: DictConfig,
    predictions: Predictions,
    ground_truth: GroundTruth,
    metrics: dict[str, object],
    path: Path,
) -> None:
    """With ``logger=wandb``: the headline figures, the PR curve, the score histograms and the page itself."""
    if "wandb" not in (cfg.get("logger") or {}):
        return
    import wandb

    figures = report_figures(predictions, ground_truth)
    w = cfg.logger.wandb
    run = wandb.init(
        project=w.project, name=f"{cfg.task}", dir=str(cfg.paths.output_dir), mode=w.mode, reinit=True
    )
    try:
        pr = wandb.Table(
            columns=["recall", "precision"],
            data=list(zip(figures["recall"], figures["precision"], strict=True)),
        )
        run.log(
            {
                **{f"test/{k}": v for k, v in metrics.items() if isinstance(v, int | float)},
                "test/pr_curve": wandb.plot.line(pr, "recall", "precision", title="precision-recall"),
                "test/true_pair_scores": wandb.Histogram(
                    np_histogram=(figures["true_counts"], figures["bin_edges"])
                ),
                "test/false_pair_scores": wandb.Histogram(
                    np_histogram=(figures["false_counts"], figures["bin_edges"])
                ),
                "test/report": wandb.Html(path.read_text()),
            }
        )
    finally:
        run.finish()


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


def check_splits(
    cfg: DictConfig, layout: Disc21Layout, listed: dict[str, list[Path]]
) -> tuple[dict[str, list[Path]], SkippedImages]:
    """The pre-pass before any model is built: no empty split, valid ids, readable image headers.

    Files it finds unreadable are an error naming them, or with ``dataset.skip_bad_images`` left out and
    listed in ``skipped_images.csv`` in the run dir. Returns the listing to extract and that list.
    """
    for split in ("queries", "references"):
        if split in listed and not listed[split]:
            raise ValueError(f"{layout.root / split} holds no images: nothing to evaluate")
    checked, skipped = {}, SkippedImages(Path(cfg.paths.output_dir) / "skipped_images.csv")
    for split, files in listed.items():
        checked[split], bad = check_images(
            files,
            f"{split}/ of {layout.root}",
            skip_bad=cfg.dataset.skip_bad_images,
            num_workers=max(8, cfg.evaluation.num_workers),
        )
        skipped.add(split, bad)
    return checked, skipped


def descriptor_cache(cfg: DictConfig, settings: EvaluationSettings) -> Path | None:
    """Where resumable extraction keeps its shards: ``evaluation.cache_dir`` (``auto``: the user cache)."""
    if settings.cache_dir in (None, "", False):
        return None
    if settings.cache_dir == "auto":
        root = Path(cfg.paths.cache_dir).expanduser() if cfg.paths.cache_dir else default_cache_dir()
        return root / "descriptors"
    return Path(str(settings.cache_dir)).expanduser().absolute()


def extract_splits(
    cfg: DictConfig,
    listed: dict[str, list[Path]],
    model: DescriptorModel,
    settings: EvaluationSettings,
    skip_log: SkippedImages,
) -> tuple[Splits, Splits, dict[str, int], dict[str, list[Path]]]:
    """Descriptors of every split of the checked listing with ``model`` at its recorded input size."""
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
    paths: dict[str, list[Path]] = {}
    cache = descriptor_cache(cfg, settings)
    started = time.perf_counter()
    for split, files in listed.items():
        dataset = image_dataset(files, image_size, skip_bad=cfg.dataset.skip_bad_images)
        skip_log.add(split, dataset.skipped)
        skipped[split] = skip_log.count(split)
        ids[split], paths[split] = np.asarray(dataset.ids), list(dataset.paths)
        descriptors[split] = extract_sharded(
            model,
            dataset,
            cache,
            shard_size=settings.shard_size,
            batch_size=settings.batch_size,
            num_workers=settings.num_workers,
            device=settings.device,
            image_size=image_size,
            name=split,
            desc=f"{split} ({len(dataset)} images)",
        )
    n_images = sum(len(v) for v in ids.values())
    seconds = time.perf_counter() - started
    log.info("extracted %d descriptors in %.1f s (%.1f images/s)", n_images, seconds, n_images / seconds)
    if any(skipped.values()):
        log.warning("skipped unreadable images: %s, listed in %s", skipped, skip_log.path)
    return ids, descriptors, skipped, paths


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
        _write_training_skips(cfg, trainer, datamodule, callbacks)
        for logger in loggers:
            if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
                logger.experiment.finish()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        _print_training_summary(cfg, callbacks)
    return metrics


def _write_training_skips(
    cfg: DictConfig, trainer: object, datamodule: object, callbacks: list[object]
) -> None:
    """``skipped_images.csv`` in the run dir: what ``dataset.skip_bad_images`` left out of this run."""
    if not getattr(trainer, "is_global_zero", True):
        return
    log_ = SkippedImages(Path(cfg.paths.output_dir) / "skipped_images.csv")
    log_.add("train", getattr(datamodule, "skipped", []))
    by_split: dict[str, list[tuple[Path, str]]] = {}
    for cb in callbacks:
        for split, path, reason in getattr(cb, "skipped", []):
            by_split.setdefault(f"val/{split}", []).append((path, reason))
    for split, bad in by_split.items():
        log_.add(split, bad)
    if log_.rows:
        log.warning("%d unreadable image(s) were skipped, listed in %s", len(log_.rows), log_.path)


def _print_training_summary(cfg: DictConfig, callbacks: list[object]) -> None:
    """Off-the-shelf uAP next to the fine-tuned one (configured post-processing and raw), and what to run next."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.retrieval import RetrievalEvaluation

    for cb in callbacks:
        if isinstance(cb, RetrievalEvaluation) and cb.history:
            before, history = cb.baseline, cb.history
            best = max(range(len(history)), key=lambda i: history[i]["val/uAP"])
            every = cb.every_n_epochs  # history[i] was measured after epoch (i + 1) * every - 1
            print(
                f"uAP before training {_fmt(before.get('val/uAP'))} -> after {len(history) * every} epoch(s) "
                f"{_fmt(history[-1]['val/uAP'])} (best {_fmt(history[best]['val/uAP'])} at epoch "
                f"{(best + 1) * every - 1}) "
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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


TASKS: dict[str, Callable[[DictConfig], dict[str, object]]] = {
    "evaluate": evaluate,
    "predict": predict,
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
