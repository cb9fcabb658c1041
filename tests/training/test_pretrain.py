"""Self-supervised pretraining: losses, momentum teacher, optimiser/schedules, views, data, experiment configs."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn

from datamodules.pretrain import EpochShuffle, PretrainDataModule
from isc.data.images import find_images
from isc.losses.barlow_twins import BarlowTwinsLoss, barlow_twins_loss, cross_correlation
from isc.losses.byol import BYOLLoss, byol_loss
from isc.models.checkpoints import load_trunk_weights
from isc.models.momentum import (
    MomentumBatchNorm,
    cosine_momentum,
    ema_update_,
    make_teacher,
    statistics_momentum,
)
from isc.models.trunks import Trunk
from isc.train.optim import LARS, WarmupCosineLR, param_groups, warmup_cosine_factor
from isc.train.views import TwoViews, blur_kernel_size
from lightning_modules.barlow_twins import BarlowTwins
from lightning_modules.momentum2_teacher import Momentum2Teacher

ROOT = Path(__file__).resolve().parents[2]


def tiny_trunk(channels: int = 8) -> Trunk:
    """A small conv trunk with batch norm, fast enough for step-by-step checks."""
    body = nn.Sequential(
        nn.Conv2d(3, channels, 3, stride=2, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3),
    )
    return Trunk(body, channels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def write_images(folder: Path, n: int, size: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((size, size + 8 * (i % 3)), Image.Resampling.NEAREST).save(
            sub / f"{i:04d}.png"
        )


class PairDataset(torch.utils.data.Dataset):
    """Fixed pairs of views, in the pretraining batch format ``((v1, v2), index)``."""

    def __init__(self, n: int, size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.v1 = torch.rand(n, 3, size, size, generator=g)
        self.v2 = torch.rand(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.v1)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        return (self.v1[i], self.v2[i]), i


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(options | kwargs))


# --------------------------------------------------------------------------------------------------
# losses


def test_barlow_twins_loss_equals_the_direct_formula() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(32, 16, dtype=torch.float64) * 3 + 1, torch.randn(32, 16, dtype=torch.float64)
    bn = nn.BatchNorm1d(16, affine=False).double().train()  # the official implementation's normaliser
    c = bn(z1).T @ bn(z2) / 32
    off = ~torch.eye(16, dtype=torch.bool)
    expected = ((torch.diagonal(c) - 1) ** 2).sum() + 0.0051 * (c[off] ** 2).sum()
    torch.testing.assert_close(barlow_twins_loss(z1, z2), expected)
    torch.testing.assert_close(BarlowTwinsLoss(0.0051)(z1, z2), expected)
    torch.testing.assert_close(cross_correlation(z1, z2), c)
    # identical, decorrelated embeddings: the optimum
    w = torch.linalg.qr(torch.randn(64, 8, dtype=torch.float64))[0] * 8  # orthogonal columns, norm 8
    w = w - w.mean(dim=0)
    assert barlow_twins_loss(w, w).item() < 0.5


def test_byol_loss_is_symmetric_cosine_regression_without_teacher_gradients() -> None:
    torch.manual_seed(0)
    q1, q2 = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    k1, k2 = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    cos = nn.functional.cosine_similarity
    expected = (4 - 2 * (cos(q1, k1) + cos(q2, k2))).mean()
    loss = BYOLLoss()(q1, q2, k1, k2)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert k1.grad is None and k2.grad is None and q1.grad is not None
    torch.testing.assert_close(byol_loss(q1, q1), torch.zeros(8), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# momentum teacher


def test_momentum_schedules_match_the_formula_at_the_ends_and_middle() -> None:
    total = 1000
    assert cosine_momentum(0, total) == pytest.approx(0.99)
    assert cosine_momentum(total // 2, total) == pytest.approx(0.995)
    assert cosine_momentum(total, total) == pytest.approx(1.0)
    assert cosine_momentum(250, total) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert statistics_momentum(0, total) == pytest.approx(1.0)
    assert statistics_momentum(total // 2, total) == pytest.approx(0.5)
    assert statistics_momentum(total, total) == pytest.approx(0.0)


def test_momentum_batchnorm_normalises_with_momentum_statistics_and_commits_once() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    mbn = MomentumBatchNorm.from_batchnorm(bn).train()
    mbn.alpha = 0.3
    m0, v0 = mbn.running_mean.clone(), mbn.running_var.clone()
    xs = [torch.randn(6, 4, 3, 3) * 2 + 1 for _ in range(2)]
    for x in xs:
        mu = 0.3 * x.mean(dim=(0, 2, 3)) + 0.7 * m0
        var = 0.3 * x.var(dim=(0, 2, 3), unbiased=True) + 0.7 * v0
        expected = (x - mu.view(1, 4, 1, 1)) / torch.sqrt(var.view(1, 4, 1, 1) + 1e-5)
        expected = expected * bn.weight.view(1, 4, 1, 1) + bn.bias.view(1, 4, 1, 1)
        torch.testing.assert_close(mbn(x), expected)
    torch.testing.assert_close(mbn.running_mean, m0)  # nothing moves before the commit
    mbn.commit()
    batch_mean = (xs[0].mean(dim=(0, 2, 3)) + xs[1].mean(dim=(0, 2, 3))) / 2
    batch_var = (xs[0].var(dim=(0, 2, 3)) + xs[1].var(dim=(0, 2, 3))) / 2
    torch.testing.assert_close(mbn.running_mean, 0.3 * batch_mean + 0.7 * m0)
    torch.testing.assert_close(mbn.running_var, 0.3 * batch_var + 0.7 * v0)
    x = torch.randn(2, 4, 3, 3)
    eval_expected = (x - mbn.running_mean.view(1, 4, 1, 1)) / torch.sqrt(
        mbn.running_var.view(1, 4, 1, 1) + 1e-5
    )
    eval_expected = eval_expected * bn.weight.view(1, 4, 1, 1) + bn.bias.view(1, 4, 1, 1)
    torch.testing.assert_close(mbn.eval()(x), eval_expected)


def test_momentum_batchnorm_statistics_are_state_but_not_buffers() -> None:
    """DDP broadcasts every buffer from rank 0; the per-process statistics must stay out, yet be saved."""
    mbn = MomentumBatchNorm(3)
    with torch.no_grad():
        mbn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert list(mbn.buffers()) == []
    state = mbn.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var"}
    fresh = MomentumBatchNorm(3)
    fresh.load_state_dict(state)
    assert fresh.running_mean.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="running_var"):
        MomentumBatchNorm(3).load_state_dict({k: v for k, v in state.items() if k != "running_var"})
    fresh.double()
    assert fresh.running_mean.dtype == torch.float64 and fresh.weight is not None
    assert fresh.weight.dtype == torch.float64


def test_make_teacher_and_ema_update() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    teacher = make_teacher(student)
    assert isinstance(teacher[1], MomentumBatchNorm)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(isinstance(m, nn.BatchNorm1d) for m in teacher.modules())
    t0 = {n: p.clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update_(teacher, student, 0.9)
    s = dict(student.named_parameters())
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * t0[n] + 0.1 * s[n])


def teacher_statistics(teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The momentum-BN running statistics (no buffers: DDP must not broadcast them) by state-dict name."""
    return {
        k: v.clone() for k, v in teacher.state_dict().items() if k.endswith(("running_mean", "running_var"))
    }


