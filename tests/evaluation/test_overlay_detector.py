"""The learned overlay detector: recall / false-fire figures, the checkpoint, and the test stage's setting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from PIL import Image

from isc.augment import Compose, PasteOnBackground, Resize
from isc.data.generate import generate_copies_dataset
from isc.evaluation.overlay_detector import (
    OverlayDetector,
    PasteSample,
    build_detector,
    load_overlay_detector,
    paste_samples,
    save_overlay_detector,
    split_samples,
)
from isc.evaluation.overlay_recall import detection_rates, paste_found
from isc.evaluation.overlays import OverlaySettings, detect_overlays
from isc.evaluation.views import QueryViews, query_views

KEY = "evaluation.local_verification.query.overlays"


def test_paste_found_is_iou_strictly_above_the_threshold() -> None:
    truth = (0, 0, 10, 10)
    assert paste_found(np.array([[0, 0, 10, 8]]), truth)  # IoU 80 / 100 = 0.8
    assert not paste_found(np.array([[0, 0, 10, 7]]), truth)  # IoU 0.7: not above 0.7
    assert not paste_found(np.array([[5, 0, 15, 10]]), truth)  # IoU 50 / 150
    assert paste_found(np.array([[5, 0, 15, 10], [1, 1, 10, 10]]), truth)  # any box: 81 / 100
    assert not paste_found(np.zeros((0, 4)), truth)


def test_detection_rates_on_a_hand_worked_case(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(paths[-1])
    answers = {0: [[0, 0, 10, 8]], 1: [[5, 0, 15, 10]], 2: [], 3: [[1, 1, 4, 4]]}  # by the red level

    def detect(image: Image.Image) -> np.ndarray:
        return np.array(answers[image.getpixel((0, 0))[0] // 40], dtype=np.int64).reshape(-1, 4)

    samples = [
        PasteSample(paths[0], "0", (0, 0, 10, 10)),  # found (IoU 0.8)
        PasteSample(paths[1], "1", (0, 0, 10, 10)),  # missed (IoU 1/3)
        PasteSample(paths[2], "2", None),  # plain, silent
        PasteSample(paths[3], "3", None),  # plain, a false fire
    ]
    rates = detection_rates(detect, samples, iou=0.7)
    assert (rates.found, rates.n_pasted, rates.fired, rates.n_plain) == (1, 2, 1, 2)
    assert rates.recall == 0.5 and rates.false_fire_rate == 0.5


class _FixedBox(torch.nn.Module):
    """A stand-in detector: a box at (10, 10, 50, 40) and the whole frame of whatever (downscaled) image it gets."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.seen = images[0].shape
        boxes = torch.tensor([[10.0, 10.0, 50.0, 40.0], [0.0, 0.0, 64.0, 48.0]])
        return [
            {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.ones(2, dtype=torch.int64)}
        ]


def test_boxes_come_back_in_the_images_own_pixels() -> None:
    stub = _FixedBox()
    detector = OverlayDetector(stub, "fasterrcnn_mobilenet_v3_large_fpn", image_size=64)
    boxes = detector(Image.new("RGB", (256, 192)), score_threshold=0.5)
    assert tuple(stub.seen) == (3, 48, 64)  # run on a copy at most image_size long
    # x4 back to the 256 x 192 image; the whole-frame box is dropped as the classical detector does
    assert boxes.tolist() == [[40, 40, 200, 160]] and boxes.dtype == np.int64


