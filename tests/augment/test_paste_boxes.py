"""Paste boxes: the recorded rectangle is where the pasted image really is in the output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isc.augment import (
    Compose,
    GaussianBlur,
    HorizontalFlip,
    ImageOverlay,
    MemeFormat,
    Pad,
    PasteOnBackground,
    RandomResizedCrop,
    Resize,
    Rotate,
    record_pastes,
)
from isc.data.benchmark import QUERY_BOXES_NAME, build_benchmark
from isc.data.generate import generate_copies_dataset
from isc.formats.paste_boxes import read_paste_boxes, write_paste_boxes

RED, BLUE = (230, 20, 20), (20, 20, 230)


def flat(color: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, color)


def assert_box_is_red(image: Image.Image, box: tuple[float, float, float, float], margin: int = 2) -> None:
    """Inside the box (less a margin for resampling) red, outside it (plus the margin) blue."""
    a = np.asarray(image.convert("RGB")).astype(int)
    x0, y0, x1, y1 = (round(v) for v in box)
    inside = a[y0 + margin : y1 - margin, x0 + margin : x1 - margin]
    assert inside.size and (np.abs(inside - RED).max(axis=2) < 40).all()
    outside = np.ones(a.shape[:2], bool)
    outside[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = False
    assert outside.any() and (np.abs(a[outside] - BLUE).max(axis=1) < 40).all()


@pytest.mark.parametrize("seed", range(4))
def test_paste_box_follows_later_crop_pad_flip_resize(seed: int) -> None:
    t = Compose(
        [
            PasteOnBackground(scale=(0.1, 0.3), source=[flat(BLUE, (300, 200))]),
            Pad(amount=(0.0, 0.2), color=BLUE),
            HorizontalFlip(),
            GaussianBlur(sigma=(0.5, 0.5)),  # photometric: leaves the box where it is
            RandomResizedCrop(size=None, scale=(0.7, 1.0)),
            Resize(256),
        ]
    )
    with record_pastes() as record:
        out = t(flat(RED, (240, 160)), np.random.default_rng(seed))
    assert record.box is not None and not record.lost
    assert out.size == (256, 256)
    assert_box_is_red(out, record.box, margin=3)


def test_image_overlay_box_is_the_visible_part() -> None:
    t = Compose([ImageOverlay(scale=3.0, x_pos=0.4, y_pos=0.3, source=[flat(BLUE, (400, 300))]), Resize(256)])
    with record_pastes() as record:
        out = t(flat(RED, (100, 100)), np.random.default_rng(0))
    assert record.box is not None
    x0, y0, x1, y1 = record.box
    assert (x1, y1) == (256, 256)  # cut by the canvas's right and bottom edges
    assert x0 == pytest.approx(160 * 256 / 400) and y0 == pytest.approx(90 * 256 / 300)
    assert_box_is_red(out, record.box)


def test_meme_band_box() -> None:
    with record_pastes() as record:
        out = MemeFormat(caption=0.25, bg_color=BLUE, text_color=BLUE)(
            flat(RED, (100, 80)), np.random.default_rng(0)
        )
    assert record.box == (0.0, 20.0, 100.0, 100.0) and out.size == (100, 100)


def test_rotation_after_paste_loses_the_box_and_no_paste_records_nothing() -> None:
    paste = PasteOnBackground(scale=0.2, source=[flat(BLUE, (200, 200))])
    with record_pastes() as record:
        Compose([paste, Rotate(degrees=(20, 20))])(flat(RED, (200, 200)), np.random.default_rng(0))
    assert record.lost and record.box is None and record.pasted
    with record_pastes() as record:
        Compose([Pad(0.1), Resize(64)])(flat(RED, (200, 200)), np.random.default_rng(0))
    assert not record.pasted
    paste(flat(RED, (50, 50)), np.random.default_rng(0))  # outside record_pastes: nothing to fill in


def test_generation_writes_boxes_matching_the_saved_copies(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        flat(RED, (120, 90)).save(src / f"img{i}.png")
    t = Compose(
        {
            "paste": PasteOnBackground(scale=(0.1, 0.4), source=[flat(BLUE, (160, 160))]),
            "resize": Resize(96),
        }
    )
    summary = generate_copies_dataset(
        sorted(src.iterdir()), tmp_path / "out", t, copies=3, every=1, size=96, workers=0, progress=False
    )
    boxes = read_paste_boxes(tmp_path / "out" / "boxes.csv")
    assert summary.boxes == tmp_path / "out" / "boxes.csv" and summary.pasted == 6
    assert sorted(boxes) == [f"img{c}/{i:02d}" for c in range(2) for i in (1, 2, 3)]  # never the original
    for image_id, box in boxes.items():
        assert box is not None
        assert_box_is_red(Image.open(tmp_path / "out" / f"{image_id}.jpg"), box)
    # A class whose images are there but not its boxes (an older run) gets them back without rewriting.
    (tmp_path / "out" / "img1" / "boxes.csv").unlink()
    again = generate_copies_dataset(
        sorted(src.iterdir()), tmp_path / "out", t, copies=3, every=1, size=96, workers=0, progress=False
    )
    assert again.written == 0 and read_paste_boxes(tmp_path / "out" / "boxes.csv") == boxes


def test_benchmark_writes_query_boxes(tmp_path: Path) -> None:
    paste = PasteOnBackground(scale=0.2, source=[flat(BLUE, (100, 100))])
    out = build_benchmark(
        [flat(RED, (100, 100)) for _ in range(6)], tmp_path / "b", query_transform=paste, n_references=2,
        n_training=2, n_queries=2, matched_fraction=0.5, jpeg_quality=100,
    )  # fmt: skip
    boxes = read_paste_boxes(out / QUERY_BOXES_NAME)
    assert sorted(boxes) == ["Q00000", "Q00001"]
    for query_id, box in boxes.items():
        assert box is not None
        assert_box_is_red(Image.open(out / "queries" / f"{query_id}.jpg"), box, margin=4)  # 4:2:0 chroma


def test_paste_box_csv_round_trip_and_errors(tmp_path: Path) -> None:
    path = write_paste_boxes(tmp_path / "b.csv", {"a/01": (1.0, 2.5, 30.25, 40.0), "a/02": None})
    assert read_paste_boxes(path) == {"a/01": (1.0, 2.5, 30.25, 40.0), "a/02": None}
    path.write_text("image_id,x0,y0,x1,y1\na,5,5,2,9\n")
    with pytest.raises(ValueError, match=r"b.csv:2: need 0 <= x0 < x1"):
        read_paste_boxes(path)
    path.write_text("id,x0\n")
    with pytest.raises(ValueError, match="header"):
        read_paste_boxes(path)