class Recorder(L.Callback):
    """Snapshots around each Momentum2-Teacher step: student/teacher params, BN inputs, gradients."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        for name, m in pl_module.teacher.named_modules():
            if isinstance(m, MomentumBatchNorm):
                hook = self._hook(name)
                self._handles.append(m.register_forward_hook(hook))

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self.inputs.setdefault(name, []).append(args[0].detach().clone())

        return record

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.inputs = {}
        self.steps.append(
            {
                "step": trainer.global_step,
                "student": {
                    n: p.detach().clone() for n, p in pl_module._student_encoder().named_parameters()
                },
                "teacher": {n: p.detach().clone() for n, p in pl_module.teacher.named_parameters()},
                "buffers": teacher_statistics(pl_module.teacher),
            }
        )

    def on_after_backward(self, trainer: L.Trainer, pl_module: Any) -> None:
        rec = self.steps[-1]
        rec["teacher_grads"] = [p.grad for p in pl_module.teacher.parameters()]
        rec["student_grads"] = [p.grad is not None for p in pl_module.backbone.parameters()]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rec = self.steps[-1]
        rec["teacher_after"] = {n: p.detach().clone() for n, p in pl_module.teacher.named_parameters()}
        rec["buffers_after"] = teacher_statistics(pl_module.teacher)
        rec["inputs"] = self.inputs


def test_momentum2_teacher_follows_the_ema_formulas() -> None:
    torch.manual_seed(0)
    model = Momentum2Teacher(
        tiny_trunk(),
        BYOLLoss(),
        optimizer=lambda groups: torch.optim.SGD(groups, momentum=0.9, weight_decay=1e-4),
        scheduler=None,
        projector_hidden_dim=16,
        projector_dim=8,
        predictor_hidden_dim=16,
        base_momentum=0.9,  # large steps so the EMA is visible
    )
    recorder = Recorder()
    trainer = quiet_trainer(max_steps=3, callbacks=[recorder])
    loader = torch.utils.data.DataLoader(PairDataset(12), batch_size=4)
    trainer.fit(model, loader)
    total = model.total_steps
    assert total == 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 4 / 256)  # lr x batch / 256
    for rec in recorder.steps:
        assert all(g is None for g in rec["teacher_grads"]) and all(rec["student_grads"])
        m = cosine_momentum(rec["step"], total, 0.9)
        for n, p in rec["teacher_after"].items():
            torch.testing.assert_close(p, m * rec["teacher"][n] + (1 - m) * rec["student"][n])
        alpha = statistics_momentum(rec["step"], total)
        assert len(rec["inputs"]) == 2  # trunk BN, projector BN
        for name, xs in rec["inputs"].items():
            assert len(xs) == 2  # both views through the teacher, one update
            dims = [0, *range(2, xs[0].ndim)]
            mean = torch.stack([x.mean(dim=dims) for x in xs]).mean(dim=0)
            var = torch.stack([x.var(dim=dims) for x in xs]).mean(dim=0)
            before, after = rec["buffers"], rec["buffers_after"]
            torch.testing.assert_close(
                after[f"{name}.running_mean"], alpha * mean + (1 - alpha) * before[f"{name}.running_mean"]
            )
            torch.testing.assert_close(
                after[f"{name}.running_var"], alpha * var + (1 - alpha) * before[f"{name}.running_var"]
            )
    # the student moved, the teacher followed only through the EMA
    first, last = recorder.steps[0], recorder.steps[-1]
    assert not torch.equal(first["student"]["projector.0.weight"], last["student"]["projector.0.weight"])


# --------------------------------------------------------------------------------------------------
# optimisers and schedules


def test_lars_step_matches_the_official_update_and_excludes_biases_and_norms() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups = param_groups(model, lr=0.5, lr_bias_norm=0.01)
    assert [g["name"] for g in groups] == ["weights", "bias_norm"]
    assert groups[0]["params"] == [model[0].weight]
    assert {id(p) for p in groups[1]["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    opt = LARS(groups, weight_decay=0.1, momentum=0.9, eta=0.02)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    mu_w, mu_b = torch.zeros_like(w0), torch.zeros_like(b0)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        gw, gb = model[0].weight.grad.clone(), model[0].bias.grad.clone()
        dp = gw + 0.1 * w0
        dp = dp * (0.02 * w0.norm() / dp.norm())
        mu_w = 0.9 * mu_w + dp
        mu_b = 0.9 * mu_b + gb  # no weight decay, no adaptation
        opt.step()
        w0, b0 = w0 - 0.5 * mu_w, b0 - 0.01 * mu_b
        torch.testing.assert_close(model[0].weight, w0)
        torch.testing.assert_close(model[0].bias, b0)


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine_factor(0, 100, 10) == 0.0
    assert warmup_cosine_factor(5, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine_factor(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine_factor(55, 100, 10, final_factor=0.001) == pytest.approx(0.5005)
    assert warmup_cosine_factor(100, 100, 10, final_factor=0.001) == pytest.approx(0.001)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 2.0}])
    sched = WarmupCosineLR(opt, total_steps=20, steps_per_epoch=4, warmup_epochs=1.0)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert lrs[-1] == pytest.approx(2.0 * (1 + math.cos(math.pi * 15 / 16)) / 2)
    # D2LV fine-tuning shape: warm-up, flat, cosine
    factors = [
        warmup_cosine_factor(s, 30, warmup_steps=5, flat_steps=10, final_factor=0.01) for s in range(31)
    ]
    assert factors[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5:16] == pytest.approx([1.0] * 11)
    assert factors[16] < 1.0 and factors[30] == pytest.approx(0.01)
    assert factors[15 + 15 // 2] == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi * 7 / 15)) / 2)
    flat = WarmupCosineLR(opt, total_steps=30, steps_per_epoch=5, warmup_epochs=1, flat_epochs=2)
    assert (flat.warmup_steps, flat.flat_steps) == (5, 10)


# --------------------------------------------------------------------------------------------------
# views and data


def test_two_views_are_asymmetric_unit_range_tensors() -> None:
    views = TwoViews(image_size=32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    torch.manual_seed(0)
    v1, v2 = views(image)
    for v in (v1, v2):
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32
        assert v.min() >= 0.0 and v.max() <= 1.0
    assert not torch.equal(v1, v2)
    text = repr(views)
    assert "RandomSolarize" not in repr(views.views[0]) and "RandomSolarize" in repr(views.views[1])
    assert "GaussianBlur" in text
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3


def test_find_images_is_recursive_and_keeps_repeated_names(tmp_path: Path) -> None:
    for sub in ("a", "b/c"):
        (tmp_path / sub).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / sub / "0001.jpg")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/0001.jpg", "b/c/0001.jpg"]
    with pytest.raises(FileNotFoundError, match="no image files"):
        find_images(tmp_path, recursive=False)
    Image.new("RGB", (8, 8)).save(tmp_path / "top.png")
    assert find_images(tmp_path, recursive=False) == [tmp_path / "top.png"]


def test_datamodule_batches_two_views(tmp_path: Path) -> None:
    write_images(tmp_path, 10)
    dm = PretrainDataModule(str(tmp_path), image_size=24, batch_size=4, num_workers=0, max_images=8)
    dm.setup("fit")
    assert dm.train_dataset is not None and len(dm.train_dataset) == 8
    (v1, v2), index = next(iter(dm.train_dataloader()))
    assert v1.shape == v2.shape == (4, 3, 24, 24) and index.shape == (4,)
    with pytest.raises(ValueError, match="batch_size"):
        PretrainDataModule(str(tmp_path), batch_size=64, num_workers=0).train_dataloader()


def test_epoch_shuffle_is_a_seeded_permutation_per_epoch_disjoint_across_ranks() -> None:
    """Rank shards of one epoch are disjoint full batches; each epoch (and seed) draws another order."""

    def epoch(seed: int, e: int, world: int, rank: int) -> list[list[int]]:
        shuffle = EpochShuffle(23, batch_size=3, num_replicas=world, rank=rank, seed=seed)
        shuffle.set_epoch(e)
        return list(shuffle)

    shards = [epoch(0, 0, 2, r) for r in (0, 1)]
    assert all(len(s) == 3 and all(len(b) == 3 for b in s) for s in shards)  # 23 // (3 x 2) steps
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen)) == 18 and set(seen) <= set(range(23))
    assert epoch(0, 0, 2, 0) == shards[0]  # a pure function of (seed, epoch, rank)
    assert epoch(0, 1, 2, 0) != shards[0] and epoch(1, 0, 2, 0) != shards[0]
    single = epoch(0, 0, 1, 0)
    assert len(single) == 7 and len({i for b in single for i in b}) == 21


class Crash(Exception):
    pass


class CrashAt(L.Callback):
    """Raise before batch ``batch`` of epoch ``epoch``: the run dies mid-epoch, ``last.ckpt`` is from the
    end of the previous epoch (as a SIGKILL would leave it, in-process)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Crash