def _tiny_copies(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(src / f"p{i}.png")
    blue = Image.new("RGB", (96, 96), (20, 20, 230))
    recipe = Compose([PasteOnBackground(scale=(0.2, 0.5), source=[blue]), Resize(64)])
    out = tmp_path / "copies"
    generate_copies_dataset(
        sorted(src.iterdir()), out, recipe, copies=2, every=1, size=64, workers=0, progress=False
    )
    return out


def test_samples_and_group_split(tmp_path: Path) -> None:
    samples = paste_samples(_tiny_copies(tmp_path))
    assert len(samples) == 12 and sum(s.box is not None for s in samples) == 8  # 4 originals are plain
    train, held = split_samples(samples, 0.5)
    assert len(held) == 6 and not {s.image_id[:2] for s in train} & {s.image_id[:2] for s in held}


@pytest.mark.slow
def test_train_detector_task_end_to_end_and_its_checkpoint_in_the_test_stage(tmp_path: Path) -> None:
    from run import run_task

    torch.set_num_threads(1)
    copies = _tiny_copies(tmp_path)
    out = tmp_path / "run"
    cfg = compose_cfg(
        "task=train_detector", f"detector.data={copies}", "detector.steps=2", "detector.batch_size=2",
        "detector.image_size=64", "detector.holdout=0.5", f"detector.eval_data={copies}", out,
    )  # fmt: skip
    run_task(cfg)
    checkpoint = out / "overlay_detector.pt"
    assert checkpoint.is_file() and (out / "metrics.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["measured_on"] == str(copies) and metrics["held_out_images"] == 12  # all of eval_data
    loaded = load_overlay_detector(checkpoint)
    assert loaded.image_size == 64 and loaded.extra["steps"] == 2
    settings = OverlaySettings(detector="learned", checkpoint=str(checkpoint), score_threshold=0.0)
    image = Image.new("RGB", (300, 200), (120, 60, 30))
    image.paste((20, 200, 20), (100, 50, 220, 150))
    boxes = detect_overlays(image, settings)
    assert boxes.dtype == np.int64 and boxes.shape[1] == 4 and len(boxes) <= settings.max_overlays
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 200).all()
    views = query_views(image, QueryViews(rotations=False, crops=False, min_size=0, overlays=settings,
                                          proposals=QueryViews().proposals.__class__(enabled=False)))  # fmt: skip
    assert [v.kind for v in views][0] == "original" and all(v.kind == "overlay" for v in views[1:])


def test_learned_setting_checks_its_checkpoint_before_any_work(tmp_path: Path) -> None:
    assert OverlaySettings().detector == "classical"  # the default needs no checkpoint
    with pytest.raises(ValueError, match=rf"{KEY}.detector=learned needs {KEY}.checkpoint"):
        OverlaySettings(detector="learned")
    with pytest.raises(ValueError, match=rf"{KEY}.checkpoint: .*missing.pt does not exist"):
        OverlaySettings(detector="learned", checkpoint=str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"{KEY}.checkpoint: .*junk.pt is not"):
        OverlaySettings(detector="learned", checkpoint=str(junk))
    with pytest.raises(ValueError, match=rf"{KEY}.detector must be one of classical, learned"):
        OverlaySettings(detector="yolo")


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = build_detector("fasterrcnn_mobilenet_v3_large_fpn", 64)
    path = save_overlay_detector(
        tmp_path / "d.pt", model, architecture="fasterrcnn_mobilenet_v3_large_fpn", image_size=64
    )
    loaded = load_overlay_detector(path)
    a, b = model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="architecture must be one of"):
        build_detector("yolov5", 64)


def test_the_lite0_detector_starts_from_the_packaged_imagenet_weights(tmp_path: Path) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    from isc.models.trunks import efficientnet_lite0

    torch.set_num_threads(1)
    arch = "fasterrcnn_efficientnet_lite0_fpn"
    imagenet = efficientnet_lite0(pretrained=True).body.net.state_dict()
    model = build_detector(arch, 64, pretrained=True)
    backbone = model.backbone  # type: ignore[attr-defined]
    ours = backbone.blocks.state_dict()
    assert all(torch.equal(v, imagenet[f"_blocks.{k}"]) for k, v in ours.items() if "running" not in k)
    assert torch.equal(backbone.stem[0].weight, imagenet["_conv_stem.weight"])
    # frozen as torchvision freezes its pretrained backbones: BN statistics, the stem and stages 1-2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert isinstance(backbone.stem[1], FrozenBatchNorm2d)
    assert torch.equal(backbone.stem[1].running_var, imagenet["_bn0.running_var"])
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.blocks[:3].parameters())
    assert all(p.requires_grad for p in backbone.blocks[3:].parameters())
    scratch = build_detector(arch, 64)
    assert not torch.equal(scratch.backbone.stem[0].weight, backbone.stem[0].weight)  # type: ignore[attr-defined]
    # a checkpoint rebuilds without weights, then loads its own
    loaded = load_overlay_detector(
        save_overlay_detector(tmp_path / "d.pt", model, architecture=arch, image_size=64)
    )
    a, b = model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    boxes = loaded(Image.new("RGB", (96, 80), (50, 90, 200)), score_threshold=0.0)
    assert boxes.dtype == np.int64 and boxes.shape[1] == 4
