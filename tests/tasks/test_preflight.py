"""The pre-pass: bad files, names, sizes and dims stop a task before any extraction."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg, make_copy_benchmark, random_image

import tasks
import tasks.evaluation
import tasks.generation
from isc.data.images import ImageLoadError, find_images, list_images, screen_quick
from isc.evaluation import runner
from isc.evaluation.extract import Listing
from isc.evaluation.runner import resolve_settings
from isc.evaluation.settings import EvaluationSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    (tmp_path / "bench").mkdir()
    return make_copy_benchmark(tmp_path / "bench")


@pytest.fixture
def no_extraction(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Fails the test if any descriptor is extracted: errors must come first."""
    calls: list[int] = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("extraction started before the pre-pass error")

    monkeypatch.setattr(Listing, "extract", refuse)
    monkeypatch.setattr(Listing, "extract_share", refuse)
    monkeypatch.setattr(runner, "run_test_stage", refuse)
    return calls


def _jpeg(path: Path, trailer: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    random_image(np.random.default_rng(1), 64).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue() + trailer
    path.write_bytes(data)
    return data


# ------------------------------------------------------------------------------------------- screen_quick


def test_the_prepass_finds_each_kind_of_bad_file_and_names_it(tmp_path: Path) -> None:
    good = _jpeg(tmp_path / "good.jpg")
    _jpeg(tmp_path / "trailer.jpg", trailer=b"\0" * 100 + b"camera maker notes")  # valid: decodes
    (tmp_path / "half.jpg").write_bytes(good[: len(good) // 2])
    png = io.BytesIO()
    random_image(np.random.default_rng(2), 64).save(png, format="PNG")
    (tmp_path / "half.png").write_bytes(png.getvalue()[:-30])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    files = sorted(tmp_path.iterdir())
    kept, bad = screen_quick(files, "test files", skip_bad=True, num_workers=2)
    assert [p.name for p in kept] == ["good.jpg", "trailer.jpg"]
    reasons = {p.name: r for p, r in bad}
    assert set(reasons) == {"half.jpg", "half.png", "empty.png", "text.jpg"}
    assert "truncated" in reasons["half.jpg"].lower() and "truncated" in reasons["half.png"].lower()
    assert "empty file" in reasons["empty.png"] and "not an image" in reasons["text.jpg"]
    with pytest.raises(
        ImageLoadError, match=r"4 of 6 images in test files cannot be read.*skip_bad_images=true"
    ):
        screen_quick(files, "test files")


@pytest.mark.parametrize("name", ["Q\u00e9001.jpg", "Q 001.jpg", "Q,001.jpg", "Q'001.jpg"])
def test_names_that_cannot_be_ids_are_an_error_naming_the_file(tmp_path: Path, name: str) -> None:
    _jpeg(tmp_path / name)
    _jpeg(tmp_path / "Q000002.jpg")
    with pytest.raises(ValueError, match=f"1 file name.*cannot be image ids: {name!r}"):
        screen_quick(sorted(tmp_path.iterdir()), "queries/", skip_bad=True)  # a name is never skipped


def test_broken_symlinks_are_warned_about_not_dropped_silently(tmp_path: Path, caplog) -> None:
    _jpeg(tmp_path / "R000001.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "R000002.jpg")
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "gone.jpg", tmp_path / "sub" / "x.jpg")
    with caplog.at_level(logging.WARNING):
        assert [p.name for p in list_images(tmp_path)] == ["R000001.jpg"]
        assert [p.name for p in find_images(tmp_path)] == ["R000001.jpg"]
    warnings = [r.getMessage() for r in caplog.records if "broken symbolic link" in r.getMessage()]
    assert len(warnings) == 2 and "R000002.jpg" in warnings[0] and "x.jpg" in warnings[1]


# ------------------------------------------------------------------------------------------- task=evaluate


def test_a_bad_training_image_stops_evaluate_before_any_extraction(
    bench: Path, tmp_path: Path, no_extraction: list[int]
) -> None:
    (bench / "training" / "T000003.png").write_bytes(b"not an image")
    cfg = compose_cfg([f"dataset.root={bench}"], tmp_path / "run")
    with pytest.raises(ImageLoadError, match=r"T000003\.png: not an image.*training/ of"):
        tasks.evaluate(cfg)
    assert not no_extraction


def test_the_test_stage_runs_the_same_pre_pass(bench: Path, tmp_path: Path, no_extraction: list[int]) -> None:
    (bench / "references" / "R000003.png").write_bytes(b"")
    cfg = compose_cfg([f"dataset.root={bench}", "evaluation.scales=[32]"], tmp_path / "run")
    with pytest.raises(ImageLoadError, match=r"R000003\.png: empty file"):
        tasks.evaluate(cfg)
    assert not no_extraction


def test_a_non_ascii_file_name_stops_evaluate_naming_the_file(
    bench: Path, tmp_path: Path, no_extraction: list[int]
) -> None:
    """It used to fail after extraction and matching with "query_ids must be ASCII", naming no file."""
    shutil.copy(bench / "queries" / "Q00011.png", bench / "queries" / "Q\u00e90099.png")
    cfg = compose_cfg([f"dataset.root={bench}"], tmp_path / "run")
    with pytest.raises(ValueError, match="'Q\u00e90099.png'.*must be ASCII"):
        tasks.evaluate(cfg)


def test_empty_queries_without_ground_truth_stop_before_the_other_splits(
    bench: Path, tmp_path: Path, no_extraction: list[int]
) -> None:
    for p in (bench / "queries").iterdir():
        p.unlink()
    (bench / "ground_truth.csv").unlink()
    cfg = compose_cfg([f"dataset.root={bench}"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"queries holds no images"):
        tasks.predict(cfg)


def test_skip_bad_images_lists_what_it_skipped_in_the_run_dir(bench: Path, tmp_path: Path) -> None:
    data = (bench / "training" / "T000002.png").read_bytes()
    (bench / "training" / "T000002.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    (bench / "references" / "R000013.png").write_text("junk")  # no query matches R000013
    out = tmp_path / "run"
    metrics = tasks.evaluate(compose_cfg([f"dataset.root={bench}", "dataset.skip_bad_images=true"], out))
    assert metrics["skipped_images"] == {"references": 1, "queries": 0, "training": 1}
    with open(out / "skipped_images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["split"], Path(r["path"]).name) for r in rows} == {
        ("references", "R000013.png"),
        ("training", "T000002.png"),
    }
    assert json.loads((out / "metrics.json").read_text())["skipped_images"]["training"] == 1


def test_whitening_and_track_dims_are_checked_against_the_model() -> None:
    whitened = EvaluationSettings.from_dict({"whitening": {"enabled": True, "dim": 512}})
    with pytest.raises(ValueError, match="evaluation.whitening.dim=512 exceeds the descriptor's 320 dims"):
        resolve_settings(whitened, 1000, [320])
    assert resolve_settings(whitened, 1000, [512]) == whitened
    track = EvaluationSettings.from_dict({"descriptor_track_max_dim": 256})
    with pytest.raises(ValueError, match="1280 dims but evaluation.descriptor_track_max_dim=256"):
        resolve_settings(track, 1000, [1280])


def test_whitening_dim_above_the_model_stops_evaluate_before_extraction(
    bench: Path, tmp_path: Path, no_extraction: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(6, 40):  # enough training images that only the model's dimension is wrong
        random_image(np.random.default_rng(100 + i)).save(bench / "training" / f"T{i:06d}.png")
    cfg = compose_cfg(
        [f"dataset.root={bench}", "evaluation.whitening.enabled=true", "evaluation.whitening.dim=32"],
        tmp_path / "run",
    )
    monkeypatch.setattr(tasks.evaluation, "descriptor_model", lambda cfg: _Tiny())
    with pytest.raises(ValueError, match="evaluation.whitening.dim=32 exceeds the descriptor's 16 dims"):
        tasks.evaluate(cfg)


class _Tiny:
    dim, image_size = 16, 32


# ------------------------------------------------------------------------------------------- build_benchmark


def test_benchmark_sizes_are_checked_before_the_pool_is_listed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(
        tasks.generation, "find_images", lambda root: pytest.fail("listed the pool before checking sizes")
    )
    cfg = compose_cfg(
        [
            "task=build_benchmark",
            f"benchmark.pool={tmp_path}",
            "benchmark.n_references=10",
            "benchmark.n_queries=40",
        ],
        tmp_path / "run",
    )
    with pytest.raises(ValueError, match=r"20 matched queries.*benchmark.n_references=10"):
        tasks.build_benchmark_task(cfg)


def test_a_small_pool_names_the_sizes_to_change(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(5):
        random_image(np.random.default_rng(i)).save(pool / f"p{i}.png")
    cfg = compose_cfg([f"benchmark.pool={pool}"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"pool has 5 images but benchmark.n_references=1000.*need 2500"):
        tasks.build_benchmark_task(cfg)
    assert not Path(cfg.benchmark.out_dir).exists()
