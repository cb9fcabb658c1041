"""``dataset.skip_bad_images`` in fine-tuning, the retrieval callback and pretraining.

Without it, one unreadable image stops the run before training starts (it used to stop it mid-epoch);
with it, the run trains and ``skipped_images.csv`` in the run dir lists what was left out.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from conftest import compose_cfg, evaluate_checkpoint, make_copy_benchmark
from test_finetune import tiny
from test_pretrain import SMALL_HEADS, compose_experiment, write_images

import tasks
from datamodules.copies import CopiesDataModule
from isc.data.images import ImageLoadError


def _skipped(run_dir: Path) -> set[tuple[str, str]]:
    with open(run_dir / "skipped_images.csv", newline="") as f:
        return {(row["split"], Path(row["path"]).name) for row in csv.DictReader(f)}


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    (tmp_path / "bench").mkdir()
    root = make_copy_benchmark(tmp_path / "bench")
    (root / "training" / "T000004.png").write_bytes(b"")  # a source of fine-tuning classes
    data = (root / "references" / "R000013.png").read_bytes()  # evaluated by the callback
    (root / "references" / "R000013.png").write_bytes(data[: len(data) // 2])
    return root


def test_fine_tuning_stops_before_training_at_a_bad_image(bench: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(tiny(bench), tmp_path / "run")
    with pytest.raises(ImageLoadError, match=r"T000004\.png: empty file.*dataset.skip_bad_images=true"):
        tasks.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fine_tuning_and_callback_skip_and_list_bad_images(bench: Path, tmp_path: Path) -> None:
    overrides = [
        *tiny(bench),
        "dataset.skip_bad_images=true",
        "trainer.fast_dev_run=false",  # a real (one-step) epoch, so last.ckpt is written
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
    ]
    metrics = tasks.train(compose_cfg(overrides, tmp_path / "run"))
    evaluated = evaluate_checkpoint(
        overrides, tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "eval"
    )
    assert metrics["val/uAP"] == pytest.approx(evaluated["uAP"], abs=1e-6)  # both skip the same images
    assert _skipped(tmp_path / "run") == {
        ("train", "T000004.png"),  # a fine-tuning source
        ("val/references", "R000013.png"),  # the callback's benchmark, which also fits on training/
        ("val/training", "T000004.png"),
    }


def test_generated_sets_skip_bad_members(tmp_path: Path) -> None:
    source = tmp_path / "bench"
    source.mkdir()
    make_copy_benchmark(source)
    generated = tmp_path / "generated"
    for c in range(3):  # three classes of three members, from the benchmark's references
        (generated / f"C{c}").mkdir(parents=True)
        for m in range(3):
            shutil.copy(source / "references" / f"R{3 * c + m:06d}.png", generated / f"C{c}" / f"{m:02d}.png")
    (generated / "C1" / "01.png").write_text("junk")
    (generated / "C2" / "00.png").write_text("junk")
    (generated / "C2" / "02.png").write_bytes(b"")  # C2 keeps one member: no positive pair, dropped
    with pytest.raises(ImageLoadError, match=r"3 of 9 images in data.generated="):
        CopiesDataModule(generated=str(generated), image_size=32).setup()
    dm = CopiesDataModule(generated=str(generated), image_size=32, skip_bad=True)
    dm.setup()
    assert dm.num_classes == 2 and len(dm.dataset) == 5
    assert sorted(p.parent.name + "/" + p.name for p, _ in dm.skipped) == [
        "C1/01.png",
        "C2/00.png",
        "C2/02.png",
    ]


def test_pretraining_skips_and_lists_bad_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_images(images, 9)
    bad = images / "class1" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:40])
    overrides = ("trainer.fast_dev_run=true", *SMALL_HEADS["pretrain_barlow_r50"])
    cfg = compose_experiment("pretrain_barlow_r50", tmp_path / "a", images, *overrides)
    with pytest.raises(ImageLoadError, match=rf"{bad.name}.*skip_bad_images=true"):
        tasks.train(cfg)
    cfg = compose_experiment(
        "pretrain_barlow_r50", tmp_path / "b", images, *overrides, "dataset.skip_bad_images=true"
    )
    tasks.train(cfg)
    assert _skipped(tmp_path / "b") == {("train", "0003.png")}
