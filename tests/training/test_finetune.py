"""Metric fine-tuning: the per-epoch retrieval callback, fast_dev_runs of every recipe, DDP and sweeps."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, evaluate_checkpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

import tasks
from callbacks.retrieval import RetrievalEvaluation

ROOT = Path(__file__).resolve().parents[2]


class PixelEmbedder(L.LightningModule):
    """Descriptor = the image's 8x8 colour thumbnail: exact copies get identical (perfect) descriptors."""

    def __init__(self, shuffle: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.shuffle = shuffle

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images, 8).flatten(1)
        x = x - x.mean(dim=1, keepdim=True)
        if self.shuffle:  # a descriptor unrelated to the image content
            x = torch.randn_like(x)
        return F.normalize(x, dim=1)

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: L.LightningModule, callback: RetrievalEvaluation, tmp_path: Path) -> dict[str, float]:
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback],
    )
    trainer.fit(module)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_callback_logs_uap_one_for_perfect_descriptors(benchmark: Path, tmp_path: Path) -> None:
    evaluation = {"image_size": 32, "num_workers": 0, "score_normalization": {"k": 2}}
    callback = RetrievalEvaluation(str(benchmark), evaluation=evaluation)
    metrics = fit(PixelEmbedder(), callback, tmp_path)
    assert metrics["val/uAP_raw"] == pytest.approx(1.0)  # plain descriptors
    assert metrics["val/recall_at_rank1_raw"] == pytest.approx(1.0)
    assert metrics["val/recall_at_rank1"] == pytest.approx(
        1.0
    )  # score normalisation keeps each query's order
    assert callback.baseline["val/uAP_raw"] == pytest.approx(1.0)  # evaluated before training too
    gallery = next((tmp_path / "lightning_logs").rglob("galleries/*.jpg"))
    assert Image.open(gallery).width > 0


