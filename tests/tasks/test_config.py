"""Config composition: every option of every group composes, each part is wired one way (model/loss,
model/optimizer, model/scheduler), the pinned experiments keep their values, and every loss either trains
with the default experiment or fails before any data work with the override to use."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_cfg, evaluate_checkpoint
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import tasks
import tasks.training

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def config_groups() -> dict[str, list[str]]:
    """What `python run.py --help` lists: every folder of configs under conf/ (nested ones as a/b), but hydra/."""
    groups: dict[str, list[str]] = {}
    for folder in sorted(p for p in CONF.rglob("*") if p.is_dir()):
        group = folder.relative_to(CONF).as_posix()
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options and group.split("/")[0] != "hydra":
            groups[group] = options
    return groups


GROUP_OPTIONS = [(group, option) for group, options in config_groups().items() for option in options]


def test_the_nested_groups_are_found() -> None:
    groups = config_groups()
    assert {"model/loss", "model/optimizer", "model/scheduler", "experiment", "augmentation"} <= set(groups)
    assert not {"loss", "optimizer", "scheduler"} & set(groups)  # one way to wire each part
    assert {"d2lv", "infonce_entropy", "contrastive_xbm", "barlow_twins"} <= set(groups["model/loss"])


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_with_the_default_config(group: str, option: str) -> None:
    """`group=option` as typed on the command line; mandatory `???` values are left unresolved."""
    if group == "hparams_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_cfg(f"{group}={option}", hydra=group == "hparams_search")
    assert cfg.task in {"evaluate", "generate", "build_benchmark", "pretrain", "finetune"}
    if group.startswith("model/"):
        node = cfg.model[group.split("/")[1]]
        assert node._target_ == OmegaConf.load(CONF / group / f"{option}.yaml")._target_


@pytest.mark.parametrize(
    "override", ["loss=d2lv", "loss=infonce_entropy", "optimizer=adam", "scheduler=warmup_cosine"]
)
def test_the_old_top_level_groups_fail_at_composition(override: str) -> None:
    with pytest.raises(ConfigCompositionException, match="Could not override"):
        compose_cfg(override)


def test_nested_overrides_reach_the_model_of_any_experiment() -> None:
    cfg = compose_cfg("model/loss=d2lv", "model/optimizer=sgd", "model/scheduler=warmup_cosine")
    assert cfg.model.loss._target_ == "isc.losses.d2lv.D2LVLoss"
    assert cfg.model.optimizer._target_ == "torch.optim.SGD"
    assert "flat_epochs" in cfg.model.scheduler  # the experiment's phases still apply on top
    assert "loss" not in cfg  # no second, top-level loss to be silently ignored
    pre = compose_cfg("experiment=pretrain_barlow_r50", "model/loss=momentum2_teacher", "model/optimizer=sgd")
    assert pre.model.loss._target_ == "isc.losses.byol.BYOLLoss"
    # the experiment pins no optimiser-specific keys, so another optimiser composes cleanly
    assert set(pre.model.optimizer) == set(OmegaConf.load(CONF / "model/optimizer/sgd.yaml"))


def test_optuna_searches_the_loss_group() -> None:
    """The sweeper turns `model/loss: choice(...)` into `model/loss=<choice>` overrides, which compose."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution

    cfg = compose_cfg("hparams_search=optuna", hydra=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    space, _ = create_params_from_overrides(params)
    losses = space["model/loss"]
    assert isinstance(losses, CategoricalDistribution) and losses.choices == ("d2lv", "infonce_entropy")
    for choice in losses.choices:
        assert compose_cfg(f"model/loss={choice}").model.loss._target_.endswith(
            {"d2lv": "D2LVLoss", "infonce_entropy": "InfoNCEEntropyLoss"}[choice]
        )


# --------------------------------------------------------------------------------------------------
# pinned experiments: values as before the merge onto shared bases, except the intended changes


def flat(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> unresolved value (`???` stays the string '???')."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


D2LV_FINETUNE = {
    "task": "finetune",
    "optimized_metric": "val/uAP",
    # backbone.trunk.weights and data.generated are left out: their `???` in the experiment never wins, as
    # OmegaConf's merge keeps the value an earlier config set (the backbone's and data's null), today as before
    "backbone.trunk.last_stride": 1,
    "data._target_": "datamodules.copies.CopiesDataModule",
    "data.sources": None,
    "data.p": 32,
    "data.k": 4,
    "data.image_size": "${evaluation.image_size}",
    "data.steps_per_epoch": 8000,
    "data.num_workers": 8,
    "model._target_": "lightning_modules.copy_finetune.CopyFinetune",
    "model.pooling": "${backbone.pooling}",
    "backbone.pooling._target_": "isc.models.pooling.GeM",
    "backbone.pooling.p": 3.0,
    "backbone.pooling.trainable": True,
    "model.head._target_": "isc.models.heads.BNNeckHead",
    "model.head.hidden_dims": [4096],
    "model.head.out_dim": 8192,
    "model.waveblock._target_": "isc.models.heads.WaveBlock",
    "model.waveblock.ratio": 0.3,
    "model.waveblock.factor": 1.5,
    "model.waveblock.per_sample": False,
    "model.waveblock_after": ["layer2", "layer3"],
    "model.lr": 3.5e-4,
    "model.freeze_bn_stats": False,
    "model.base_batch_size": None,
    "model.loss._target_": "isc.losses.d2lv.D2LVLoss",
    "model.loss.ce_weight": 10.0,
    "model.loss.triplet_weight": 1.0,
    "model.loss.label_smoothing": 0.1,
    "model.loss.margin": None,
    "model.optimizer._target_": "torch.optim.Adam",
    "model.optimizer.betas": [0.9, 0.999],
    "model.optimizer.weight_decay": 0.0,
    "model.scheduler._target_": "isc.train.optim.WarmupCosineLR",
    "model.scheduler.warmup_epochs": 5,
    "model.scheduler.flat_epochs": 5,  # changed: 5 warm-up / 5 flat / 15 cosine (was 10 flat)
    "model.scheduler.final_factor": 0.01,
    "evaluation.image_size": 256,
    "evaluation.whitening.enabled": True,  # changed: the seed's test code, 1500 dims of the raw BN neck
    "evaluation.whitening.dim": 1500,  # changed (issue 16): was 256, the descriptor track's figure
    "evaluation.whitening.raw": True,
    "evaluation.whitening.samples": 20000,
    "evaluation.whitening.seed": 123,
    "evaluation.whitening.eigen_power": -0.5,
    "evaluation.score_normalization.enabled": True,
    "evaluation.score_normalization.beta": 2.0,  # changed: D2LV's beta 2, k 10 (was 1, 3)
    "evaluation.score_normalization.k": 10,
    "callbacks.model_checkpoint.monitor": "val/uAP",
    "callbacks.retrieval._target_": "callbacks.retrieval.RetrievalEvaluation",
    "trainer.max_epochs": 25,
    "trainer.log_every_n_steps": 50,
}

M2T_PRETRAIN = {
    "task": "pretrain",
    "optimized_metric": "train/loss",
    "backbone.trunk.zero_init_residual": False,
    "data._target_": "datamodules.pretrain.PretrainDataModule",
    "data.root": "???",
    "data.image_size": 224,
    "data.batch_size": 64,
    "model._target_": "lightning_modules.momentum2_teacher.Momentum2Teacher",
    "model.projector_hidden_dim": 4096,
    "model.projector_dim": 256,
    "model.predictor_hidden_dim": 4096,
    "model.base_momentum": 0.99,
    "model.momentum_bn": True,
    "model.lr": 0.05,
    "model.lr_bias_norm": None,
    "model.base_batch_size": 256,
    "model.exclude_bias_and_norm": False,
    "model.loss._target_": "isc.losses.byol.BYOLLoss",
    "model.optimizer._target_": "torch.optim.SGD",
    "model.optimizer.momentum": 0.9,
    "model.optimizer.weight_decay": 1.0e-4,
    "model.optimizer.nesterov": False,
    "model.scheduler._target_": "isc.train.optim.WarmupCosineLR",
    "model.scheduler.warmup_epochs": 10,
    "model.scheduler.final_factor": 0.0,
    "trainer.max_epochs": 300,
    "trainer.sync_batchnorm": False,
    "trainer.log_every_n_steps": 50,
}

EXPECTED = {
    "finetune_d2lv_r50": D2LV_FINETUNE | {"backbone.trunk._target_": "isc.models.trunks.resnet50"},
    "finetune_d2lv_r152": D2LV_FINETUNE | {"backbone.trunk._target_": "isc.models.trunks.resnet152"},
    "finetune_d2lv_r50ibn": D2LV_FINETUNE | {"backbone.trunk._target_": "isc.models.trunks.resnet50_ibn_a"},
    "pretrain_m2t_r152": M2T_PRETRAIN | {"backbone.trunk._target_": "isc.models.trunks.resnet152"},
    "pretrain_m2t_r50ibn": M2T_PRETRAIN | {"backbone.trunk._target_": "isc.models.trunks.resnet50_ibn_a"},
    "pretrain_barlow_r50": {
        "task": "pretrain",
        "backbone.trunk._target_": "isc.models.trunks.resnet50",
        "backbone.trunk.zero_init_residual": True,
        "data.image_size": 224,
        "data.batch_size": 256,
        "model._target_": "lightning_modules.barlow_twins.BarlowTwins",
        "model.projector_dims": [8192, 8192, 8192],
        "model.lr": 0.2,
        "model.lr_bias_norm": 0.0048,
        "model.base_batch_size": 256,
        "model.loss._target_": "isc.losses.barlow_twins.BarlowTwinsLoss",
        "model.loss.lambda_offdiag": 0.0051,  # now from model/loss/barlow_twins.yaml, not the experiment
        "model.optimizer._target_": "isc.train.optim.LARS",
        "model.optimizer.weight_decay": 1.5e-6,
        "model.optimizer.momentum": 0.9,
        "model.optimizer.eta": 0.001,
        "model.scheduler.warmup_epochs": 10,
        "model.scheduler.final_factor": 0.001,
        "trainer.max_epochs": 1000,
        "trainer.sync_batchnorm": None,  # auto: SyncBatchNorm on multi-GPU runs (run.py)
    },
    "embedded_demo": {
        "task": "finetune",
        "backbone.trunk._target_": "isc.models.trunks.efficientnet_lite0",
        "data.p": 8,
        "data.image_size": 160,
        "data.steps_per_epoch": 12,
        "model.head": None,
        "model.lr": 1.0e-4,
        "model.freeze_bn_stats": True,
        "model.loss._target_": "isc.losses.infonce_entropy.InfoNCEEntropyLoss",
        "model.optimizer._target_": "torch.optim.Adam",
        "model.scheduler.warmup_epochs": 1,
        "model.scheduler.flat_epochs": 1,
        "model.scheduler.final_factor": 0.01,
        "evaluation.whitening.enabled": False,  # conf/evaluation/default.yaml's, untouched
        "trainer.max_epochs": 8,
    },
}


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_pinned_experiments_keep_their_values(experiment: str) -> None:
    values = flat(compose_cfg(f"experiment={experiment}"))
    got = {k: values.get(k, "<absent>") for k in EXPECTED[experiment]}
    assert got == EXPECTED[experiment]
    assert "loss" not in values and not any(k.startswith("loss.") for k in values)


@pytest.mark.parametrize(
    "family", [["finetune_d2lv_r50", "finetune_d2lv_r152", "finetune_d2lv_r50ibn"], ["pretrain_m2t_r152", "pretrain_m2t_r50ibn"]]
)  # fmt: skip
def test_per_backbone_experiments_differ_only_in_the_backbone(family: list[str]) -> None:
    configs = [{k: v for k, v in flat(compose_cfg(f"experiment={e}")).items() if not k.startswith("backbone.")}
               for e in family]  # fmt: skip
    assert all(c == configs[0] for c in configs[1:])


def test_d2lv_schedule_factor_at_epoch_boundaries() -> None:
    """WarmupCosineLR built from the D2LV experiment: 5 warm-up, 5 flat, 15 cosine epochs to 0.01."""
    cfg = compose_cfg("experiment=finetune_d2lv_r50")
    steps_per_epoch, epochs = 4, cfg.trainer.max_epochs
    s = cfg.model.scheduler
    assert (epochs, s.warmup_epochs, s.flat_epochs, s.final_factor) == (25, 5, 5, 0.01)

    def expected(epoch: float) -> float:  # independent of isc.train.optim: written from the recipe
        if epoch < 5:
            return epoch / 5
        if epoch < 10:
            return 1.0
        return 0.01 + 0.99 * (1 + math.cos(math.pi * (epoch - 10) / 15)) / 2

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.model.lr)
    total = epochs * steps_per_epoch
    scheduler = instantiate(s)(optimizer, total_steps=total, steps_per_epoch=steps_per_epoch)
    factors = {}
    for step in range(total + 1):
        if step % steps_per_epoch == 0:
            factors[step // steps_per_epoch] = optimizer.param_groups[0]["lr"] / cfg.model.lr
        optimizer.step()
        scheduler.step()
    for epoch in (0, 5, 10, 15, 20, 25):
        assert factors[epoch] == pytest.approx(expected(epoch), abs=1e-12), epoch
    assert (factors[15], factors[20], factors[25]) == pytest.approx((0.7525, 0.2575, 0.01))


# --------------------------------------------------------------------------------------------------
# every loss with the default experiment (no head): trains a couple of steps, or fails before data work


def short_run(benchmark: Path, out_dir: Path) -> list[str]:
    """The default experiment, `debug=default` (1 epoch, 2 steps), shrunk to the tiny benchmark."""
    return [
        f"paths.output_dir={out_dir}",
        "debug=default",
        f"dataset.root={benchmark}",
        "trainer.accelerator=cpu",
        "evaluation.image_size=32",
        "evaluation.score_normalization.k=2",
        "data.image_size=32",
        "data.num_workers=0",
        "data.p=2",
        "data.k=2",
        "logger=csv",
        "callbacks.retrieval.evaluate_before_training=false",  # one evaluation (after the epoch) is enough
        "callbacks.retrieval.gallery_queries=0",
    ]


@pytest.mark.parametrize(
    ("loss", "components"),
    [
        ("d2lv", {"ce", "triplet"}),
        ("infonce_entropy", {"infonce", "entropy"}),
        ("contrastive_xbm", {"pos", "neg"}),  # its memory takes the descriptor width lazily
    ],
)
def test_finetuning_losses_train_with_the_default_experiment(
    benchmark: Path, tmp_path: Path, loss: str, components: set[str]
) -> None:
    overrides = [*short_run(benchmark, tmp_path / "train"), f"model/loss={loss}"]
    cfg = compose_cfg(overrides)
    assert cfg.model.head is None  # the default experiment's
    metrics = {k: float(v) for k, v in tasks.train(cfg).items()}  # type: ignore[arg-type]
    assert math.isfinite(metrics["train/loss"])
    assert {f"train/{c}" for c in components} <= set(metrics)
    last = tmp_path / "train" / "checkpoints" / "last.ckpt"
    evaluated = evaluate_checkpoint(overrides, last, tmp_path / "eval")
    assert metrics["val/uAP"] == pytest.approx(evaluated["uAP"], abs=1e-6)  # the saved model's figure
    if loss == "d2lv":
        assert metrics["train/ce"] > 0  # a classifier exists (on the pooled feature), not a dropped CE term


def test_d2lv_without_head_keeps_the_pooled_descriptor(benchmark: Path) -> None:
    """Classifier sized from the data on the pooled feature; descriptor = L2-normalised pooled feature."""
    from types import SimpleNamespace

    cfg = compose_cfg(*short_run(benchmark, Path("/unused")), "model/loss=d2lv")
    model = instantiate(cfg.model)
    assert model.head is None and model.classifier is None
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(num_classes=5))  # what setup reads
    model.setup("fit")
    assert model.classifier is not None
    assert model.classifier.weight.shape == (5, model.backbone.trunk.out_channels)
    images = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.embed(images), torch.nn.functional.normalize(model(images), dim=-1))


