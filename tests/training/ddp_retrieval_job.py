"""Run through ``tests/training/ddp_jobs.py`` for test_finetune.py: the retrieval callback under 2-process CPU
DDP (gloo); rank 0 writes the callback's metrics to ``OUT/metrics.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as L

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's helpers

from test_finetune import PixelEmbedder  # noqa: E402

from callbacks.retrieval import RetrievalEvaluation  # noqa: E402


def fit(out: Path, benchmark: Path) -> None:
    evaluation = {"image_size": 32, "num_workers": 0, "score_normalization": {"enabled": False}}
    callback = RetrievalEvaluation(str(benchmark), evaluation=evaluation, gallery_queries=0)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback],
    )
    trainer.fit(PixelEmbedder())
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(
            json.dumps({k: float(v) for k, v in trainer.callback_metrics.items()})
        )