def test_callback_logs_low_uap_for_random_descriptors(benchmark: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    evaluation = {"image_size": 32, "num_workers": 0, "score_normalization": {"enabled": False}}
    callback = RetrievalEvaluation(str(benchmark), evaluation=evaluation)
    metrics = fit(PixelEmbedder(shuffle=True), callback, tmp_path)
    assert metrics["val/uAP"] < 0.5
    assert metrics["val/uAP_raw"] == metrics["val/uAP"]  # nothing configured: raw is the headline


def tiny(benchmark: Path) -> list[str]:
    """Overrides that make any fine-tuning recipe run in seconds on the tiny benchmark."""
    return [
        f"dataset.root={benchmark}",
        "trainer.fast_dev_run=true",
        "trainer.accelerator=cpu",
        "evaluation.image_size=32",
        "evaluation.num_workers=0",
        "evaluation.score_normalization.k=2",
        "data.image_size=32",
        "data.num_workers=0",
        "data.p=2",
        "data.k=2",
        "logger=csv",
    ]


def one_step(benchmark: Path) -> list[str]:
    """``tiny`` as one real training step: a checkpoint is written, so its evaluation can be compared."""
    return [
        *[o for o in tiny(benchmark) if o != "trainer.fast_dev_run=true"],
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
    ]


def test_default_main_job_logs_the_uap_of_the_model_it_saves(benchmark: Path, tmp_path: Path) -> None:
    overrides = one_step(benchmark)
    cfg = compose_cfg(overrides, tmp_path / "train")
    assert cfg.task == "finetune"  # `python run.py` with no arguments fine-tunes
    metrics = tasks.train(cfg)
    assert {"train/loss", "train/infonce", "train/entropy"} <= set(metrics)
    assert json.loads((tmp_path / "train" / "metrics.json").read_text())["val/uAP"] == metrics["val/uAP"]
    last = tmp_path / "train" / "checkpoints" / "last.ckpt"
    evaluated = evaluate_checkpoint(overrides, last, tmp_path / "eval")
    assert metrics["val/uAP"] == pytest.approx(evaluated["uAP"], abs=1e-6)


HEADS = {
    "bnneck": ["+model.head._target_=isc.models.heads.BNNeckHead", "+model.head._partial_=true"],
    "projection": ["+model.head._target_=isc.models.heads.ProjectionHead", "+model.head._partial_=true"],
}


@pytest.mark.parametrize(
    ("loss", "head", "components"),
    [("d2lv", "bnneck", {"ce", "triplet"}), ("contrastive_xbm", "bnneck", {"pos", "neg"}),
     ("infonce_entropy", "projection", {"infonce", "entropy"})],
)  # fmt: skip
def test_losses_and_heads_fast_dev_run(
    benchmark: Path, tmp_path: Path, loss: str, head: str, components
) -> None:
    head_dims = ["+model.head.hidden_dims=[16]"] if head == "bnneck" else []
    cfg = compose_cfg(
        [*tiny(benchmark), f"model/loss={loss}", *HEADS[head], "+model.head.out_dim=8", *head_dims],
        tmp_path,
    )
    metrics = tasks.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert {f"train/{c}" for c in components} <= set(metrics)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A tiny generated training set (``<class>/NN.jpg``) for the pinned recipes."""
    root = tmp_path_factory.mktemp("copies")
    for c in range(4):
        (root / f"T{c:06d}").mkdir()
        for i in range(3):
            Image.new("RGB", (40, 40), (60 * c, 80 * i, 20)).save(root / f"T{c:06d}" / f"{i:02d}.jpg")
    return root


@pytest.mark.parametrize("recipe", ["finetune_d2lv_r50", "finetune_d2lv_r152", "finetune_d2lv_r50ibn"])
def test_pinned_finetune_recipes_fast_dev_run(
    benchmark: Path, generated: Path, tmp_path: Path, recipe: str
) -> None:
    overrides = [
        f"experiment={recipe}",
        *tiny(benchmark),
        f"data.generated={generated}",
        "backbone.trunk.weights=null",
        "evaluation.whitening.dim=4",  # the tiny benchmark has 6 training images to fit the PCA on
    ]
    cfg = compose_cfg(overrides, tmp_path)
    assert cfg.model.waveblock is not None and cfg.backbone.trunk.last_stride == 1
    metrics = tasks.train(cfg)
    assert "val/uAP" in metrics


def run_cli(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ISC_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.timeout(600)
def test_ddp_two_cpu_processes_log_the_uap_of_the_saved_model(benchmark: Path, tmp_path: Path) -> None:
    """Two gloo ranks each embed a shard for the callback; their gathered val/uAP is the figure one
    process gets by evaluating the checkpoint they saved."""
    overrides = one_step(benchmark)
    result = run_cli(
        [
            *overrides,
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.sync_batchnorm=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    evaluated = evaluate_checkpoint(
        overrides, tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "eval"
    )
    assert metrics["val/uAP"] == pytest.approx(evaluated["uAP"], abs=1e-6)


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_callback_under_ddp_gathers_every_shard_in_order(ddp_jobs: Path) -> None:
    """Each of 2 ranks embeds half the images; rank 0 must reassemble them exactly to score uAP 1.0
    (``tests/training/ddp_retrieval_job.py``)."""
    out = ddp_jobs / "retrieval" / "metrics.json"
    metrics = json.loads(out.read_text())
    assert metrics["val/uAP"] == pytest.approx(1.0)
    assert metrics["val/recall_at_rank1"] == pytest.approx(1.0)


def test_wandb_logger_runs_offline(benchmark: Path, tmp_path: Path, monkeypatch) -> None:
    """logger=wandb logs metrics, the resolved config and galleries to an offline run: no network."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg([*tiny(benchmark), "logger=wandb"], tmp_path)
    assert cfg.logger.wandb.mode == "offline"
    tasks.train(cfg)
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "no offline wandb run directory was written"
    history = "".join(p.read_text(errors="ignore") for p in runs[0].rglob("*.wandb"))
    assert history  # the run's binary log holds the logged metrics


def test_optuna_sweep_config_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_cfg("hparams_search=optuna", hydra=True)
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/uAP"
    assert "model.lr" in cfg.hydra.sweeper.params and "model/loss" in cfg.hydra.sweeper.params


class BatchSpy(L.LightningModule):
    """Records every training batch (epoch, images, labels); trains one dummy weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append((self.current_epoch, images.clone(), labels.clone()))
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_epoch_draws_new_classes_copies_and_batches(
    tmp_path: Path, monkeypatch, num_workers: int
) -> None:
    """Through a real fit: every epoch a new class order, new member picks and new copy pixels, and
    the pixels are exactly that epoch's copies (so worker processes saw the epoch too)."""
    from torchvision.transforms import v2 as T

    from datamodules.copies import CopiesDataModule
    from isc.augment import Compose, RandomResizedCrop, Resize, synthetic_image
    from isc.data.copies import PKSampler

    sources = tmp_path / "sources"
    sources.mkdir()
    for i in range(6):
        synthetic_image(np.random.default_rng(i), (64, 48)).save(sources / f"T{i:02d}.png")
    recipe = Compose({"crop": RandomResizedCrop(24, scale=(0.3, 1.0)), "resize": Resize(24)})
    dm = CopiesDataModule(
        sources=str(sources), recipe=recipe, p=2, k=2, members=3, image_size=24,
        steps_per_epoch=3, num_workers=num_workers, seed=3,
    )  # fmt: skip
    dm.setup()
    # A deterministic input pipeline: batch pixels are then a pure function of the copy stream.
    dm.dataset.transform = T.Compose([T.PILToTensor(), T.Resize((24, 24), antialias=True)])
    passes: list[tuple[int, list[list[int]]]] = []
    draw = PKSampler.__iter__

    def spy(self):  # the sampler runs in the main process, also with workers
        batches: list[list[int]] = []
        for batch in draw(self):
            if not batches:
                passes.append((self.epoch, batches))
            batches.append(list(batch))
            yield batch

    monkeypatch.setattr(PKSampler, "__iter__", spy)
    module = BatchSpy()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)

    assert [epoch for epoch, _ in passes] == [0, 1]
    assert [e for e, _, _ in module.seen] == [0, 0, 0, 1, 1, 1]
    indices = {epoch: batches for epoch, batches in passes}
    labels = {e: [lab.tolist() for ep, _, lab in module.seen if ep == e] for e in (0, 1)}
    assert labels[0] != labels[1]  # class order
    assert indices[0] != indices[1]  # member picks
    ds = dm.dataset
    for epoch in (0, 1):
        ds.set_epoch(epoch)  # what the copies of this epoch must be, computed here in the main process
        seen = [s for s in module.seen if s[0] == epoch]
        for (_, images, labs), batch in zip(seen, indices[epoch], strict=True):
            assert labs.tolist() == [int(ds.targets[i]) for i in batch]
            assert torch.equal(images, torch.stack([ds[i][0] for i in batch]))
    ds.set_epoch(0)  # epoch 1's copies differ from what epoch 0 made of the same members
    copies = [(b, i) for b, batch in enumerate(indices[1]) for i in batch if i % ds.members]
    seen1 = [images for ep, images, _ in module.seen if ep == 1]
    assert copies and all(not torch.equal(seen1[b][indices[1][b].index(i)], ds[i][0]) for b, i in copies)


