"""Per-epoch copy-detection evaluation: descriptors -> faiss index -> official uAP, logged everywhere.

Under DDP each rank embeds its own contiguous shard of the benchmark images; rank 0 gathers them,
searches and scores (``isc.evaluation.settings``, the same code as ``run.py task=evaluate``), then broadcasts
the metrics so every rank logs identical values and ``ModelCheckpoint(monitor="val/uAP")`` agrees.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from callbacks.gallery import match_gallery
from callbacks.scoring import SPLITS, score_benchmark
from isc.data.images import Disc21Layout, screen_for_training
from isc.evaluation.evaluated_model import evaluated_model
from isc.evaluation.extract import extract
from isc.evaluation.results import EvaluationResult
from isc.evaluation.runner import split_paths
from isc.evaluation.settings import EvaluationSettings

log = logging.getLogger(__name__)


class _Embedder(nn.Module):
    """Adapts a LightningModule's ``embed(images) -> (B, D)`` to the extraction loop."""

    def __init__(self, module: L.LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.embed(images)  # type: ignore[operator]


class RetrievalEvaluation(L.Callback):
    """Evaluate copy detection on a DISC21-layout benchmark after every ``every_n_epochs`` training epochs.

    ``evaluation`` is the same settings object ``task=evaluate`` uses (:class:`EvaluationSettings`, or the
    ``evaluation:`` config as a mapping), applied the same way: PCA-whitening and score normalisation as
    configured, the same search backend and cap. Logs ``val/uAP``, ``val/recall_at_p90``,
    ``val/recall_at_rank1``, ``val/recall_at_rank10`` with that post-processing and the same with ``_raw``
    (plain descriptors), and ``val/grid/<setting>/uAP`` / ``recall_at_p90`` for every other entry of
    ``evaluation.grid`` (``raw`` is the ``_raw`` figures already). The descriptor is ``pl_module.descriptor_model()`` (the network a checkpoint
    export holds) or, for other modules, ``pl_module.embed(images in [0, 1])``.

    The model is evaluated once before training (``val/...`` at step 0 in the loggers and ``baseline``
    here), so a run shows the off-the-shelf figure beside the fine-tuned one; a resumed run keeps the
    baseline and history of its checkpoint and never measures or logs them again.
    """

    def __init__(
        self,
        root: str,
        evaluation: EvaluationSettings | Mapping[str, Any] | None = None,
        every_n_epochs: int = 1,
        evaluate_before_training: bool = True,
        gallery_queries: int = 6,
        skip_bad: bool = False,
    ) -> None:
        super().__init__()
        self.root = root
        if evaluation is None or isinstance(evaluation, EvaluationSettings):
            self.settings = evaluation or EvaluationSettings()
        else:
            self.settings = EvaluationSettings.from_dict(_plain(evaluation))
        self.every_n_epochs = every_n_epochs
        self.evaluate_before_training = evaluate_before_training
        self.gallery_queries = gallery_queries
        self.baseline: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._layout: Disc21Layout | None = None
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, Path, str]] = []  # (split, path, reason) left out with skip_bad
        self._screened: dict[str, list[Path]] | None = None
        self.grid: list[tuple[str, EvaluationSettings]] = []  # evaluation.grid beyond raw and the configured

    # -- hooks ---------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Check the settings against the benchmark before any training or extraction.
        n_training = len(self._paths.get("training", ()))
        self.settings = self.settings.for_training_set(n_training)
        self.grid = _grid(self.settings, n_training)
        resumed = bool(self.baseline) or bool(self.history) or trainer.ckpt_path is not None
        if not self.evaluate_before_training or trainer.sanity_checking or resumed:
            return
        self.baseline = self.evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.baseline, step=0)
            rank_zero_info(f"before training: {_summary(self.baseline)}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        metrics = self.evaluate(trainer, pl_module)
        self.history.append(metrics)
        pl_module.log_dict(metrics, sync_dist=True, prog_bar=False)  # identical on every rank already
        pl_module.log("val/uAP_prog", metrics["val/uAP"], prog_bar=True, logger=False, sync_dist=True)
        rank_zero_info(f"epoch {trainer.current_epoch}: {_summary(metrics)}")

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = dict(state_dict.get("baseline", {}))
        self.history = list(state_dict.get("history", []))

    # -- evaluation ----------------------------------------------------------------------------------

    @property
    def _paths(self) -> dict[str, list[Path]]:
        """The images evaluated per split (``evaluation.max_training`` caps training), checked once.

        Unreadable ones stop the run before training, or with ``skip_bad`` are left out and listed in
        ``skipped``, as ``task=evaluate`` does.
        """
        if self._screened is None:
            screened = {}
            for split, files in split_paths(self.layout, self.settings.max_training).items():
                screened[split], bad = screen_for_training(
                    files, f"{split}/ of {self.layout.root}", skip_bad=self.skip_bad
                )
                self.skipped += [(split, p, reason) for p, reason in bad]
            self._screened = screened
        return self._screened

    @property
    def layout(self) -> Disc21Layout:
        if self._layout is None:
            self._layout = Disc21Layout(Path(self.root).expanduser())
            self._layout.validate()
        return self._layout

    def _descriptor_model(self, trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module:
        """The test-time network, with rank 0's batch-norm statistics on every rank.

        Under DDP each rank's running statistics drift apart (each updates them from its own batches), so
        without this the descriptors of a shard would depend on which rank embedded it.
        """
        build = getattr(pl_module, "descriptor_model", None)
        model: nn.Module = build() if callable(build) else _Embedder(pl_module)
        model = evaluated_model(model, self.settings)  # evaluation.gem_p / whitening.raw, as task=evaluate
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        return model

    def _extract_shard(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[np.ndarray, np.ndarray]:
        """This rank's contiguous shard of all benchmark images: (global indices, descriptors)."""
        paths = [p for split in SPLITS for p in self._paths.get(split, ())]
        world, rank = trainer.world_size, trainer.global_rank
        bounds = np.linspace(0, len(paths), world + 1).astype(int)
        indices = np.arange(bounds[rank], bounds[rank + 1])
        was_training = pl_module.training
        try:
            model = self._descriptor_model(trainer, pl_module)
            image_size = getattr(model, "image_size", None) or self.settings.image_size
            descriptors = extract(
                model,
                [paths[i] for i in indices],
                scales=[image_size],
                batch_size=self.settings.batch_size,
                num_workers=self.settings.num_workers,
                device=pl_module.device,
                progress=trainer.is_global_zero,
                desc=f"val/uAP: embedding {len(indices)} benchmark images",
            ).vectors
        finally:
            pl_module.train(was_training)
        return indices, descriptors

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        indices, descriptors = self._extract_shard(trainer, pl_module)
        if trainer.world_size > 1:
            descriptors = self._gather(trainer, pl_module, indices, descriptors)
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask, not only rank 0
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            metrics = self._score(descriptors, trainer, log_dir)
        if trainer.world_size > 1:
            metrics = trainer.strategy.broadcast(metrics, src=0)
        return metrics

    def _gather(
        self, trainer: L.Trainer, pl_module: L.LightningModule, indices: np.ndarray, descriptors: np.ndarray
    ) -> np.ndarray:
        """All ranks' descriptors in global order (shards are contiguous and in rank order)."""
        shape = torch.tensor(descriptors.shape if len(indices) else (0, 0), device=pl_module.device)
        shapes = trainer.strategy.all_gather(shape)  # (world, 2): rows and width of each shard
        counts, width = shapes[:, 0], int(shapes[:, 1].max())
        local = torch.zeros(int(counts.max()), width, device=pl_module.device)
        local[: len(indices)] = torch.from_numpy(descriptors).to(pl_module.device)
        gathered = trainer.strategy.all_gather(local).cpu().numpy()  # (world, longest, D)
        return np.concatenate([gathered[r, : int(n)] for r, n in enumerate(counts.cpu())])

    def _score(self, descriptors: np.ndarray, trainer: L.Trainer, log_dir: str | None) -> dict[str, float]:
        result = score_benchmark(self.layout, self._paths, descriptors, self.settings)
        self._log_gallery(result, trainer, log_dir)
        metrics = result.headline(prefix="val/")
        for name, g in self.grid:  # the same descriptors matched again: one search each, no forward
            figures = score_benchmark(self.layout, self._paths, descriptors, g).headline()
            metrics |= {f"val/grid/{name}/{k}": figures[k] for k in ("uAP", "recall_at_p90")}
        return metrics

    def _log_gallery(self, result: EvaluationResult, trainer: L.Trainer, log_dir: str | None) -> None:
        """Top matches of a few matched queries as one image: saved in the run dir, sent to wandb."""
        if not self.gallery_queries or not log_dir:
            return
        gallery = match_gallery(self.layout, result, self.gallery_queries)
        out = Path(log_dir) / "galleries" / f"epoch{trainer.current_epoch:03d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        gallery.save(out, quality=85)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/matches", images=[gallery], step=trainer.global_step)


def _grid(settings: EvaluationSettings, num_training: int) -> list[tuple[str, EvaluationSettings]]:
    """``evaluation.grid``'s entries the callback scores besides what it logs anyway: not ``raw`` (the
    ``_raw`` figures), not one equal to the configured setting; each checked for the training set."""
    out = []
    configured = settings.as_grid_entry()
    for name in settings.grid:
        if name == "raw":
            continue
        try:
            g = settings.variant(name).for_training_set(num_training)
        except ValueError as e:
            raise ValueError(f"evaluation.grid entry {name!r}: {e}") from e
        if g != configured:
            out.append((name, g))
    return out


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items() if "rank10" not in k)


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config node (OmegaConf DictConfig from Hydra) as plain nested dicts."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(values, DictConfig):
            return OmegaConf.to_container(values, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf comes with Hydra
        pass
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