@pytest.mark.parametrize("loss", ["barlow_twins", "momentum2_teacher"])
def test_pretraining_losses_fail_in_copy_finetune_before_any_data_work(
    benchmark: Path, tmp_path: Path, loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamodules.copies import CopiesDataModule

    def no_data(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("data work started before the model was checked")

    monkeypatch.setattr(CopiesDataModule, "setup", no_data)
    monkeypatch.setattr(tasks.training, "dataset_root", no_data)
    cfg = compose_cfg(*short_run(benchmark, tmp_path), f"model/loss={loss}")
    # Hydra wraps the module's ValueError, keeping its message
    with pytest.raises(
        InstantiationException, match=r"model=copy_finetune cannot train with .*model/loss=d2lv"
    ):
        tasks.train(cfg)


@pytest.mark.parametrize(
    ("experiment", "loss"), [("pretrain_barlow_r50", "d2lv"), ("pretrain_m2t_r152", "infonce_entropy"),
                             ("pretrain_m2t_r50ibn", "barlow_twins")]
)  # fmt: skip
def test_foreign_losses_fail_in_pretraining_models_at_instantiation(experiment: str, loss: str) -> None:
    cfg = compose_cfg(f"experiment={experiment}", f"model/loss={loss}", "data.root=/unused")
    name = cfg.model._target_.rsplit(".", 1)[1]
    model = {"BarlowTwins": "barlow_twins", "Momentum2Teacher": "momentum2_teacher"}[name]
    with pytest.raises(InstantiationException, match=f"model={model} cannot train with .*model/loss={model}"):
        instantiate(cfg.model)