def test_lightning_tells_the_pk_batch_sampler_the_epoch() -> None:
    """Lightning's ``_set_sampler_epoch`` only looks at ``loader.batch_sampler.sampler``: PKSampler is its own."""
    from lightning.fabric.utilities.data import _set_sampler_epoch

    from isc.data.copies import PKSampler

    sampler = PKSampler(np.repeat(np.arange(8), 2), p=2, k=2)
    _set_sampler_epoch(torch.utils.data.DataLoader(range(16), batch_sampler=sampler), 5)
    assert sampler.epoch == 5 and sampler.next_epoch == 5


RESUME_STEPS = 2  # optimiser steps per epoch of the kill/resume runs

# Lightning 2.6 writes last.ckpt only when a top-k checkpoint is written at the same step, so with
# `monitor: val/uAP` last.ckpt is the best epoch, not the last one. Until conf/callbacks has a
# ModelCheckpoint that writes last.ckpt every epoch, these overrides add it (no-ops once it does).
# conf fix pending (lead): see the report of issue 8.


def resume_job(benchmark: Path, run_dir: Path) -> list[str]:
    """`python run.py` shrunk to 3 epochs of 2 steps at 32 px, with one DataLoader worker."""
    return [
        *(o for o in tiny(benchmark) if not o.startswith(("trainer.fast_dev_run", "data.num_workers"))),
        "debug=default",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=null",
        f"data.steps_per_epoch={RESUME_STEPS}",
        "data.num_workers=1",
        f"hydra.run.dir={run_dir}",
    ]