class Batches(L.Callback):
    """Per epoch: the image indices and a checksum of both views of every batch."""

    def __init__(self) -> None:
        self.seen: dict[int, list[tuple[list[int], float, float]]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        (v1, v2), index = batch
        self.seen.setdefault(trainer.current_epoch, []).append(
            (index.tolist(), v1.double().sum().item(), v2.double().sum().item())
        )


def pretrain(
    images: Path, out: Path, num_workers: int, *callbacks: L.Callback, ckpt_path: Path | None = None
) -> Momentum2Teacher:
    """A fresh "process": seed as run.py does, build model and data, fit 2 epochs (or resume)."""
    L.seed_everything(0, workers=True)
    model = Momentum2Teacher(
        tiny_trunk(),
        BYOLLoss(),
        optimizer=partial(torch.optim.SGD, momentum=0.9),
        scheduler=partial(WarmupCosineLR, warmup_epochs=1),
        projector_hidden_dim=16,
        projector_dim=8,
        predictor_hidden_dim=16,
        base_momentum=0.9,
    )
    data = PretrainDataModule(str(images), image_size=16, batch_size=4, num_workers=num_workers)
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=out, save_last=True)
    trainer = quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint, *callbacks])
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


@pytest.mark.filterwarnings("ignore:Checkpoint directory")  # the resumed run writes where the crashed one did
@pytest.mark.parametrize("num_workers", [0, 1])
def test_resumed_pretraining_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path: Path, num_workers: int
) -> None:
    """Crash mid-epoch 1, resume from the epoch-0 ``last.ckpt``: epoch 1 replays the same images and views
    (main-process or worker augmentations), and the final student, teacher and statistics are the same."""
    root = tmp_path / "images"
    write_images(root, 12)  # 3 batches of 4 per epoch
    whole = Batches()
    reference = pretrain(root, tmp_path / "whole", num_workers, whole)
    with pytest.raises(Crash):
        pretrain(root, tmp_path / "broken", num_workers, CrashAt(epoch=1, batch=1))
    last = tmp_path / "broken" / "last.ckpt"
    at_crash = torch.load(last, map_location="cpu", weights_only=False)
    assert (at_crash["epoch"], at_crash["global_step"]) == (0, 3)  # the end of epoch 0
    replay = Batches()
    resumed = pretrain(root, tmp_path / "broken", num_workers, replay, ckpt_path=last)

    assert list(replay.seen) == [1] and len(whole.seen[1]) == 3
    assert replay.seen[1] == whole.seen[1]  # same images, same augmented views
    assert [b[0] for b in whole.seen[0]] != [b[0] for b in whole.seen[1]]  # each epoch its own order
    expected, got = reference.state_dict(), resumed.state_dict()
    assert got.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(
        got["backbone.trunk.body.0.weight"], at_crash["state_dict"]["backbone.trunk.body.0.weight"]
    )


