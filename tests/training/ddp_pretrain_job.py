"""Two-process CPU (gloo) DDP job for tests/training/test_ddp_pretrain.py: one Barlow Twins step, losses and grads saved.

Run through ``tests/training/ddp_jobs.py``; Lightning's ``strategy="ddp"`` re-launches that command for rank 1.
Each rank writes ``OUT_DIR/rank{r}.pt`` with its loss, its (DDP-averaged) gradients and
the sample indices it saw; rank 0 also writes the initial weights so the test can redo the step on the
full batch in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from isc.losses.barlow_twins import BarlowTwinsLoss  # noqa: E402
from isc.models.trunks import Trunk  # noqa: E402
from lightning_modules.barlow_twins import BarlowTwins  # noqa: E402

N_SAMPLES, BATCH, SIZE = 8, 4, 12


def build_model() -> BarlowTwins:
    """A BN-free trunk and projector: PyTorch's SyncBatchNorm has no CPU kernels, the loss syncs itself."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3))
    trunk = Trunk(body, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return BarlowTwins(
        trunk,
        BarlowTwinsLoss(lambda_offdiag=0.05),
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.0),
        projector_dims=(16, 16),
        projector_batch_norm=False,
        lr=0.0,
        lr_bias_norm=0.0,
    )


def views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(N_SAMPLES, 3, SIZE, SIZE, generator=g), torch.rand(
        N_SAMPLES, 3, SIZE, SIZE, generator=g
    )


class Pairs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.v1, self.v2 = views()

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        return (self.v1[i], self.v2[i]), i


class Capture(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.record: dict[str, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_rank == 0:
            torch.save({k: v.clone() for k, v in pl_module.state_dict().items()}, self.out / "init.pt")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.record["indices"] = batch[1].tolist()

    def on_after_backward(self, trainer: L.Trainer, pl_module: Any) -> None:  # grads are DDP-averaged here
        self.record["grads"] = {
            n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None
        }

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record["loss"] = outputs["loss"].detach().clone()
        self.record["world_size"] = trainer.world_size
        torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")


def fit(out: Path, benchmark: Path) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Capture(out)],
    )
    trainer.fit(build_model(), torch.utils.data.DataLoader(Pairs(), batch_size=BATCH, shuffle=False))
