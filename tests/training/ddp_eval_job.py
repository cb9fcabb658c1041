"""Run by test_ddp_correctness.py: the retrieval callback under 2-process CPU DDP with drifting BN statistics.

Each rank trains a tiny conv + BN trunk on its own shard, so the ranks' BN running statistics differ when
the callback evaluates. Rank 0 saves its weights, the callback's metrics and the gathered descriptors, so
the test can recompute them in one process from the same weights.

Run through ``tests/training/ddp_jobs.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from callbacks.retrieval import RetrievalEvaluation  # noqa: E402
from isc.models.descriptor import DescriptorModel  # noqa: E402
from isc.models.pooling import GeM  # noqa: E402
from isc.models.trunks import Trunk  # noqa: E402

EVALUATION = {"image_size": 32, "num_workers": 0, "score_normalization": {"k": 2}}


def tiny_trunk() -> Trunk:
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return Trunk(body, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class TinyBN(L.LightningModule):
    """A descriptor model whose BN statistics each rank updates from its own (rank-dependent) data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = tiny_trunk()
        self.pooling = GeM()

    def descriptor_model(self) -> DescriptorModel:
        return DescriptorModel(self.trunk, self.pooling).to(self.device)

    def training_step(self, batch, batch_idx):
        (images,) = batch
        return self.descriptor_model()(images).sum() * 0.0 + self.trunk(images).mean()

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        images = torch.rand(32, 3, 16, 16, generator=g) * torch.linspace(0.2, 1.0, 32).view(32, 1, 1, 1)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Recording(RetrievalEvaluation):
    """Keeps the gathered descriptors (rank 0) so the test can compare them to a one-process extraction."""

    gathered: np.ndarray | None = None

    def __init__(self, root: str, out: Path, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.out = out

    def on_train_epoch_end(self, trainer, pl_module):
        # each rank's own statistics, before the callback puts rank 0's everywhere
        running_mean = pl_module.trunk.body[1].running_mean.clone()
        torch.save({"running_mean": running_mean}, self.out / f"bn_rank{trainer.global_rank}.pt")
        super().on_train_epoch_end(trainer, pl_module)

    def _score(self, descriptors, trainer, log_dir):
        self.gathered = descriptors
        return super()._score(descriptors, trainer, log_dir)


def fit(out: Path, benchmark: Path) -> None:
    callback = Recording(
        str(benchmark), out, evaluation=EVALUATION, evaluate_before_training=False, gallery_queries=0
    )
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
    module = TinyBN()
    trainer.fit(module)
    if trainer.is_global_zero:
        torch.save(
            {
                "state_dict": module.state_dict(),
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                "descriptors": torch.from_numpy(callback.gathered),
            },
            out / "result.pt",
        )