@pytest.fixture
def start_cli(tmp_path: Path):
    """Start `run.py` in its own process group; whatever still runs at teardown is SIGKILLed."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        procs.append(_start_cli(args, tmp_path))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start_cli(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "ISC_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",  # a shared 2-core machine: oversubscribed threads make runs 3x slower
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "tests" / "training"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    with open(tmp_path / f"{len(list(tmp_path.glob('*.log')))}.log", "w") as log:  # the child keeps its copy
        return subprocess.Popen(
            [sys.executable, "run.py", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGKILL reaches the DataLoader worker too
        )  # fmt: skip


def logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*.log")))


def finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 300) -> None:
    assert proc.wait(timeout=timeout) == 0, logs(tmp_path)


def csv_rows(run_dir: Path) -> dict[str, list[dict[str, str]]]:
    """Every metrics.csv of a run (one per logger version: a resumed run writes the next one)."""
    return {
        p.parent.name: list(csv.DictReader(p.open()))
        for p in sorted((run_dir / "csv").glob("version_*/metrics.csv"))
    }


def logged(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


@pytest.mark.timeout(600)
def test_killed_run_resumes_exactly_from_last_checkpoint(benchmark: Path, tmp_path: Path, start_cli) -> None:
    """SIGKILL `run.py` mid-epoch 2, resume with ckpt_path=last.ckpt: same weights and per-epoch uAP as a
    run never interrupted, and no batch of the restarted epoch skipped or repeated."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    marker = tmp_path / "paused"
    uninterrupted = start_cli(resume_job(benchmark, whole))
    pause = [  # before batch 1 of epoch 2: one step of epoch 2 done, last.ckpt from the end of epoch 1
        "+callbacks.pause._target_=resume_helpers.PauseAt",
        "+callbacks.pause.epoch=2",
        "+callbacks.pause.batch=1",
        f"+callbacks.pause.marker={marker}",
    ]
    killed = start_cli([*resume_job(benchmark, broken), *pause])
    deadline = time.monotonic() + 400
    while not marker.exists():
        assert killed.poll() is None, "the run to kill ended early:\n" + logs(tmp_path)
        assert time.monotonic() < deadline, "the run to kill never reached epoch 2"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert marker.read_text().split() == ["epoch", "2", "step", str(2 * RESUME_STEPS + 1)]
    last = broken / "checkpoints" / "last.ckpt"
    at_kill = torch.load(last, map_location="cpu", weights_only=False)
    assert at_kill["epoch"] == 1 and at_kill["global_step"] == 2 * RESUME_STEPS  # the end of epoch 1

    finish(start_cli([*resume_job(benchmark, broken), f"ckpt_path={last}"]), tmp_path)
    finish(uninterrupted, tmp_path)

    a = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(last, map_location="cpu", weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (2, 3 * RESUME_STEPS)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, weight in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], weight, atol=1e-6, rtol=0, msg=name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    cb_a, cb_b = (next(v for k, v in s["callbacks"].items() if "RetrievalEvaluation" in k) for s in (a, b))
    uap = [h["val/uAP"] for h in cb_a["history"]]
    assert len(uap) == 3 and [h["val/uAP"] for h in cb_b["history"]] == pytest.approx(uap, abs=1e-9)

    # The loggers: the resumed run (version_1) logs epoch 2 only, step for step as the whole run did.
    whole_csv, broken_csv = csv_rows(whole)["version_0"], csv_rows(broken)
    resumed_csv = broken_csv["version_1"]
    steps = list(range(2 * RESUME_STEPS, 3 * RESUME_STEPS))  # epoch 2: no batch skipped or repeated
    epoch2 = [(s, v) for s, v in logged(whole_csv, "train/loss") if s >= 2 * RESUME_STEPS]
    resumed = logged(resumed_csv, "train/loss")
    assert [s for s, _ in resumed] == [s for s, _ in epoch2] == steps
    assert [v for _, v in resumed] == pytest.approx([v for _, v in epoch2], abs=1e-6)
    per_epoch = [v for s, v in logged(whole_csv, "val/uAP") if s > 0]
    assert per_epoch == pytest.approx(uap, abs=1e-6)
    assert [v for _, v in logged(resumed_csv, "val/uAP")] == pytest.approx(uap[2:], abs=1e-6)

    # The "before training" baseline belongs to the original run: kept, not re-run or re-logged.
    assert cb_b["baseline"] == pytest.approx(cb_a["baseline"])
    assert not [s for s, _ in logged(resumed_csv, "val/uAP") if s == 0]


def test_freeze_bn_stats_keeps_running_statistics(benchmark: Path, tmp_path: Path) -> None:
    """With freeze_bn_stats the trunk's BN running means stay as loaded while its weights train."""
    short = [o for o in tiny(benchmark) if not o.startswith("trainer.fast_dev_run")]
    cfg = compose_cfg(
        [*short, "data.steps_per_epoch=3", "trainer.max_epochs=1", "model.freeze_bn_stats=true"], tmp_path
    )
    from hydra.utils import instantiate

    model = instantiate(cfg.model)  # 3 steps: the first has lr 0 (the warm-up starts at 0)
    before = {n: b.clone() for n, b in model.backbone.trunk.named_buffers() if n.endswith("running_mean")}
    weights = {n: p.clone() for n, p in model.backbone.trunk.named_parameters()}
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=instantiate(cfg.data))
    after = dict(model.backbone.trunk.named_buffers())
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    assert any(not torch.equal(weights[n], p) for n, p in model.backbone.trunk.named_parameters())
