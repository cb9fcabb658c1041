"""Two-process CPU (gloo) DDP jobs for tests/training/test_ddp_correctness.py: a real Lightning DDP run, state saved per rank.

Run through ``tests/training/ddp_jobs.py``; Lightning's ``strategy="ddp"`` re-launches that command for rank 1
and wraps the module in ``DistributedDataParallel`` (``broadcast_buffers=True``), so DDP's per-forward buffer
broadcast is really in play.

- ``xbm``: a linear embedder trained with :class:`isc.losses.xbm.CrossBatchMemory` for ``STEPS`` steps;
  each rank writes its memory, the indices it saw per step and the (constant, lr 0) embedder weights.
- ``m2t``: a tiny :class:`lightning_modules.momentum2_teacher.Momentum2Teacher` for ``STEPS`` steps; each rank
  writes, per step, its indices, the teacher parameters and the teacher's momentum-BN statistics.
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

from isc.losses.byol import BYOLLoss  # noqa: E402
from isc.losses.contrastive import ContrastiveLoss  # noqa: E402
from isc.losses.xbm import CrossBatchMemory  # noqa: E402
from isc.models.momentum import MomentumBatchNorm  # noqa: E402
from isc.models.trunks import Trunk  # noqa: E402
from lightning_modules.momentum2_teacher import Momentum2Teacher  # noqa: E402

N_SAMPLES, BATCH, STEPS, DIM, SIZE = 16, 4, 2, 6, 12  # 2 ranks x 4 x 2 steps = all 16 samples


# --- cross-batch memory ------------------------------------------------------------------------------------


def xbm_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(N, DIM) inputs and (N,) labels: 4 classes, so every batch has positives and negatives."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_SAMPLES, DIM, generator=g), torch.arange(N_SAMPLES) % 4


class XBMModule(L.LightningModule):
    """Linear embedder + XBM whose memory size is lazily inferred; lr 0 keeps the embedder fixed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(DIM, 5)
        self.loss = CrossBatchMemory(embedding_dim=None, memory_size=N_SAMPLES, loss=ContrastiveLoss())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        out: torch.Tensor = self.loss(self.embed(x), y)["loss"]
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class XBMData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = xbm_inputs()

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


class XBMCapture(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.indices: list[list[int]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.indices.append(batch[2].tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        memory, labels = pl_module.loss.get_memory()
        record = {
            "indices": self.indices,
            "memory": memory.clone(),
            "memory_labels": labels.clone(),
            "state": {k: v.clone() for k, v in pl_module.loss.state_dict().items()},
            "embed": {k: v.clone() for k, v in pl_module.embed.state_dict().items()},
            "world_size": trainer.world_size,
        }
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


# --- Momentum2-Teacher ----------------------------------------------------------------------------------------


def m2t_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    v1 = torch.rand(N_SAMPLES, 3, SIZE, SIZE, generator=g)
    # per-sample brightness so the two ranks' batches have clearly different statistics
    v2 = torch.rand(N_SAMPLES, 3, SIZE, SIZE, generator=g) * torch.linspace(0.5, 2.0, N_SAMPLES).view(
        -1, 1, 1, 1
    )
    return v1, v2


def build_m2t() -> Momentum2Teacher:
    """BN in trunk and projector (the teacher gets momentum BN); plain BN in the student: CPU DDP has no SyncBN."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3))
    trunk = Trunk(body, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return Momentum2Teacher(
        trunk,
        BYOLLoss(),
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9),
        projector_hidden_dim=16,
        projector_dim=8,
        predictor_hidden_dim=16,
        base_momentum=0.5,
        lr=0.1,
        base_batch_size=None,
    )


class Pairs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.v1, self.v2 = m2t_views()

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        return (self.v1[i], self.v2[i]), i


def teacher_statistics(teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's momentum-BN running statistics by state-dict name."""
    names = {n for n, m in teacher.named_modules() if isinstance(m, MomentumBatchNorm)}
    return {
        k: v.clone()
        for k, v in teacher.state_dict().items()
        if k.rsplit(".", 1)[0] in names and "running" in k
    }


class M2TCapture(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: list[dict[str, Any]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.initial = teacher_statistics(pl_module.teacher)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append({"indices": batch[1].tolist(), "step": trainer.global_step})

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the optimiser does not touch the teacher: these are the parameters its forward of this step used
        self.steps[-1]["teacher"] = {n: p.detach().clone() for n, p in pl_module.teacher.named_parameters()}
        self.steps[-1]["statistics"] = teacher_statistics(pl_module.teacher)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        record = {
            "initial": self.initial,
            "steps": self.steps,
            "total_steps": pl_module.total_steps,
            "world_size": trainer.world_size,
        }
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


# --- entry point ---------------------------------------------------------------------------------------------


def _fit(module: L.LightningModule, data: torch.utils.data.Dataset, capture: L.Callback) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[capture],
    )
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False, drop_last=True)
    trainer.fit(module, loader)


def fit_xbm(out: Path, benchmark: Path) -> None:
    _fit(XBMModule(), XBMData(), XBMCapture(out))


def fit_m2t(out: Path, benchmark: Path) -> None:
    _fit(build_m2t(), Pairs(), M2TCapture(out))
