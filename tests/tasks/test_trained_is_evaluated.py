"""The model that is trained is the model that is evaluated and exported: one number from every path.

Fine-tune for a few steps, then score the saved checkpoint with ``task=evaluate ckpt_path=...`` and the
exported file with ``task=export`` + ``task=evaluate``: both must reproduce the retrieval callback's last
``val/uAP`` (same image size, same post-processing) to 1e-6, and loading the export must need neither
Lightning nor Hydra.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg

import run
import tasks

ROOT = Path(__file__).resolve().parents[2]


def common(benchmark: Path) -> list[str]:
    return [
        f"dataset.root={benchmark}",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "+trainer.enable_progress_bar=false",
        "evaluation.image_size=96",  # EfficientNet maps smaller tiny test images to all-zero features
        "evaluation.num_workers=0",
        "evaluation.score_normalization.k=2",
        "data.image_size=64",
        "data.num_workers=0",
        "data.p=2",
        "data.k=2",
    ]


HEADS = {
    "no head, InfoNCE (the default job)": [],
    "BN-neck head, D2LV loss and test-time GeM, raw whitening": [
        "model/loss=d2lv",
        "+model.head={_target_: isc.models.heads.BNNeckHead, _partial_: true, hidden_dims: [16], out_dim: 8}",
        "backbone.pooling.p=2.5",
        "evaluation.gem_p=3",  # D2LV's test code: a fresh GeM p 3, the BN neck's raw output whitened
        "evaluation.whitening.enabled=true",
        "evaluation.whitening.dim=4",
        "evaluation.whitening.raw=true",
    ],
    "projection head, whitening, a post-processing grid": [
        "+model.head={_target_: isc.models.heads.ProjectionHead, _partial_: true, out_dim: 16}",
        "evaluation.whitening.enabled=true",
        "evaluation.whitening.dim=4",
        "evaluation.grid=[raw,score_normalization,whitening]",
    ],
}


@pytest.mark.parametrize("variant", list(HEADS))
def test_checkpoint_and_export_reproduce_the_callback_uap(
    benchmark: Path, tmp_path: Path, variant: str
) -> None:
    train_dir = tmp_path / "train"
    trained = tasks.train(compose_cfg([*common(benchmark), *HEADS[variant]], train_dir))
    ckpt = next((train_dir / "checkpoints").glob("epoch*.ckpt"))

    # What the checkpoint says it holds: the learned GeM p and the head, at the evaluated size.
    spec = torch.load(ckpt, map_location="cpu", weights_only=True)["descriptor_model"]["spec"]
    assert spec["image_size"] == 96
    assert (spec["head"] is None) == (variant.startswith("no head"))

    eval_overrides = [*common(benchmark), *HEADS[variant], "task=evaluate", f"ckpt_path={ckpt}"]
    evaluated = tasks.evaluate(compose_cfg(eval_overrides, tmp_path / "eval"))
    for key in ("uAP", "uAP_raw", "recall_at_p90", "recall_at_rank1"):
        assert evaluated[key] == pytest.approx(trained[f"val/{key}"], abs=1e-6), key
    if "grid" in variant:  # the callback's grid cells are task=evaluate's, setting by setting
        grid = json.loads((tmp_path / "eval" / "metrics.json").read_text())["grid"]
        for name in ("score_normalization", "whitening"):
            for key in ("uAP", "recall_at_p90"):
                cell = grid[name]["stages"]["global"][key] or 0.0
                assert trained[f"val/grid/{name}/{key}"] == pytest.approx(cell, abs=1e-6), (name, key)
        assert grid["raw"]["stages"]["global"]["uAP"] == pytest.approx(trained["val/uAP_raw"], abs=1e-6)

    exported = tasks.export(
        compose_cfg([*eval_overrides[:-2], "task=export", f"ckpt_path={ckpt}"], tmp_path / "x")
    )
    from_export = tasks.evaluate(
        compose_cfg([*eval_overrides[:-1], f"ckpt_path={exported['path']}"], tmp_path / "eval2")
    )
    assert from_export["uAP"] == pytest.approx(trained["val/uAP"], abs=1e-6)
    assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["uAP"] == from_export["uAP"]


def test_export_loads_without_lightning_or_hydra(tmp_path: Path) -> None:
    """The exported file is read by ``isc`` alone and gives the exporting model's descriptors exactly."""
    from isc.models.descriptor import DescriptorModel, save_descriptor_model
    from isc.models.heads import BNNeckHead
    from isc.models.pooling import GeM
    from isc.models.trunks import efficientnet_lite0

    torch.manual_seed(0)
    model = DescriptorModel(
        efficientnet_lite0(), GeM(p=2.2, trainable=True), head=BNNeckHead(1280, [32], 16), image_size=40
    ).eval()
    images = torch.rand(2, 3, 40, 40)
    expected = model(images).detach()
    path = save_descriptor_model(model, tmp_path / "model.pt")
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch\n"
        "from isc.models.descriptor import load_descriptor_model\n"
        f"model = load_descriptor_model({str(path)!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra'))\n"
        "assert not bad, bad\n"
        f"out = model(torch.load({str(tmp_path / 'images.pt')!r}))\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
        "print(model.image_size, model.dim, float(model.pooling.p))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["40", "16", str(float(torch.tensor(2.2)))]  # learned p kept
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-6, rtol=0)


