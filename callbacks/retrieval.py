"""Per-epoch copy-detection evaluation: descriptors -> faiss index -> official uAP, logged everywhere.

Under DDP each rank embeds its own contiguous shard of the benchmark images; rank 0 gathers them,
searches and scores (``isc.evaluation.pipeline``, the same code as ``run.py task=evaluate``), then broadcasts
the metrics so every rank logs identical values and ``ModelCheckpoint(monitor="val/uAP")`` agrees.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import nn

from isc.data.images import Disc21Layout
from isc.evaluation.extract import extract_descriptors, image_dataset
from isc.evaluation.pipeline import MatchingResult, MatchingSettings, match_descriptors

log = logging.getLogger(__name__)

SPLITS = ("queries", "references", "training")


class _Embedder(nn.Module):
    """Adapts a LightningModule's ``embed(images) -> (B, D)`` to the extraction loop."""

    def __init__(self, module: L.LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.embed(images)  # type: ignore[operator]


class RetrievalEvaluation(L.Callback):
    """Evaluate copy detection on a DISC21-layout benchmark after every ``every_n_epochs`` training epochs.

    Logs ``val/uAP``, ``val/recall_at_p90``, ``val/recall_at_rank1`` (plain descriptor similarity) and, when
    the benchmark has ``training/`` images, the same with score normalisation under ``..._snorm``. The
    model is evaluated once before training too (``val/uAP`` at step 0 in the loggers and
    ``baseline`` here), so a run always shows the off-the-shelf figure beside the fine-tuned one.
    Needs ``pl_module.embed(images in [0, 1]) -> L2-normalised (B, D)``.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        k: int = 10,
        score_norm_beta: float | None = 1.0,
        score_norm_k: int = 3,
        every_n_epochs: int = 1,
        evaluate_before_training: bool = True,
        gallery_queries: int = 6,
    ) -> None:
        super().__init__()
        self.root = root
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.settings = MatchingSettings(k=k, score_norm_beta=None)
        self.score_norm_beta, self.score_norm_k = score_norm_beta, score_norm_k
        self.every_n_epochs = every_n_epochs
        self.evaluate_before_training = evaluate_before_training
        self.gallery_queries = gallery_queries
        self.baseline: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._layout: Disc21Layout | None = None

    # -- hooks ---------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.evaluate_before_training or trainer.sanity_checking:
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
    def layout(self) -> Disc21Layout:
        if self._layout is None:
            self._layout = Disc21Layout(Path(self.root).expanduser())
            self._layout.validate()
        return self._layout

    def _extract_shard(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[np.ndarray, np.ndarray]:
        """This rank's contiguous shard of all benchmark images: (global indices, descriptors)."""
        paths = [p for split in SPLITS if self.layout.has_split(split) for p in self.layout.paths(split)]
        world, rank = trainer.world_size, trainer.global_rank
        bounds = np.linspace(0, len(paths), world + 1).astype(int)
        indices = np.arange(bounds[rank], bounds[rank + 1])
        dataset = image_dataset([paths[i] for i in indices], self.image_size)
        was_training = pl_module.training
        try:
            descriptors = extract_descriptors(
                _Embedder(pl_module),
                dataset,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                device=pl_module.device,
                progress=False,
            )
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
        ids, parts, start = {}, {}, 0
        for split in SPLITS:
            if self.layout.has_split(split):
                n = len(self.layout.paths(split))
                ids[split], parts[split] = np.asarray(self.layout.ids(split)), descriptors[start : start + n]
                start += n
        ground_truth = self.layout.ground_truth()
        training = parts.get("training")
        use_snorm = bool(self.score_norm_beta) and training is not None and len(training) >= self.score_norm_k
        settings = MatchingSettings(
            k=self.settings.k,
            score_norm_beta=self.score_norm_beta if use_snorm else None,
            score_norm_k=self.score_norm_k,
        )
        result = match_descriptors(
            ids["queries"],
            parts["queries"],
            ids["references"],
            parts["references"],
            training,
            ground_truth,
            settings,
        )
        raw = result.raw_metrics or result.metrics
        assert raw is not None
        metrics = _prefixed(raw.to_dict(), "")
        if use_snorm and result.metrics is not None:
            metrics.update(_prefixed(result.metrics.to_dict(), "_snorm"))
        self._log_gallery(result, trainer, log_dir)
        return metrics

    def _log_gallery(self, result: MatchingResult, trainer: L.Trainer, log_dir: str | None) -> None:
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


def _prefixed(metrics: dict[str, float | None], suffix: str) -> dict[str, float]:
    """``val/<name><suffix>``; undefined figures (None) are logged as 0 so curves stay continuous."""
    keys = ("uAP", "recall_at_p90", "recall_at_rank1", "recall_at_rank10")
    return {f"val/{k}{suffix}": float(metrics.get(k) or 0.0) for k in keys}


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items() if "rank10" not in k)


def match_gallery(
    layout: Disc21Layout, result: MatchingResult, n_queries: int, top: int = 4, thumb: int = 96
):
    """Rows of (query | top matches), green border = correct match, red = wrong."""
    gt = layout.ground_truth()
    truth = dict(zip(*gt.pairs(), strict=True))
    pred = result.predictions
    queries = [q for q in dict.fromkeys(pred.query_ids.tolist()) if q in truth][:n_queries]
    refs = {p.stem: p for p in layout.paths("references")}
    qpaths = {p.stem: p for p in layout.paths("queries")}
    sheet = Image.new("RGB", ((top + 1) * (thumb + 6), max(1, len(queries)) * (thumb + 6)), "white")
    for row, q in enumerate(queries):
        mine = np.flatnonzero(pred.query_ids == q)
        mine = mine[np.argsort(-pred.scores[mine], kind="stable")][:top]
        cells = [(qpaths[q], (128, 128, 128))] + [
            (refs[r], (0, 170, 0) if truth[q] == r else (200, 0, 0)) for r in pred.reference_ids[mine]
        ]
        for col, (path, colour) in enumerate(cells):
            with Image.open(path) as img:
                tile = img.convert("RGB").resize((thumb, thumb))
            x, y = col * (thumb + 6), row * (thumb + 6)
            sheet.paste(Image.new("RGB", (thumb + 6, thumb + 6), colour), (x, y))
            sheet.paste(tile, (x + 3, y + 3))
    return sheet
