"""``task=train_detector``: train the learned overlay detector on generated paste boxes, then measure it
beside the classical detector on held-out classes (recall at IoU > ``detector.iou``, false fires on plain
images)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from isc.evaluation.overlay_detector import (
    ARCHITECTURES,
    OverlayDetector,
    paste_samples,
    save_overlay_detector,
    split_samples,
    train_overlay_detector,
)
from isc.evaluation.overlay_recall import compare_overlay_detectors
from isc.evaluation.overlays import OverlaySettings, overlay_boxes
from tasks.common import write_json

log = logging.getLogger(__name__)


def _check(d: DictConfig) -> None:
    """Bad settings stop here, before any image is read."""
    if d.architecture not in ARCHITECTURES:
        raise ValueError(
            f"detector.architecture must be one of {', '.join(ARCHITECTURES)}, got {d.architecture!r}"
        )
    if not 0.0 <= float(d.holdout) < 1.0:
        raise ValueError(f"detector.holdout must be in [0, 1), got {d.holdout}")
    for key in ("steps", "batch_size", "image_size"):
        if int(d[key]) < 1:
            raise ValueError(f"detector.{key} must be >= 1, got {d[key]}")
    if not 0.0 < float(d.iou) < 1.0:
        raise ValueError(f"detector.iou must be in (0, 1), got {d.iou}")
    if not Path(d.data).is_dir():
        raise ValueError(f"detector.data: {d.data} is not a folder (a task=generate output with boxes.csv)")
    if d.eval_data is not None and not Path(d.eval_data).is_dir():
        raise ValueError(f"detector.eval_data: {d.eval_data} is not a folder of images with paste boxes")


def train_detector(cfg: DictConfig) -> dict[str, object]:
    """Train, save the checkpoint atomically, measure both detectors on the held-out classes."""
    d = cfg.detector
    _check(d)
    samples = paste_samples(d.data, d.boxes)
    train, held_out = split_samples(samples, float(d.holdout), seed=int(cfg.seed))
    if d.eval_data is not None:  # read before training, so a bad CSV stops the run before any step
        held_out = paste_samples(d.eval_data, d.eval_boxes)
    measured_on = str(d.eval_data) if d.eval_data is not None else "held-out classes"
    n_pasted = sum(s.box is not None for s in train)
    log.info(
        "%d training images (%d pasted), %d to measure on (%s)",
        len(train),
        n_pasted,
        len(held_out),
        measured_on,
    )
    model, trained = train_overlay_detector(
        train,
        architecture=d.architecture,
        image_size=int(d.image_size),
        steps=int(d.steps),
        batch_size=int(d.batch_size),
        lr=float(d.lr),
        weight_decay=float(d.weight_decay),
        seed=int(cfg.seed),
    )
    facts = {
        "steps": trained.steps,
        "images_seen": trained.images,
        "train_seconds": round(trained.seconds, 1),
        "final_loss": trained.final_loss,
        "train_images": len(train),
        "train_pasted": n_pasted,
        "data": str(d.data),
    }
    checkpoint = save_overlay_detector(
        d.checkpoint, model, architecture=d.architecture, image_size=int(d.image_size), extra=facts
    )
    learned = OverlayDetector(model, d.architecture, int(d.image_size), facts)
    metrics: dict[str, object] = {
        **facts, "checkpoint": str(checkpoint), "held_out_images": len(held_out), "measured_on": measured_on,
    }  # fmt: skip
    if held_out:
        classical = OverlaySettings()
        rates = compare_overlay_detectors(
            {
                "classical": lambda image: overlay_boxes(image, classical),
                "learned": lambda image: learned(image, float(d.score_threshold), classical.max_overlays),
            },
            held_out,
            iou=float(d.iou),
        )
        for name, r in rates.items():
            metrics.update({f"{name}/{k}": v for k, v in r.summary().items()})
    out = Path(cfg.paths.output_dir)
    write_json(out / "metrics.json", metrics)
    print(
        f"overlay detector trained {trained.steps} steps ({trained.images} images) in {trained.seconds:.0f} s"
    )
    if held_out:
        r0, r1 = rates["classical"], rates["learned"]
        print(
            f"{measured_on}: pastes found at IoU > {float(d.iou):g}: learned {r1.recall:.1%} vs classical {r0.recall:.1%} "
            f"({r0.n_pasted} pastes); false fires on plain images: learned {r1.false_fire_rate:.1%} vs "
            f"classical {r0.false_fire_rate:.1%} ({r0.n_plain} images)"
        )
    else:
        print("nothing to measure on (detector.holdout=0 and no detector.eval_data)")
    print(
        f"checkpoint: {checkpoint}\n  use it with evaluation.local_verification.query.overlays.detector=learned "
        f"evaluation.local_verification.query.overlays.checkpoint={checkpoint}"
    )
    print(f"outputs in {out}")
    return metrics
