"""Metric fine-tuning: the per-epoch retrieval callback, fast_dev_runs of every recipe, DDP and sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from PIL import Image

import run
from callbacks.retrieval import RetrievalEvaluation

ROOT = Path(__file__).resolve().parents[1]


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
    callback = RetrievalEvaluation(str(benchmark), image_size=32, num_workers=0, score_norm_k=2)
    metrics = fit(PixelEmbedder(), callback, tmp_path)
    assert metrics["val/uAP"] == pytest.approx(1.0)
    assert metrics["val/recall_at_rank1"] == pytest.approx(1.0)
    assert "val/uAP_snorm" in metrics  # the benchmark has training images
    assert callback.baseline["val/uAP"] == pytest.approx(1.0)  # evaluated before training too
    gallery = next((tmp_path / "lightning_logs").rglob("galleries/*.jpg"))
    assert Image.open(gallery).width > 0


def test_callback_logs_low_uap_for_random_descriptors(benchmark: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = RetrievalEvaluation(str(benchmark), image_size=32, num_workers=0, score_norm_beta=None)
    metrics = fit(PixelEmbedder(shuffle=True), callback, tmp_path)
    assert metrics["val/uAP"] < 0.5
    assert "val/uAP_snorm" not in metrics


def compose_cfg(overrides: list[str], out_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={out_dir}", *overrides])


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


def test_default_main_job_fast_dev_run(benchmark: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(tiny(benchmark), tmp_path)
    assert cfg.task == "finetune"  # `python run.py` with no arguments fine-tunes
    metrics = run.train(cfg)
    assert 0.0 <= metrics["val/uAP"] <= 1.0
    assert {"train/loss", "train/infonce", "train/entropy"} <= set(metrics)
    assert json.loads((tmp_path / "metrics.json").read_text())["val/uAP"] == metrics["val/uAP"]


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
        [*tiny(benchmark), f"loss={loss}", *HEADS[head], "+model.head.out_dim=8", *head_dims], tmp_path
    )
    metrics = run.train(cfg)
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
    ]
    cfg = compose_cfg(overrides, tmp_path)
    assert cfg.model.waveblock is not None and cfg.backbone.trunk.last_stride == 1
    metrics = run.train(cfg)
    assert "val/uAP" in metrics


def run_cli(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ISC_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.timeout(600)
def test_ddp_two_cpu_processes_fast_dev_run(benchmark: Path, tmp_path: Path) -> None:
    result = run_cli(
        [
            *tiny(benchmark),
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.sync_batchnorm=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["val/uAP"] <= 1.0


@pytest.mark.timeout(600)
def test_multirun_gives_each_job_its_own_dir(benchmark: Path, tmp_path: Path) -> None:
    result = run_cli(
        ["-m", *tiny(benchmark), "model.lr=1e-4,3e-4", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/metrics.json"))
    assert [j.name for j in jobs] == ["0", "1"]
    assert {OmegaConf.load(j / "config_resolved.yaml").model.lr for j in jobs} == {1e-4, 3e-4}


@pytest.mark.timeout(300)
def test_callback_under_ddp_gathers_every_shard_in_order(benchmark: Path, tmp_path: Path) -> None:
    """Each of 2 ranks embeds half the images; rank 0 must reassemble them exactly to score uAP 1.0."""
    out = tmp_path / "metrics.json"
    script = Path(__file__).with_name("ddp_retrieval_script.py")
    result = subprocess.run(
        [sys.executable, str(script), str(benchmark), str(out)], capture_output=True, text=True, timeout=280
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["val/uAP"] == pytest.approx(1.0)
    assert metrics["val/recall_at_rank1"] == pytest.approx(1.0)


def test_wandb_logger_runs_offline(benchmark: Path, tmp_path: Path, monkeypatch) -> None:
    """logger=wandb logs metrics, the resolved config and galleries to an offline run: no network."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg([*tiny(benchmark), "logger=wandb"], tmp_path)
    assert cfg.logger.wandb.mode == "offline"
    run.train(cfg)
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "no offline wandb run directory was written"
    history = "".join(p.read_text(errors="ignore") for p in runs[0].rglob("*.wandb"))
    assert history  # the run's binary log holds the logged metrics


def test_optuna_sweep_config_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/uAP"
    assert "model.lr" in cfg.hydra.sweeper.params


def test_killed_run_resumes_from_last_checkpoint(benchmark: Path, tmp_path: Path) -> None:
    short = [o for o in tiny(benchmark) if not o.startswith("trainer.fast_dev_run")]
    short += ["data.steps_per_epoch=1", "trainer.max_epochs=1"]
    first = compose_cfg(short, tmp_path / "a")
    run.train(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == 0 and state["global_step"] == 1
    resumed = compose_cfg([*short, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "a")
    metrics = run.train(resumed)
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 2 and final["epoch"] > state["epoch"]  # continued, not restarted
    history = next(v for k, v in final["callbacks"].items() if "RetrievalEvaluation" in k)["history"]
    assert len(history) == 2 and history[-1]["val/uAP"] == pytest.approx(metrics["val/uAP"])


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
