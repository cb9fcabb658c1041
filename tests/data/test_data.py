from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from isc.data.images import (
    IMAGE_EXTENSIONS,
    Disc21Layout,
    ImageFolderDataset,
    ImageLoadError,
    image_id,
    list_images,
    load_image,
    screen_decode,
)
from isc.formats.pair_csv import write_ground_truth
from isc.formats.pairs import GroundTruth

W, H = 40, 24


def _photo(path: Path, size: tuple[int, int] = (W, H), seed: int = 0, **save_kwargs: object) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path, **save_kwargs)
    return path


def _pixels(path: Path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------- listing


def test_list_images_ids_sorting_and_filtering(tmp_path: Path) -> None:
    for name in ["R000002.jpg", "R000000.PNG", "R000001.jpeg", "a.b.webp"]:
        _photo(tmp_path / name, format="PNG")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.jpg").mkdir()
    paths = list_images(tmp_path)
    assert [p.name for p in paths] == ["R000000.PNG", "R000001.jpeg", "R000002.jpg", "a.b.webp"]
    assert [image_id(p) for p in paths] == ["R000000", "R000001", "R000002", "a.b"]
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"} == set(IMAGE_EXTENSIONS)


def test_list_images_refuses_two_files_with_one_id(tmp_path: Path) -> None:
    _photo(tmp_path / "a.jpg")
    _photo(tmp_path / "a.png")
    _photo(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"a \(a\.jpg, a\.png\)") as info:
        list_images(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_list_images_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- modes


def test_greyscale_loads_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.new("L", (W, H), 100).save(path)
    pixels = _pixels(path)
    assert pixels.shape == (H, W, 3)
    assert np.all(pixels == 100)


def test_one_bit_loads_as_black_and_white(tmp_path: Path) -> None:
    path = tmp_path / "b.png"
    image = Image.new("1", (W, H), 0)
    image.paste(1, (0, 0, W // 2, H))
    image.save(path)
    pixels = _pixels(path)
    assert pixels.shape == (H, W, 3)
    assert np.all(pixels[:, : W // 2] == 255) and np.all(pixels[:, W // 2 :] == 0)


def _palette_image() -> Image.Image:
    image = Image.new("P", (W, H), 0)
    image.putpalette([10, 20, 30, 200, 0, 0] + [0] * (256 - 2) * 3)
    image.paste(1, (0, 0, W // 2, H))
    return image


def test_palette_loads_as_its_colours(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    _palette_image().save(path)
    pixels = _pixels(path)
    assert pixels.shape == (H, W, 3)
    assert pixels[0, 0].tolist() == [200, 0, 0]
    assert pixels[0, -1].tolist() == [10, 20, 30]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparency_is_composited_on_white(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"pt{suffix}"
    _palette_image().save(path, transparency=0)
    pixels = _pixels(path)
    assert pixels.shape == (H, W, 3)
    assert pixels[0, 0].tolist() == [200, 0, 0]
    assert pixels[0, -1].tolist() == [255, 255, 255]  # index 0 is transparent


def test_cmyk_jpeg_loads_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "c.jpg"
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    pixels = _pixels(path).astype(int)
    assert pixels.shape == (H, W, 3)
    assert np.abs(pixels[H // 2, W // 2] - [255, 0, 0]).max() <= 10  # pure red


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "g16.png"
    values = np.zeros((H, W), dtype=np.uint16)
    values[:, : W // 3] = 65535
    values[:, W // 3 : 2 * W // 3] = 32768
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = _pixels(path)
    assert pixels.shape == (H, W, 3)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert np.abs(int(pixels[0, W // 2, 0]) - 128) <= 1
    assert pixels[0, -1].tolist() == [0, 0, 0]


def test_float_greyscale_in_unit_range_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    values = np.full((H, W), 0.5, dtype=np.float32)
    values[0, 0] = 1.0
    Image.fromarray(values, mode="F").save(path)
    pixels = _pixels(path)
    assert pixels.shape == (H, W, 3)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert np.abs(int(pixels[1, 1, 0]) - 128) <= 1


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[:, : W // 3, 3] = 255  # opaque
    rgba[:, W // 3 : 2 * W // 3, 3] = 128  # half transparent
    Image.fromarray(rgba, mode="RGBA").save(path)
    pixels = _pixels(path).astype(int)
    assert pixels.shape == (H, W, 3)
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert np.abs(pixels[0, W // 2] - [255, 127, 127]).max() <= 1
    assert pixels[0, -1].tolist() == [255, 255, 255]  # fully transparent -> background


def test_la_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    la = np.zeros((H, W, 2), dtype=np.uint8)
    la[:, : W // 2, 1] = 255
    Image.fromarray(la, mode="LA").save(path)
    pixels = _pixels(path)
    assert pixels.shape == (H, W, 3)
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, -1].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _photo(path, exif=exif)
    assert Image.open(path).size == (W, H)
    assert load_image(path).size == (H, W)


def test_loaded_image_is_independent_of_the_file(tmp_path: Path) -> None:
    path = _photo(tmp_path / "x.png", format="PNG")
    image = load_image(path)
    path.unlink()
    assert np.asarray(image).shape == (H, W, 3)


# ---------------------------------------------------------------------------------------------- bad files


def _bad_files(folder: Path) -> dict[str, str]:
    """Bad files and the words their error must contain."""
    rng = np.random.default_rng(0)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n" * 20)
    (folder / "noise.png").write_bytes(rng.bytes(3000))
    (folder / "garbled.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(3000))  # JPEG magic, garbage after
    whole = _photo(folder / "whole.jpg", size=(120, 90), quality=95).read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return {
        "zero.jpg": "empty file",
        "text.jpg": "not an image",
        "noise.png": "not an image",
        "garbled.jpg": "corrupt",
        "truncated.jpg": "truncated or corrupt",
    }


def test_bad_files_raise_image_load_error_naming_the_file(tmp_path: Path) -> None:
    for name, reason in _bad_files(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(ImageLoadError, match=reason) as info:
            load_image(path)
        assert str(path) in str(info.value)
        assert info.value.path == path
        assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="does not exist"):
        load_image(tmp_path / "gone.jpg")


def test_truncated_png_fails(tmp_path: Path) -> None:
    whole = _photo(tmp_path / "w.png", size=(120, 90), format="PNG").read_bytes()
    path = tmp_path / "t.png"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(path)


def test_load_truncated_images_flag_is_not_set_and_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing isc.data.images must not switch it on
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with caplog.at_level(logging.WARNING, logger="isc.data.images"):
        load_image(_photo(tmp_path / "ok.png", format="PNG"))
    assert "LOAD_TRUNCATED_IMAGES" in caplog.text


def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _photo(tmp_path / "big.png", size=(64, 64), format="PNG")
    with pytest.raises(ImageLoadError, match=r"too large: 64x64.*max_pixels=1000"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=None).size == (64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own guard refuses > 2x this
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path, max_pixels=None)


def test_image_load_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(ImageLoadError("/x/y.jpg", "empty file")))
    assert isinstance(error, ImageLoadError)
    assert error.reason == "empty file" and str(error) == "/x/y.jpg: empty file"


# ---------------------------------------------------------------------------------------------- datasets


def _mixed_folder(folder: Path) -> tuple[list[Path], dict[str, str]]:
    good = [_photo(folder / f"img{i}.png", seed=i, format="PNG") for i in range(3)]
    return good, _bad_files(folder)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_scan_images_separates_good_and_bad(tmp_path: Path, num_workers: int) -> None:
    good, bad = _mixed_folder(tmp_path)
    paths = list_images(tmp_path)
    kept, skipped = screen_decode(paths, skip_bad=True, num_workers=num_workers)
    assert kept == sorted(good)
    assert {p.name: r for p, r in skipped}.keys() == bad.keys()
    for path, reason in skipped:
        assert bad[path.name] in reason
    with pytest.raises(ImageLoadError, match="garbled.jpg"):  # first bad one in sorted order
        screen_decode(paths, skip_bad=False)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_dataset_skip_bad_counts_and_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good, bad = _mixed_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="isc.data.images"):
        dataset = ImageFolderDataset.from_folder(tmp_path, transform=_to_tensor, skip_bad=True)
    assert f"skipping {len(bad)} of {len(bad) + len(good)}" in caplog.text
    assert len(dataset) == len(good)
    assert len(dataset.skipped) == len(bad)
    assert dataset.ids == ["img0", "img1", "img2"]
    tensor, index = dataset[1]
    assert index == 1
    assert tensor.shape == (3, H, W) and tensor.dtype == torch.uint8
    expected = np.asarray(Image.open(tmp_path / "img1.png").convert("RGB"))
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), expected)
    batch, indices = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch.shape == (3, 3, H, W) and indices.tolist() == [0, 1, 2]


def test_dataset_without_skip_bad_raises_naming_the_file(tmp_path: Path) -> None:
    _mixed_folder(tmp_path)
    dataset = ImageFolderDataset(list_images(tmp_path))
    assert len(dataset) == 8
    assert dataset.skipped == []
    by_name = {p.name: i for i, p in enumerate(dataset.paths)}
    image, index = dataset[by_name["img0.png"]]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    with pytest.raises(ImageLoadError, match=r"truncated\.jpg: truncated or corrupt"):
        dataset[by_name["truncated.jpg"]]


def test_dataset_custom_ids_must_align(tmp_path: Path) -> None:
    paths = [_photo(tmp_path / "a.png", format="PNG"), _photo(tmp_path / "b.png", format="PNG")]
    assert ImageFolderDataset(paths, ids=["x", "y"]).ids == ["x", "y"]
    with pytest.raises(ValueError, match="2 paths but 1 ids"):
        ImageFolderDataset(paths, ids=["x"])


# ---------------------------------------------------------------------------------------------- layout


def _tree(root: Path, ground_truth: GroundTruth | None = None, training: bool = True) -> Path:
    for split, ids in [("references", ["R000000", "R000001", "R000002"]), ("queries", ["Q00001", "Q00000"])]:
        (root / split).mkdir(parents=True)
        for i in ids:
            _photo(root / split / f"{i}.jpg", size=(16, 16))
    if training:
        (root / "training").mkdir()
        _photo(root / "training" / "T000000.jpg", size=(16, 16))
    if ground_truth is not None:
        write_ground_truth(root / "ground_truth.csv", ground_truth)
    return root


def test_layout_lists_splits_and_reads_ground_truth(tmp_path: Path) -> None:
    gt = GroundTruth(["Q00000", "Q00001"], ["R000002", ""])
    layout = Disc21Layout(_tree(tmp_path / "disc", gt))
    assert layout.ids("references") == ["R000000", "R000001", "R000002"]
    assert layout.ids("queries") == ["Q00000", "Q00001"]
    assert layout.ids("training") == ["T000000"]
    assert layout.paths("queries")[0] == tmp_path / "disc" / "queries" / "Q00000.jpg"
    assert layout.ground_truth().num_positives == 1
    layout.validate()
    assert Disc21Layout.from_root(str(tmp_path / "disc")) == layout
    with pytest.raises(ValueError, match="unknown split"):
        layout.paths("test")


def test_layout_without_optional_parts(tmp_path: Path) -> None:
    layout = Disc21Layout(_tree(tmp_path, training=False))
    assert not layout.has_split("training") and not layout.has_ground_truth()
    with pytest.raises(FileNotFoundError, match="no training/ folder"):
        layout.paths("training")
    with pytest.raises(FileNotFoundError, match="ground_truth.csv"):
        layout.ground_truth()
    layout.validate()  # nothing to cross-check, listings are fine


def test_validate_catches_ground_truth_ids_that_do_not_exist(tmp_path: Path) -> None:
    gt = GroundTruth(["Q00000", "Q00001", "Q00007"], ["R000002", "R000999", ""])
    layout = Disc21Layout(_tree(tmp_path, gt))
    with pytest.raises(ValueError, match=r"1 id\(s\) missing from queries/: Q00007") as info:
        layout.validate()
    assert "1 id(s) missing from references/: R000999" in str(info.value)
    assert "ground_truth.csv" in str(info.value)


def test_layout_root_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Disc21Layout(tmp_path / "missing")
    (tmp_path / "references").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks the folder\(s\) \['queries'\]"):
        Disc21Layout(tmp_path)


def test_layout_reports_clashing_ids(tmp_path: Path) -> None:
    layout = Disc21Layout(_tree(tmp_path))
    _photo(tmp_path / "references" / "R000001.png", size=(16, 16), format="PNG")
    with pytest.raises(ValueError, match="R000001"):
        layout.validate()
