"""Generated training sets: deterministic, shardable, resumable, tolerant of unreadable sources."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isc.augment import Compose, GaussianBlur, RandomResizedCrop, Resize, Rotate, synthetic_image
from isc.data.generate import generate_copies_dataset, parse_shard, select_classes

COPIES, SIZE = 3, 64


def recipe() -> Compose:
    return Compose(
        [RandomResizedCrop(SIZE, scale=(0.3, 1.0)), Rotate(30), GaussianBlur((0.1, 1.0)), Resize(SIZE)]
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sources")
    paths = []
    for i in range(8):
        path = root / f"T{i:06d}.jpg"
        synthetic_image(np.random.default_rng(i), (120, 90)).save(path)
        paths.append(path)
    return paths


def digest(folder: Path) -> dict[str, str]:
    """Content hash of every generated image, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.jpg"))
    }


def run(sources, out, **kwargs):
    return generate_copies_dataset(
        sources, out, recipe(), copies=COPIES, every=2, size=SIZE, seed=7, workers=0, progress=False, **kwargs
    )


def test_layout_manifest_and_contact_sheet(sources, tmp_path) -> None:
    summary = run(sources, tmp_path, recipe="test")
    classes = [c for c, _ in select_classes(sources, 2)]
    assert classes == ["T000000", "T000002", "T000004", "T000006"]
    assert summary.written == len(classes) * (COPIES + 1) and not summary.failed
    for c in classes:
        files = sorted(p.name for p in (tmp_path / c).iterdir())
        assert files == [f"{i:02d}.jpg" for i in range(COPIES + 1)] + ["boxes.csv"]  # written last
        with Image.open(tmp_path / c / "02.jpg") as img:
            assert img.size == (SIZE, SIZE) and img.mode == "RGB"
    with open(tmp_path / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(classes) * (COPIES + 1)
    assert set(rows[0]) == {"class_id", "file", "source", "recipe", "copy_index", "seed"}
    assert rows[1]["recipe"] == "test" and rows[1]["seed"] == "7" and rows[1]["copy_index"] == "1"
    with Image.open(summary.contact_sheet) as sheet:
        assert sheet.format == "PNG"
        thumbs = np.asarray(sheet.convert("L"))
    # 4 classes x (original + 3 copies): every thumbnail cell holds image content, not the white page
    cell_w, cell_h = (sheet.width - 4) // (COPIES + 1), (sheet.height - 4) // 4
    for row in range(4):
        for col in range(COPIES + 1):
            y, x = 4 + row * cell_h + cell_h // 2, 4 + col * cell_w + cell_w // 2
            assert thumbs[y - 10 : y + 10, x - 10 : x + 10].std() > 0 or thumbs[y, x] < 250


def test_copies_differ_from_each_other_and_from_the_original(sources, tmp_path) -> None:
    run(sources, tmp_path)
    hashes = digest(tmp_path / "T000000")
    assert len(set(hashes.values())) == COPIES + 1


def test_same_seed_same_bytes_other_seed_differs(sources, tmp_path) -> None:
    run(sources, tmp_path / "a")
    run(sources, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    generate_copies_dataset(sources, tmp_path / "c", recipe(), copies=COPIES, every=2, size=SIZE, seed=8,
                            workers=0, progress=False)  # fmt: skip
    a, c = digest(tmp_path / "a"), digest(tmp_path / "c")
    assert all(a[k] != c[k] for k in a if not k.endswith("00.jpg"))  # originals do not depend on the seed


def test_shards_together_equal_one_run(sources, tmp_path) -> None:
    run(sources, tmp_path / "whole")
    run(sources, tmp_path / "sharded", shard="0/3")
    run(sources, tmp_path / "sharded", shard="1/3")
    run(sources, tmp_path / "sharded", shard=(2, 3))
    assert digest(tmp_path / "whole") == digest(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "manifest-1-of-3.csv").is_file()


def test_resumed_run_skips_finished_files_and_equals_uninterrupted(sources, tmp_path) -> None:
    run(sources, tmp_path / "whole")
    out = tmp_path / "resumed"
    run(sources, out)
    # Simulate a kill: some files never written, a leftover temp file from an interrupted write.
    (out / "T000002" / "03.jpg").unlink()
    (out / "T000004" / "00.jpg").unlink()
    (out / "T000004" / ".01.jpg.123.tmp").write_bytes(b"partial")
    summary = run(sources, out)
    assert summary.written == 2
    assert summary.skipped_existing == 4 * (COPIES + 1) - 2
    assert digest(tmp_path / "whole") == digest(out)


def test_parallel_workers_match_single_process(sources, tmp_path) -> None:
    run(sources, tmp_path / "serial")
    generate_copies_dataset(sources, tmp_path / "parallel", recipe(), copies=COPIES, every=2, size=SIZE,
                            seed=7, workers=2, progress=False)  # fmt: skip
    assert digest(tmp_path / "serial") == digest(tmp_path / "parallel")


def test_unreadable_sources_are_counted_not_fatal(sources, tmp_path) -> None:
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "T000001.jpg").write_bytes(b"")  # zero bytes
    (bad_dir / "T000003.jpg").write_bytes(b"this is not a jpeg")
    good = sources[4:6]
    summary = generate_copies_dataset(
        [bad_dir / "T000001.jpg", bad_dir / "T000003.jpg", *good], tmp_path / "out", recipe(),
        copies=1, every=1, size=SIZE, workers=0, progress=False,
    )  # fmt: skip
    assert len(summary.failed) == 2 and summary.written == 2 * 2
    assert (tmp_path / "out" / "failed.csv").read_text().count("\n") == 3


def test_parse_shard() -> None:
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_class_ids_from_nested_folders_are_unique(tmp_path) -> None:
    paths = [tmp_path / "cats" / "image_0001.jpg", tmp_path / "dogs" / "image_0001.jpg"]
    assert [c for c, _ in select_classes(paths, 1)] == ["cats_image_0001", "dogs_image_0001"]


def test_default_config_writes_d2lv_quality_jpegs(sources, tmp_path) -> None:
    # D2LV stores every image at JPEG quality 100: all quantisation steps are 1 (no rounding loss)
    from omegaconf import OmegaConf

    quality = OmegaConf.load(
        Path(__file__).resolve().parents[2] / "conf" / "generate" / "default.yaml"
    ).jpeg_quality
    run(sources[:2], tmp_path / "q", jpeg_quality=quality)
    run(sources[:2], tmp_path / "low", jpeg_quality=75)
    with Image.open(tmp_path / "q" / "T000000" / "01.jpg") as img:
        assert all(step == 1 for table in img.quantization.values() for step in table)
    with Image.open(tmp_path / "low" / "T000000" / "01.jpg") as img:  # the setting is honoured
        assert any(step > 1 for table in img.quantization.values() for step in table)


def test_bw_recipe_stores_greyscale_originals_on_disk_and_online(sources, tmp_path) -> None:
    """D2LV's bw sets store the original in greyscale too (``Compose(original=...)``), in both modes."""
    from isc.augment import Grayscale
    from isc.data.copies import OnlineCopiesDataset

    bw = Compose([Resize(SIZE), Grayscale()], original=Grayscale())
    generate_copies_dataset(
        sources[:2], tmp_path / "bw", bw, copies=1, every=1, size=SIZE, workers=0, progress=False
    )
    generate_copies_dataset(
        sources[:2], tmp_path / "rgb", recipe(), copies=1, every=1, size=SIZE, workers=0, progress=False
    )

    def is_grey(image: Image.Image) -> bool:
        a = np.asarray(image.convert("RGB")).astype(int)
        return bool(np.abs(a[..., 0] - a[..., 1]).max() <= 2 and np.abs(a[..., 1] - a[..., 2]).max() <= 2)

    with Image.open(tmp_path / "bw" / "T000000" / "00.jpg") as img:
        assert is_grey(img)
    with Image.open(tmp_path / "rgb" / "T000000" / "00.jpg") as img:
        assert not is_grey(img)  # the synthetic sources are colourful: the check can fail
    online = OnlineCopiesDataset(sources[:2], bw, members=2)
    assert is_grey(online[0][0]) and is_grey(online[1][0])  # member 0 is the original
