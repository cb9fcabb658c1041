"""``task=pretrain`` and ``task=finetune``: one Lightning fit with the configured model, data, trainer,
loggers and callbacks, then the summary of what training changed and what to run next."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from isc.data.images import SkippedImages
from tasks.common import dataset_root, fmt, write_json

log = logging.getLogger(__name__)


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
    from lightning_modules.base import wants_sync_batchnorm

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
                f"uAP before training {fmt(before.get('val/uAP'))} -> after {len(history) * every} epoch(s) "
                f"{fmt(history[-1]['val/uAP'])} (best {fmt(history[best]['val/uAP'])} at epoch "
                f"{(best + 1) * every - 1}) "
                f"with {cb.settings.describe()}; raw {fmt(before.get('val/uAP_raw'))} -> "
                f"{fmt(history[-1]['val/uAP_raw'])}"
            )
            for name, g in cb.grid:  # evaluation.grid: the same descriptors under each other setting
                key = f"val/grid/{name}/uAP"
                print(
                    f"  grid {name}: uAP before training {fmt(before.get(key))} -> after "
                    f"{len(history) * every} epoch(s) {fmt(history[-1].get(key))} (best "
                    f"{fmt(max(h.get(key, 0.0) for h in history))}) with {g.describe()}"
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