def _small_descriptor_model(trunk: str):
    """A seeded descriptor model with a learned GeM and a BN-neck head (16-d), 40 px inputs."""
    from isc.models import trunks
    from isc.models.descriptor import DescriptorModel
    from isc.models.heads import BNNeckHead
    from isc.models.pooling import GeM

    torch.manual_seed(0)
    body = getattr(trunks, trunk)()
    return DescriptorModel(
        body, GeM(p=2.2, trainable=True), head=BNNeckHead(body.out_channels, [32], 16), image_size=40
    ).eval()


def _isolated(script: str, cwd: Path) -> list[str]:
    """Run ``script`` in ``python -I`` (no user site, no project on the path); its printed words."""
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


@pytest.mark.parametrize(("trunk", "compiled"), [("resnet50", "script"), ("efficientnet_lite0", "trace")])
def test_torchscript_export_runs_in_plain_torch_and_matches(
    trunk: str, compiled: str, tmp_path: Path
) -> None:
    """task=export's TorchScript file: ``torch.jit.load`` in an interpreter where this project cannot be
    imported gives the PyTorch model's descriptors (to 1e-5), at any input size when scripted (the
    EfficientNet package's code does not script: it is traced at the model's size)."""
    from isc.models.torchscript import SPEC_FILE, save_torchscript

    model = _small_descriptor_model(trunk)
    path, how = save_torchscript(model, tmp_path / "model.torchscript.pt", 40)
    assert how == compiled
    sizes = [40, 56] if how == "script" else [40]
    images = {s: torch.rand(2, 3, s, s) for s in sizes}
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import json, sys\n"
        "for name in ('isc', 'tasks', 'lightning', 'hydra', 'timm', 'efficientnet_lite_pytorch'):\n"
        "    sys.modules[name] = None  # importing any of them now fails\n"
        "import torch\n"
        f"extra = {{{SPEC_FILE!r}: ''}}\n"
        f"model = torch.jit.load({str(path)!r}, _extra_files=extra)\n"
        f"images = torch.load({str(tmp_path / 'images.pt')!r})\n"
        f"torch.save({{s: model(x) for s, x in images.items()}}, {str(tmp_path / 'out.pt')!r})\n"
        f"print(json.loads(extra[{SPEC_FILE!r}])['descriptor_dim'])\n"
    )
    assert _isolated(script, tmp_path) == ["16"]
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        for s, x in images.items():
            torch.testing.assert_close(out[s], model(x), atol=1e-5, rtol=0)


def test_a_file_that_is_not_a_model_is_a_clear_error(tmp_path: Path) -> None:
    from isc.models.descriptor import load_descriptor_model

    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="backbone.trunk.weights"):
        load_descriptor_model(tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError):
        load_descriptor_model(tmp_path / "missing.pt")