# --------------------------------------------------------------------------------------------------
# experiments and checkpoints


def compose_experiment(experiment: str, out_dir: Path, data_root: Path, *overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"experiment={experiment}",
                f"paths.output_dir={out_dir}",
                f"data.root={data_root}",
                "data.image_size=32",
                "data.batch_size=4",
                "data.num_workers=0",
                "trainer.accelerator=cpu",
                *overrides,
            ],
        )


SMALL_HEADS = {
    "pretrain_barlow_r50": ["model.projector_dims=[32,32]"],
    "pretrain_m2t_r152": [
        "model.projector_hidden_dim=16",
        "model.predictor_hidden_dim=16",
        "model.projector_dim=8",
    ],
    "pretrain_m2t_r50ibn": [
        "model.projector_hidden_dim=16",
        "model.predictor_hidden_dim=16",
        "model.projector_dim=8",
    ],
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_images(root, 8)
    return root


@pytest.mark.parametrize("experiment", sorted(SMALL_HEADS))
def test_experiment_fast_dev_run(experiment: str, images: Path, tmp_path: Path) -> None:
    import tasks

    cfg = compose_experiment(
        experiment, tmp_path, images, "trainer.fast_dev_run=true", *SMALL_HEADS[experiment]
    )
    assert cfg.task == "pretrain"
    metrics = tasks.train(cfg)
    assert math.isfinite(metrics["train/loss"])


def test_experiments_pin_the_reference_hyper_parameters(images: Path, tmp_path: Path) -> None:
    bt = compose_experiment("pretrain_barlow_r50", tmp_path, images)
    assert bt.backbone.trunk._target_ == "isc.models.trunks.resnet50"
    assert list(bt.model.projector_dims) == [8192, 8192, 8192]
    assert (bt.model.lr, bt.model.lr_bias_norm, bt.model.loss.lambda_offdiag) == (0.2, 0.0048, 0.0051)
    assert bt.model.optimizer._target_ == "isc.train.optim.LARS" and bt.trainer.max_epochs == 1000
    assert bt.model.scheduler.warmup_epochs == 10
    for name, arch in (("pretrain_m2t_r152", "resnet152"), ("pretrain_m2t_r50ibn", "resnet50_ibn_a")):
        m2t = compose_experiment(name, tmp_path, images)
        assert m2t.backbone.trunk._target_ == f"isc.models.trunks.{arch}"
        assert m2t.model.optimizer._target_ == "torch.optim.SGD"
        assert (m2t.model.optimizer.momentum, m2t.model.optimizer.weight_decay) == (0.9, 1e-4)
        assert (m2t.model.lr, m2t.model.base_momentum, m2t.model.momentum_bn) == (0.05, 0.99, True)
        assert (m2t.model.projector_hidden_dim, m2t.model.projector_dim) == (4096, 256)
        assert m2t.trainer.max_epochs == 300 and m2t.model.scheduler.warmup_epochs == 10


def test_pretraining_checkpoint_is_a_fine_tuning_starting_point(tmp_path: Path) -> None:
    """A real Lightning ``last.ckpt`` loads into a fresh trunk (student by default, teacher on request).

    A tiny trunk keeps the file small; ``tests/models/test_backbones.py`` covers the same layout through ``resnet50``.
    """
    torch.manual_seed(0)
    model = Momentum2Teacher(
        tiny_trunk(),
        BYOLLoss(),
        optimizer=lambda groups: torch.optim.SGD(groups, momentum=0.9),
        projector_hidden_dim=16,
        projector_dim=8,
        predictor_hidden_dim=16,
        base_momentum=0.5,
    )
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(model, torch.utils.data.DataLoader(PairDataset(8), batch_size=4))
    last = tmp_path / "last.ckpt"
    student, teacher = tiny_trunk(), tiny_trunk()
    report = load_trunk_weights(student, last)
    assert report.prefix == "state_dict.backbone.trunk.body." and report.missing == []
    load_trunk_weights(teacher, last, prefix="teacher.backbone.trunk.body.")
    for fresh, trained in ((student, model.backbone.trunk), (teacher, model.teacher["backbone"].trunk)):
        for k, v in trained.state_dict().items():  # the teacher's momentum BN has no num_batches_tracked
            torch.testing.assert_close(fresh.state_dict()[k], v)
    assert not torch.equal(student.body[0].weight, teacher.body[0].weight)


def test_barlow_twins_module_step_reduces_the_loss_on_fixed_views() -> None:
    torch.manual_seed(0)
    model = BarlowTwins(
        tiny_trunk(16),
        BarlowTwinsLoss(),
        optimizer=lambda groups: LARS(groups, weight_decay=1.5e-6),
        projector_dims=(32, 32),
        lr=0.2 * 256 / 8 * 10,
        lr_bias_norm=0.0048 * 256 / 8 * 10,
    )
    data = PairDataset(8)
    batch = ((data.v1, data.v2), torch.arange(8))
    model.train()
    with torch.no_grad():
        before = model.loss(model.embed(data.v1), model.embed(data.v2)).item()
    trainer = quiet_trainer(max_steps=20)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names == ["weights", "bias_norm"]
    assert trainer.optimizers[0].param_groups[1]["lars_adaptation"] is False
    with torch.no_grad():
        after = model.loss(model.embed(batch[0][0]), model.embed(batch[0][1])).item()
    assert after < before
