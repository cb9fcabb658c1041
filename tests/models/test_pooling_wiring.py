"""One pooling node: ``backbone.pooling`` reaches the model that trains, the descriptor it saves and
evaluates, what ``task=export`` writes and what ``task=evaluate`` builds, for fine-tuning experiments.

Before, fine-tuning read ``model.pooling`` and ``python run.py backbone.pooling.p=5`` silently trained
with p = 3. Each check compares with the configured value, which no default equals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_cfg
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from isc.models.descriptor import load_descriptor_model, save_descriptor_model
from tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]
P = 4.25  # exact in float32, and no config's default

EXPERIMENTS = {
    "embedded_demo": [],  # the default job: EfficientNet-Lite0, no head
    "finetune_d2lv_r50": [  # a ResNet through conf/backbone/resnet_base.yaml, BN-neck head (shrunk)
        "backbone.trunk.weights=null",
        "model.head.hidden_dims=[8]",
        "model.head.out_dim=4",
    ],
}


def pooling_p(model: Any) -> float:
    return float(model.pooling.p.detach())


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_backbone_pooling_reaches_training_checkpoints_export_and_evaluation(
    experiment: str, tmp_path: Path
) -> None:
    overrides = [f"experiment={experiment}", f"backbone.pooling.p={P}", *EXPERIMENTS[experiment]]
    cfg = compose_cfg(tmp_path, *overrides)
    assert cfg.task == "finetune"

    module = instantiate(cfg.model)  # the LightningModule task=finetune trains
    assert pooling_p(module.backbone) == P
    assert module.backbone.pooling.p.requires_grad  # fine-tuning learns p, as D2LV's GeM
    trained = module.descriptor_model()  # what the retrieval callback evaluates
    assert pooling_p(trained) == P

    # the Lightning checkpoint (task=evaluate ckpt_path=...), and the file task=export writes from it
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    assert pooling_p(load_descriptor_model(tmp_path / "last.ckpt")) == P
    from_checkpoint = f"ckpt_path={tmp_path / 'last.ckpt'}"
    exported = TASKS["export"](compose_cfg(tmp_path / "x1", *overrides, "task=export", from_checkpoint))
    assert pooling_p(load_descriptor_model(str(exported["path"]))) == P
    save_descriptor_model(trained, tmp_path / "model.pt")
    assert pooling_p(load_descriptor_model(tmp_path / "model.pt")) == P

    # without a checkpoint, evaluate and export build the backbone node itself
    exported = TASKS["export"](compose_cfg(tmp_path / "x2", *overrides, "task=export"))
    assert pooling_p(load_descriptor_model(str(exported["path"]))) == P


def test_the_training_pooling_is_the_backbone_node_not_a_second_one(tmp_path: Path) -> None:
    """`model.pooling` interpolates `backbone.pooling`, so overriding it is an error, not a silent fork."""
    cfg = compose_cfg(tmp_path, "experiment=finetune_d2lv_r50")
    assert cfg.model.pooling == cfg.backbone.pooling
    assert cfg.backbone.pooling.trainable is True
    with pytest.raises(ConfigCompositionException, match="model.pooling.p"):
        compose_cfg(tmp_path, "experiment=finetune_d2lv_r50", "model.pooling.p=5")