def test_evaluation_settings_defaults_equal_the_config_group() -> None:
    """One set of defaults: the dataclass and conf/evaluation/default.yaml cannot drift apart."""
    from omegaconf import OmegaConf

    from isc.evaluation.settings import EvaluationSettings

    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "evaluation" / "default.yaml"))
    assert EvaluationSettings.from_dict(yaml) == EvaluationSettings()
    with pytest.raises(ValueError, match="whitening"):
        EvaluationSettings.from_dict({"whitening": {"enable": True}})  # a typo is an error, not ignored
    with pytest.raises(ValueError, match="exceeds the 5 training images"):
        EvaluationSettings.from_dict({"whitening": {"enabled": True, "dim": 8}}).for_training_set(5)


def test_callback_and_evaluate_share_the_settings_of_the_composed_config(tmp_path: Path) -> None:
    """The retrieval callback is built from ``evaluation:`` itself, post-processing included."""
    from hydra.utils import instantiate

    cfg = compose_cfg(
        [
            "dataset.root=/nowhere",
            "evaluation.whitening.enabled=true",
            "evaluation.score_normalization.beta=2",
        ],
        tmp_path,
    )
    callback = instantiate(cfg.callbacks.retrieval)
    assert callback.settings == tasks.common.evaluation_settings(cfg)
    assert callback.settings.whitening.enabled and callback.settings.score_normalization.beta == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=pretrain"], "task=pretrain but model=lightning_modules.copy_finetune.CopyFinetune"),
        (["task=evaluate", "dataset=disc21"], "dataset=disc21 needs its folder"),
        (["experiment=finetune_d2lv_r50"], "set backbone.trunk.weights="),
        (["experiment=finetune_d2lv_r50", "backbone.trunk.weights=null"], "set data.generated="),
        (["+loss=d2lv"], "the loss belongs to the model: use model/loss="),
    ],
)
def test_misconfigured_runs_stop_before_any_work_with_the_setting_to_change(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(Exception, match=message):
        run.run_task(compose_cfg([*overrides, "dataset.name=never-built"], tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("trunk", ["resnet50", "efficientnet_lite0"])
def test_onnx_export_runs_without_torch_and_matches(trunk: str, tmp_path: Path) -> None:
    """task=export's ONNX file: onnxruntime in an interpreter where neither torch nor this project can be
    imported gives the PyTorch model's descriptors (to 1e-5), for another batch size and input size."""
    from isc.models.onnx_export import METADATA_KEY, save_onnx

    model = _small_descriptor_model(trunk)
    path, how = save_onnx(model, tmp_path / "model.onnx", 40)
    assert path is not None and how == "checked against PyTorch with onnxruntime"
    images = torch.rand(5, 3, 64, 48)
    np.save(tmp_path / "images.npy", images.numpy())
    script = (
        "import json, sys\n"
        "for name in ('torch', 'isc', 'tasks'):\n"
        "    sys.modules[name] = None  # importing any of them now fails\n"
        "import numpy as np, onnx, onnxruntime\n"
        f"session = onnxruntime.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
        f"out = session.run(None, {{'images': np.load({str(tmp_path / 'images.npy')!r})}})[0]\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
        f"props = {{p.key: p.value for p in onnx.load({str(path)!r}).metadata_props}}\n"
        f"print(json.loads(props[{METADATA_KEY!r}])['descriptor_dim'])\n"
    )
    assert _isolated(script, tmp_path) == ["16"]
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5, rtol=0)


def test_an_onnx_export_that_fails_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from isc.models import trunks
    from isc.models.descriptor import DescriptorModel
    from isc.models.onnx_export import save_onnx
    from isc.models.pooling import GeM

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    model = DescriptorModel(trunks.resnet50(), GeM(p=3.0), image_size=32).eval()
    path, why = save_onnx(model, tmp_path / "model.onnx", 32)
    assert path is None and "cannot handle this model" in why and "operator foo" in why
    assert list(tmp_path.iterdir()) == []
