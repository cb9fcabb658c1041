"""Lightning training-step speed against a plain PyTorch loop with the same model, batch and precision.

Both run the fine-tuning module's own forward and loss (EfficientNet-Lite0 + GeM + InfoNCE/entropy) on the
same in-memory batches with Adam; the plain loop calls ``training_step`` by hand. Runs alternate
(plain, Lightning, plain, ...) so machine noise hits both, and the best of each is compared. Prints
steps/s for both and the ratio Lightning / plain (the target is >= 0.97).

    .venv/bin/python bench/bench_lightning_overhead.py [--steps 30] [--size 96] [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as L  # noqa: E402

from isc.losses.infonce_entropy import InfoNCEEntropyLoss  # noqa: E402
from isc.models.pooling import GeM  # noqa: E402
from isc.models.trunks import efficientnet_lite0  # noqa: E402
from lightning_modules.copy_finetune import CopyFinetune  # noqa: E402


def make_module() -> CopyFinetune:
    torch.manual_seed(0)
    return CopyFinetune(
        trunk=efficientnet_lite0(),
        pooling=GeM(trainable=True),
        loss=InfoNCEEntropyLoss(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-4),
    )


def data(steps: int, batch: int, size: int) -> DataLoader:
    images = torch.rand(steps * batch, 3, size, size)
    labels = torch.arange(steps * batch) // 4  # classes of 4 images
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)


def plain(loader: DataLoader) -> float:
    module = make_module().train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no logging in the plain loop
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    started = time.perf_counter()
    for i, batch in enumerate(loader):
        loss = module.training_step(batch, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


class _Timer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.elapsed = time.perf_counter() - self.started


def lightning(loader: DataLoader) -> float:
    module = make_module()
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loader = data(args.steps, args.batch, args.size)
    plain(data(2, args.batch, args.size))  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {"plain": [], "lightning": []}
    for _ in range(args.rounds):
        times["plain"].append(plain(loader))
        times["lightning"].append(lightning(loader))
    best = {k: min(v) for k, v in times.items()}
    for k, v in best.items():
        print(
            f"{k:9s} {args.steps / v:6.2f} steps/s  (best of {args.rounds}: {v:.2f} s for {args.steps} steps)"
        )
    ratio = best["plain"] / best["lightning"]
    print(f"Lightning / plain speed: {ratio:.3f}  (target >= 0.97: {'met' if ratio >= 0.97 else 'NOT met'})")


if __name__ == "__main__":
    main()
