"""Behaviour of the copy-edit transforms, their composition and the YAML recipes."""

from __future__ import annotations

import functools
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import isc.augment as A
from isc.augment import rng_for, synthetic_image

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
RECIPES = sorted(p.stem for p in (CONF / "augmentation").glob("*.yaml"))
QUERY_RECIPES = ("isc_query", "isc_query_local")  # benchmark query edits, not D2LV training recipes
# the learned overlay detector's training pastes: no D2LV recipe either (docs/inference.md)
D2LV_RECIPES = [r for r in RECIPES if r not in (*QUERY_RECIPES, "overlay_pastes")]
TEMPLATE_SIZES = {(414, 736), (1200, 736)}
PINNED_RAW = [11074644401453482484, 6669934804423442033]  # PCG64 output of rng_for(0, "T000123", 7)


# ----------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return synthetic_image(np.random.default_rng(0), (64, 48))


def edge_inputs(photo: Image.Image) -> dict[str, Image.Image]:
    return {
        "photo": photo,
        "tiny": photo.resize((8, 8)),
        "grey": photo.convert("L"),
        "rgba": photo.convert("RGBA"),
        "wide": photo.resize((1000, 20)),
        "tall": photo.resize((20, 1000)),
    }


def same(w, h, out):
    return out == (w, h)


def at_least(w, h, out):
    return out[0] >= w and out[1] >= h


def holds_rotated(w, h, out):
    return out[0] * out[1] >= w * h


def within(w, h, out):
    return 1 <= out[0] <= w and 1 <= out[1] <= h


def meme(w, h, out):
    return out[0] == w and out[1] >= h + 12


def template(w, h, out):
    return out in TEMPLATE_SIZES


def longer_side(n):
    return lambda w, h, out: max(out) == n


# (transform, expected output size given input (w, h), is it random?)
TRANSFORMS = {
    "rrc": (A.RandomResizedCrop(32, scale=(0.2, 1.0)), lambda w, h, out: out == (32, 32), True),
    "rrc_hw": (A.RandomResizedCrop([24, 40]), lambda w, h, out: out == (40, 24), True),
    "crop": (A.RandomResizedCrop(None, scale=(0.2, 1.0)), within, True),
    "rotate": (A.Rotate(50), same, True),
    "rotate_expand": (A.Rotate(50, expand=True, fill=None, resample="bilinear"), holds_rotated, True),
    "perspective": (A.Perspective(), same, True),
    "pad": (A.Pad(), at_least, True),
    "hflip": (A.HorizontalFlip(), same, False),
    "color_jitter": (A.ColorJitter(0.5, 0.5, 0.3, 0.2), same, True),
    "blur": (A.GaussianBlur((0.1, 2.0)), same, True),
    "blur_strong": (A.GaussianBlur((2.0, 4.0)), same, True),
    "blur_exact": (A.GaussianBlur((0.1, 2.0), exact=True), same, True),
    "grayscale": (A.Grayscale(), same, False),
    "brightness": (A.Brightness((0.1, 0.5)), same, True),
    "colorize": (A.Colorize(), same, True),
    "pixelize": (A.Pixelize(), same, True),
    "shuffle": (A.ShufflePixels(), same, True),
    "jpeg": (A.JpegQuality(), same, True),
    "paste_on_background": (A.PasteOnBackground((0.04, 0.1)), same, True),
    "underlay": (A.ImageUnderlay(), same, True),
    "underlay_large": (A.ImageUnderlay((0.2, 0.3)), same, True),
    "overlay": (A.ImageOverlay(), lambda w, h, out: out == A.RandomTexture().native, True),
    "opacity_squashed": (A.OpacityOverlay(size=32), lambda w, h, out: out == (32, 32), True),
    "pad_symmetric": (A.Pad((0.0, 0.1), symmetric=True), at_least, True),
    "perspective_px": (A.Perspective((0.0, 50.0), unit="px", resample="bicubic"), same, True),
    "pixelize_bicubic": (A.Pixelize((0.1, 1.0), down="bicubic", up="bicubic"), same, True),
    "colorize_false_colour": (A.Colorize(1.0, color=None, black=None, white=None), same, True),
    "emoji_d2lv": (
        A.EmojiOverlay(
            (0.0, 1.0), (0.0, 1.0), category="smileys", x_pos=(0, 0.5), y_pos=(0, 0.5), relative_to="height"
        ),
        same,
        True,
    ),
    "text_d2lv": (
        A.TextOverlay(
            (0.0, 1.0),
            (0, 20),
            (1, 1),
            (0.0, 1.0),
            font="NotoNaskhArabic-Regular.ttf",
            charset=100,
            x_pos=(0, 0.5),
            y_pos=(0, 0.5),
        ),
        same,
        True,
    ),
    "paste_over": (A.PasteOver(), same, True),
    "opacity": (A.OpacityOverlay(), same, True),
    "emoji": (A.EmojiOverlay(), same, True),
    "text": (A.TextOverlay(), same, True),
    "text_words": (A.TextOverlay(words=["hello", "world"], lines=(1, 3)), same, True),
    "screenshot": (A.ScreenshotFrame(), template, True),
    "meme": (A.MemeFormat(), meme, True),
    "resize": (A.Resize(16), lambda w, h, out: out == (16, 16), False),
    "resize_aspect": (A.Resize(40, keep_aspect=True), longer_side(40), False),
    "identity": (A.Identity(), same, False),
    "one_of": (A.OneOf([A.Grayscale(), A.Rotate(20)]), same, True),
    "random_apply": (A.RandomApply(A.Brightness(0.5), p=0.5), same, False),
}


def as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def high_freq_energy(img: Image.Image) -> float:
    a = as_array(img.convert("L"))
    return float(np.mean(np.diff(a, axis=0) ** 2) + np.mean(np.diff(a, axis=1) ** 2))


def pool_of(tmp_path: Path, color: tuple[int, int, int], name: str = "bg.png") -> Path:
    path = tmp_path / name
    Image.new("RGB", (40, 30), color).save(path)
    return path


# ----------------------------------------------------------------------------- every transform
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_returns_rgb_of_expected_size_on_edge_inputs(name, photo):
    t, expected, _ = TRANSFORMS[name]
    for kind, img in edge_inputs(photo).items():
        out = t(img, rng_for(0, name, kind))
        assert isinstance(out, Image.Image)
        assert out.mode == "RGB", (name, kind, out.mode)
        assert expected(*img.size, out.size), (name, kind, img.size, out.size)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_is_deterministic_given_rng(name, photo):
    t, _, is_random = TRANSFORMS[name]
    first = t(photo, rng_for(1, name)).tobytes()
    assert t(photo, rng_for(1, name)).tobytes() == first
    if is_random:
        others = {t(photo, rng_for(seed, name)).tobytes() for seed in range(2, 7)}
        assert others - {first}, f"{name} ignores its generator"


def test_transforms_leave_global_random_state_alone(photo):
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 (checking it)
    for t, _, _ in TRANSFORMS.values():
        t(photo, rng_for(2, "global"))
    assert random.getstate() == py_state
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


# ----------------------------------------------------------------------------- single edits do what they say
def test_grayscale_has_equal_channels(photo):
    a = np.asarray(A.Grayscale()(photo, rng_for(0)))
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_brightness_darkens_by_the_drawn_factor(photo):
    out = A.Brightness((0.25, 0.25))(photo, rng_for(0))
    assert abs(as_array(out).mean() - 0.25 * as_array(photo).mean()) < 1.0


def test_blur_reduces_high_frequency_energy(photo):
    base = high_freq_energy(photo)
    weak = high_freq_energy(A.GaussianBlur((1.0, 1.0))(photo, rng_for(0)))
    strong = high_freq_energy(A.GaussianBlur((3.0, 3.0))(photo, rng_for(0)))
    assert strong < weak < base


def test_fast_blur_matches_pil_gaussian_roughly():
    a = np.zeros((64, 64, 3), np.uint8)
    a[32, 32] = 255
    impulse = Image.fromarray(a)
    for sigma in (0.5, 1.5, 3.0):
        b = as_array(A.GaussianBlur((sigma, sigma))(impulse, rng_for(0)))[..., 0]
        b /= b.sum()
        y = np.arange(64)[:, None]
        std = np.sqrt((b * (y - (b * y).sum()) ** 2).sum())
        assert abs(std - sigma) < 0.2 * sigma, (sigma, std)


def test_color_jitter_identity_factors_keep_image(photo):
    out = A.ColorJitter(0, 0, 0, 0)(photo, rng_for(0))
    assert np.abs(as_array(out) - as_array(photo)).max() <= 1


def test_color_jitter_hue_rotates_pure_red_towards_green():
    red = Image.new("RGB", (4, 4), (200, 0, 0))
    t = A.ColorJitter(0, 0, 0, 0.3)
    outs = [np.asarray(t(red, rng_for(s)))[0, 0].astype(int) for s in range(8)]
    assert any(o[1] > 40 for o in outs) or any(o[2] > 40 for o in outs)
    assert all(abs(o.mean() - np.mean([200, 0, 0])) < 60 for o in outs)


def test_colorize_tints_greyscale_input(photo):
    grey = photo.convert("L").convert("RGB")
    out = np.asarray(A.Colorize((0.8, 0.8), color=(255, 0, 0))(grey, rng_for(0))).astype(int)
    assert (out[..., 0] - out[..., 2]).mean() > 20


def test_opacity_overlay_blends_with_the_source(photo):
    black = [Image.new("RGB", (10, 10), (0, 0, 0))]
    out = A.OpacityOverlay((0.5, 0.5), source=black)(photo, rng_for(0))
    assert np.abs(as_array(out) - 0.5 * as_array(photo)).max() <= 1
    unchanged = A.OpacityOverlay((1.0, 1.0), source=black)(photo, rng_for(0))
    assert unchanged.tobytes() == photo.tobytes()


def test_paste_on_background_covers_the_requested_area(photo):
    bg = (255, 0, 255)
    canvas = photo.resize((200, 160))
    out = np.asarray(
        A.PasteOnBackground((0.25, 0.25), source=[Image.new("RGB", (5, 5), bg)])(canvas, rng_for(0))
    )
    background = (out == bg).all(axis=-1).mean()
    assert 0.70 <= background <= 0.80


def test_paste_over_only_touches_part_of_the_image(photo):
    canvas = photo.resize((200, 160))
    out = A.PasteOver((0.1, 0.1), opacity=(1.0, 1.0))(canvas, rng_for(0))
    changed = (np.asarray(out) != np.asarray(canvas)).any(axis=-1).mean()
    assert 0.03 < changed <= 0.11


def test_pad_adds_a_uniform_border(photo):
    out = np.asarray(A.Pad((0.2, 0.2), color=(1, 2, 3))(photo, rng_for(0)))
    assert out.shape[1] > photo.width and (out[0] == (1, 2, 3)).all() and (out[:, 0] == (1, 2, 3)).all()


def test_hflip_mirrors(photo):
    assert np.array_equal(np.asarray(A.HorizontalFlip()(photo, rng_for(0))), np.asarray(photo)[:, ::-1])


def test_shuffle_pixels_keeps_the_pixel_multiset(photo):
    out = np.asarray(A.ShufflePixels((0.5, 0.5))(photo, rng_for(0))).reshape(-1, 3)
    src = np.asarray(photo).reshape(-1, 3)
    assert not np.array_equal(out, src)
    assert np.array_equal(
        np.unique(out, axis=0, return_counts=True)[1], np.unique(src, axis=0, return_counts=True)[1]
    )


def test_pixelize_makes_blocks(photo):
    out = np.asarray(A.Pixelize((0.25, 0.25))(photo.resize((64, 64)), rng_for(0)))
    assert len(np.unique(out.reshape(-1, 3), axis=0)) <= 16 * 16


def test_full_scale_crop_keeps_the_whole_image(photo):
    out = A.RandomResizedCrop(None, scale=(1.0, 1.0), ratio=(0.5, 2.0))(photo, rng_for(0))
    assert out.tobytes() == photo.tobytes()


def test_zero_perspective_is_identity(photo):
    out = A.Perspective(sigma=(0.0, 0.0))(photo, rng_for(0))
    assert np.abs(as_array(out) - as_array(photo)).mean() < 1.0


def test_meme_has_a_white_caption_band_on_top(photo):
    out = A.MemeFormat(caption=(0.3, 0.3))(photo.resize((200, 150)), rng_for(0))
    band = np.asarray(out)[:45]
    assert out.size == (200, 195)
    assert 0.5 < (band == 255).all(axis=-1).mean() < 1.0  # white with some black text


def test_emoji_and_text_change_part_of_the_image(photo):
    canvas = photo.resize((128, 128))
    for t in (A.EmojiOverlay((0.3, 0.3), opacity=(1.0, 1.0)), A.TextOverlay((0.2, 0.2), opacity=(1.0, 1.0))):
        changed = (np.asarray(t(canvas, rng_for(3))) != np.asarray(canvas)).any(axis=-1).mean()
        assert 0.0 < changed < 0.6, t


def test_jpeg_quality_loses_detail(photo):
    out = A.JpegQuality((10, 10))(photo, rng_for(0))
    assert 0 < np.abs(as_array(out) - as_array(photo)).mean() < 30


def test_invalid_parameters_fail_early():
    with pytest.raises(ValueError):
        A.RandomApply(A.Grayscale(), p=1.5)
    with pytest.raises(ValueError):
        A.GaussianBlur((2.0, 1.0))
    with pytest.raises(ValueError):
        A.Rotate(10, resample="lanczos")
    with pytest.raises(ValueError):
        A.OneOf([A.Grayscale()], weights=[0])
    with pytest.raises(TypeError):
        A.as_source("some/dir")


# ----------------------------------------------------------------------------- sources
def test_image_pool_reads_lists_and_files(tmp_path, photo):
    (tmp_path / "imgs").mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.new("RGB", (30, 20), color).save(tmp_path / "imgs" / f"{i}.jpg")
    (tmp_path / "list.txt").write_text("imgs/0.jpg\n\nimgs/1.jpg\n")
    by_file = A.ImagePool(paths_file=tmp_path / "list.txt")
    by_root = A.ImagePool(root=tmp_path / "imgs")
    by_list = A.ImagePool([photo])
    assert len(by_file) == len(by_root) == 2 and len(by_list) == 1
    drawn = {by_file(rng_for(0, i), (30, 20)).getpixel((5, 5)) for i in range(20)}
    assert len(drawn) == 2
    assert by_list(rng_for(0)).tobytes() == photo.tobytes()
    with pytest.raises(ValueError):
        A.ImagePool(root=tmp_path / "nothing-here")
    with pytest.raises(OSError, match="missing.jpg"):
        A.ImagePool([str(tmp_path / "missing.jpg")])(rng_for(0))


def test_random_texture_and_synthetic_images_are_seeded():
    tex = A.RandomTexture()
    assert tex(rng_for(0), (50, 40)).size == (50, 40)
    assert tex(rng_for(0), (50, 40)).tobytes() == tex(rng_for(0), (50, 40)).tobytes()
    assert synthetic_image(rng_for(1), (30, 20)).tobytes() != synthetic_image(rng_for(2), (30, 20)).tobytes()


# ----------------------------------------------------------------------------- seeding and composition
def test_rng_for_is_stable_and_key_sensitive():
    # pinned: copies must be reproducible across machines and Python processes
    assert rng_for(0, "T000123", 7).bit_generator.random_raw(2).tolist() == PINNED_RAW
    draw = {
        k: rng_for(*k).integers(0, 2**32)
        for k in [(0, "a", 1), (0, "a", 2), (0, "b", 1), (1, "a", 1), (0, 1, 1), (0, "1", 1), (-3, "a", 1)]
    }
    assert len(set(draw.values())) == len(draw)
    assert rng_for(5, "x", 3).random() == rng_for(5, "x", 3).random()


def test_pipelines_pickle_for_dataloader_workers(photo):
    pipeline = build("d2lv_base")
    clone = pickle.loads(pickle.dumps(pipeline))
    assert clone(photo, rng_for(0, 1)).tobytes() == pipeline(photo, rng_for(0, 1)).tobytes()


def test_random_apply_and_one_of_respect_probabilities(photo):
    grey = A.Grayscale()
    assert A.RandomApply(grey, p=0.0)(photo, rng_for(0)).tobytes() == photo.tobytes()
    assert A.RandomApply(grey, p=1.0)(photo, rng_for(0)).tobytes() == grey(photo, rng_for(0)).tobytes()
    applied = sum(
        A.RandomApply(grey, p=0.3)(photo, rng_for(0, i)).tobytes() != photo.tobytes() for i in range(200)
    )
    assert 35 <= applied <= 85
    pick = A.OneOf([A.Identity(), grey], weights=[0, 1])
    assert all(pick(photo, rng_for(0, i)).tobytes() == grey(photo, rng_for(0)).tobytes() for i in range(5))


def test_compose_steps_have_independent_streams(photo):
    text = A.TextOverlay()
    short = A.Compose({"text": text, "skip": None})
    longer = A.Compose({"flip": A.RandomApply(A.Identity(), 0.5), "text": text, "later": A.Grayscale()})
    assert [k for k, _ in short.steps] == ["text"]
    for i in range(3):
        a = short(photo, rng_for(0, i))
        b = longer(photo, rng_for(0, i))
        assert b.tobytes() == A.Grayscale()(a, rng_for(0)).tobytes()  # same text, then greyscale
    seq = A.Compose([A.Rotate(20), None, A.Resize(32)])
    assert seq(photo, rng_for(0)).size == (32, 32)


def test_generate_copies_is_reproducible_per_copy(photo):
    t = A.Compose({"crop": A.RandomResizedCrop(32), "text": A.TextOverlay()})
    copies = A.generate_copies(photo, t, n=3, seed=4, image_id="T000001")
    assert len(copies) == 4 and all(c.size == (32, 32) for c in copies[1:]) and copies[0].size == (256, 256)
    assert copies[2].tobytes() == t(photo, rng_for(4, "T000001", 1)).tobytes()
    assert len({c.tobytes() for c in copies[1:]}) == 3


def test_isc_augment_imports_no_framework():
    code = "import sys, isc.augment; bad = [m for m in ('hydra', 'lightning', 'torch') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- YAML recipes
def build(recipe: str, *overrides: str) -> A.Compose:
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose(overrides=[f"+augmentation={recipe}", *overrides])
    return instantiate(cfg.augmentation)


@pytest.fixture(scope="module")
def sources() -> list[Image.Image]:
    gen = np.random.default_rng(1)
    return [synthetic_image(gen, size) for size in [(160, 120), (90, 160), (120, 120), (200, 60)]]


def outputs(pipeline: A.Compose, images: list[Image.Image], seed: int = 0) -> list[Image.Image]:
    return [pipeline(img, rng_for(seed, i)) for i, img in enumerate(images)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_instantiates_and_runs(recipe, sources):
    pipeline = build(recipe)
    assert isinstance(pipeline, A.Compose)
    for out in outputs(pipeline, sources + [sources[0].resize((8, 8)), sources[0].convert("L")]):
        assert out.mode == "RGB"
        if recipe in QUERY_RECIPES:
            assert max(out.size) == 320
        else:
            assert out.size == (256, 256)


@pytest.mark.parametrize("recipe", ["d2lv_base", "isc_query"])
def test_self_contained_recipes_load_with_plain_omegaconf(recipe, sources):
    pipeline = instantiate(OmegaConf.load(CONF / "augmentation" / f"{recipe}.yaml"))
    again = instantiate(OmegaConf.load(CONF / "augmentation" / f"{recipe}.yaml"))
    a, b = outputs(pipeline, sources), outputs(again, sources)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    assert len({x.tobytes() for x in outputs(pipeline, sources, seed=1)} | {x.tobytes() for x in a}) == 8


def test_base_recipe_has_the_reference_parameters():
    steps = dict(build("d2lv_base").steps)
    assert steps["crop"].size == (256, 256) and steps["crop"].scale == (0.2, 1.0)
    for name in ["rotate", "pixelize", "shuffle_pixels", "perspective", "pad", "paste_under", "grayscale"]:
        assert steps[name].p == 0.3, name
    for name in ["emoji", "text_1", "text_2"]:
        assert steps[name].p == 0.3, name
    assert steps["rotate"].transform.degrees == (-50.0, 50.0)
    assert steps["paste_under"].transform.scale == (0.04, 0.1)
    assert steps["color_jitter"].p == 0.8
    cj = steps["color_jitter"].transform
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == (
        (0.5, 1.5),
        (0.5, 1.5),
        (0.7, 1.3),
        (-0.2, 0.2),
    )
    assert steps["blur"].p == 1.0 and steps["blur"].transform.sigma == (0.1, 2.0)
    assert steps["hflip"].p == 0.5 and steps["scale_paste"].p == 0.2
    assert list(steps)[-1] == "resize"
    # the seed's ranges (Training/generate/ISC_100k_256_big.py), whatever docs/recipe.md says
    assert isinstance(steps["paste_under"].transform, A.ImageUnderlay)
    assert isinstance(steps["scale_paste"].transform, A.ImageOverlay)
    assert steps["scale_paste"].transform.scale == (2.5, 3.5)
    for name in ("paste_under", "scale_paste"):
        assert steps[name].transform.x_pos == steps[name].transform.y_pos == (0.0, 0.5)
    assert steps["pad"].transform.amount == (0.0, 0.1) and steps["pad"].transform.symmetric
    assert steps["pixelize"].transform.ratio == (0.1, 1.0)
    assert steps["shuffle_pixels"].transform.factor == (0.0, 0.4)
    assert steps["perspective"].transform.sigma == (0.0, 50.0) and steps["perspective"].transform.unit == "px"
    emoji = steps["emoji"].transform
    assert emoji.size == emoji.opacity == (0.0, 1.0) and emoji.x_pos == emoji.y_pos == (0.0, 0.5)
    for name in ("text_1", "text_2"):
        text = steps[name].transform
        assert text.length == (0, 20) and text.lines == (1, 1) and text.charset == 100 and text.color is None
        assert text.font_size == text.opacity == (0.0, 1.0) and text.x_pos == text.y_pos == (0.0, 0.5)


@pytest.mark.parametrize("recipe", ["bw", "blur_bw", "face_bw"])
def test_bw_variants_are_grey_everywhere(recipe, sources):
    for out in outputs(build(recipe), sources):
        a = np.asarray(out)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_dark_darkens_about_half_of_the_copies(sources):
    # p = 0.5 right after the colour jitter: a darkened copy is the base copy with a lower mean (the
    # emoji, text and overlay drawn later are not darkened); the others are byte-identical to the base
    base, dark = build("d2lv_base"), build("dark")
    darker = same = 0
    for i, img in enumerate(sources * 3):
        b, d = base(img, rng_for(5, i)), dark(img, rng_for(5, i))
        if b.tobytes() == d.tobytes():
            same += 1
        else:
            assert as_array(d).mean() < as_array(b).mean()
            darker += 1
    assert darker >= 2 and same >= 2


def test_blur_variant_blurs_some_copies_strongly(sources):
    # p = 0.3 with sigma 5-20 instead of the base's mild blur that is always applied: some copies lose
    # most of their fine detail, the others keep more of it than the base copy (sharp overlays off)
    sharp = [f"augmentation.transforms.{k}=null" for k in ("emoji", "text_1", "text_2", "scale_paste")]
    base, blur = build("d2lv_base", *sharp), build("blur", *sharp)
    ratios = [
        high_freq_energy(blur(img, rng_for(6, i))) / max(high_freq_energy(base(img, rng_for(6, i))), 1e-9)
        for i, img in enumerate(sources * 3)
    ]
    assert min(ratios) < 0.3 and max(ratios) > 1.0


def test_opa_shows_the_copy_over_the_paste_source(tmp_path, sources):
    white = pool_of(tmp_path, (255, 255, 255))
    pool = ["+paste_source._target_=isc.augment.ImagePool", f"+paste_source.images=[{white}]"]
    base, opa = build("d2lv_base", *pool), build("opa", *pool)
    pairs = [(base(img, rng_for(0, i)), opa(img, rng_for(0, i))) for i, img in enumerate(sources * 3)]
    for b, o in pairs:  # opa = alpha * base + (1 - alpha) * white where applied (p = 0.4)
        assert as_array(o).mean() >= as_array(b).mean() - 1
    assert sum(b.tobytes() == o.tobytes() for b, o in pairs) >= 2
    assert sum(as_array(o).mean() - as_array(b).mean() > 5 for b, o in pairs) >= 2


def test_color_variant_tints_some_copies(sources):
    base, color = build("d2lv_base"), build("color")
    same_count = sum(
        base(img, rng_for(3, i)).tobytes() == color(img, rng_for(3, i)).tobytes()
        for i, img in enumerate(sources * 3)
    )
    assert 0 < same_count < 12  # p = 0.4: some copies tinted, others identical to the base copy


def test_steps_can_be_disabled_from_the_command_line():
    steps = dict(build("d2lv_base", "augmentation.transforms.blur=null").steps)
    assert "blur" not in steps and "color_jitter" in steps


def test_u_variant_uses_larger_underlay():
    step = dict(build("u").steps)["paste_under"]
    assert step.p == 0.4 and step.transform.scale == (0.2, 0.3)


def test_face_variant_carries_its_sources_file(tmp_path):
    listing = tmp_path / "faces.txt"
    assert build("face").sources_file is None
    assert build("face", f"+face_sources_file={listing}").sources_file == str(listing)
    assert build("face_bw", f"+face_sources_file={listing}").sources_file == str(listing)
    assert build("d2lv_base", f"+face_sources_file={listing}").sources_file is None


# ----------------------------------------------------------------------------- D2LV's seed recipe
RECIPE_DOC = REPO / "docs" / "recipe.md"
_ABSENT = object()


def pool_dir(tmp_path: Path, colors: list[tuple[int, int, int]], size: tuple[int, int] = (500, 375)) -> Path:
    """Paste sources of a given size (the seed pastes photos at their own resolution)."""
    folder = tmp_path / "pool"
    folder.mkdir(exist_ok=True)
    for i, color in enumerate(colors):
        Image.new("RGB", size, color).save(folder / f"{i}.png")
    return folder


def with_pool(folder: Path) -> list[str]:
    return ["+paste_source._target_=isc.augment.ImagePool", f"+paste_source.root={folder}"]


def recipe_table() -> list[tuple[str, str, object]]:
    """(recipe, config key, value) for every row of docs/recipe.md that names a config key."""
    import yaml

    rows = []
    for line in RECIPE_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not (cells[1].startswith("`") and cells[2].startswith("`")):
            continue
        key, value = cells[1].strip("`"), cells[2].strip("`")
        if key.split(".")[0] in ("augmentation", "generate", "data"):
            rows.append((cells[0], key, yaml.safe_load(value)))
    return rows


def documented_orders() -> dict[str, list[str]]:
    text = RECIPE_DOC.read_text().split("## Step order", 1)[1].split("\n## ", 1)[0]
    orders = {}
    for line in text.splitlines():
        if line.startswith("- `"):
            name, steps = line[3:].split("`:", 1)
            orders[name] = [s.strip() for s in steps.split(",")]
    return orders


@functools.cache
def composed(recipe: str) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base=None):
        return compose(overrides=[f"+augmentation={recipe}"])


def config_value(recipe: str, key: str) -> object:
    group = key.split(".")[0]
    if group == "augmentation":
        cfg = composed(recipe)
    else:
        name = {"generate": "default", "data": "copies"}[group]
        cfg = OmegaConf.create({group: OmegaConf.load(CONF / group / f"{name}.yaml")})
    node = OmegaConf.select(cfg, key, default=_ABSENT)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def leaves(node, prefix: str = "augmentation") -> dict[str, object]:
    """Flattened config leaves, without `_target_`s and sources (not recipe parameters)."""
    out: dict[str, object] = {}
    if OmegaConf.is_dict(node):
        for k in node:
            if k in ("_target_", "source"):
                continue
            out.update(leaves(node[k], f"{prefix}.{k}"))
    else:
        out[prefix] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return out


def test_recipe_table_parses_and_covers_every_recipe():
    rows = recipe_table()
    assert len(rows) > 80
    assert {r for r, _, _ in rows} == set(D2LV_RECIPES)
    assert len({(r, k) for r, k, _ in rows}) == len(rows), "a (recipe, key) row is duplicated"


@pytest.mark.parametrize("recipe", D2LV_RECIPES)
def test_recipe_table_matches_the_configs(recipe):
    rows = [(k, v) for r, k, v in recipe_table() if r == recipe]
    for key, documented in rows:
        assert config_value(recipe, key) == documented, (recipe, key)
    # and every parameter is documented: all of the base's, and whatever a variant changes
    documented_keys = {k for k, _ in rows}
    base = leaves(composed("d2lv_base").augmentation)
    mine = leaves(composed(recipe).augmentation)
    if recipe == "d2lv_base":
        wanted = {k for k, v in mine.items() if not (v is None and k.count(".") == 2)}  # placeholders
    else:
        wanted = {k for k, v in mine.items() if base.get(k, _ABSENT) != v}
    assert not wanted - documented_keys, f"{recipe}: undocumented {sorted(wanted - documented_keys)}"


@pytest.mark.parametrize("recipe", sorted(documented_orders()))
def test_steps_run_in_the_seed_order(recipe):
    assert [k for k, _ in build(recipe).steps] == documented_orders()[recipe]


def test_generated_sets_default_to_jpeg_quality_100():
    assert OmegaConf.load(CONF / "generate" / "default.yaml").jpeg_quality == 100


def test_underlay_leaves_most_of_the_frame_to_the_copy(tmp_path, photo):
    # the underlay pastes a patch of another image (0.04-0.1 of ITS size) in the copy's top-left
    # quarter: the copy keeps its frame, unlike shrinking the copy onto a background
    magenta = (255, 0, 255)
    step = dict(build("d2lv_base", *with_pool(pool_dir(tmp_path, [magenta]))).steps)["paste_under"].transform
    copy = photo.resize((256, 256))
    for i in range(8):
        out = np.asarray(step(copy, rng_for(0, "under", i)))
        kept = (out == np.asarray(copy)).all(axis=-1)
        assert 0.8 <= kept.mean() < 1.0
        ys, xs = np.nonzero(~kept)
        assert ys.min() < 128 and xs.min() < 128  # the patch starts in the top-left quarter
        assert (out[~kept] == magenta).all()  # what changed is the other image
    shrunk = A.PasteOnBackground((0.04, 0.1), source=[Image.new("RGB", (500, 375), magenta)])
    assert (np.asarray(shrunk(copy, rng_for(0))) == np.asarray(copy)).all(axis=-1).mean() < 0.2


def test_larger_underlay_covers_more_but_not_all(tmp_path, photo):
    pool = with_pool(pool_dir(tmp_path, [(255, 0, 255)]))
    base = dict(build("d2lv_base", *pool).steps)["paste_under"].transform
    large = dict(build("u", *pool).steps)["paste_under"].transform
    copy = photo.resize((256, 256))

    def covered(t, i):
        return (np.asarray(t(copy, rng_for(1, i))) != np.asarray(copy)).any(axis=-1).mean()

    assert all(0 < covered(base, i) < covered(large, i) < 0.5 for i in range(6))


def test_overlay_shows_part_of_the_enlarged_copy_on_the_other_image(tmp_path):
    # a copy whose red/green channels encode its x/y: what shows on the other image tells which part
    white = (255, 255, 255)
    yy, xx = np.mgrid[0:256, 0:256]
    copy = Image.fromarray(np.stack([xx, yy, np.full_like(xx, 40)], axis=-1).astype(np.uint8))
    step = dict(build("d2lv_base", *with_pool(pool_dir(tmp_path, [white]))).steps)["scale_paste"].transform
    for i in range(6):
        out = step(copy, rng_for(0, "over", i))
        assert out.size == (500, 375)  # the other image is the canvas, at its own size
        a = np.asarray(out).astype(int)
        background = (a == white).all(axis=-1)
        shown = a[~background]
        assert 0.2 < (~background).mean() < 1.0  # the copy covers part, the background shows
        assert (shown[:, 2] < 100).all()  # nothing but the copy and the background
        assert shown[:, 0].max() < 230 and shown[:, 1].max() < 230  # its right and bottom are cut off
        assert shown[:, 0].min() < 10 and shown[:, 1].min() < 10  # from its top-left corner


def test_online_finetuning_pastes_its_training_images(tmp_path):
    from datamodules.copies import CopiesDataModule

    folder = pool_dir(tmp_path, [(255, 0, 255), (0, 255, 255)], size=(300, 200))
    recipe = build("d2lv_base")
    assert A.uses_default_source(recipe)  # built from YAML: textures until told otherwise
    dm = CopiesDataModule(sources=str(folder), recipe=recipe, num_workers=0)
    dm.setup()
    bound = dm.dataset.recipe
    assert not A.uses_default_source(bound) and A.uses_default_source(recipe)  # a bound copy
    under = dict(bound.steps)["paste_under"].transform
    out = np.asarray(under(synthetic_image(rng_for(0), (256, 256)), rng_for(0)))
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert (255, 0, 255) in colours or (0, 255, 255) in colours
    off = CopiesDataModule(sources=str(folder), recipe=recipe, num_workers=0, paste_from_sources=False)
    off.setup()
    assert A.uses_default_source(off.dataset.recipe)
    explicit = build("d2lv_base", *with_pool(folder))
    assert not A.uses_default_source(explicit)
    kept = CopiesDataModule(sources=str(folder), recipe=explicit, num_workers=0)
    kept.setup()
    assert dict(kept.dataset.recipe.steps)["paste_under"].transform.source.items == (
        dict(explicit.steps)["paste_under"].transform.source.items
    )


def test_with_default_source_keeps_explicit_sources():
    black = [Image.new("RGB", (20, 20), (0, 0, 0))]
    t = A.Compose({"a": A.RandomApply(A.ImageUnderlay()), "b": A.OneOf([A.ImageOverlay(source=black)])})
    bound = A.with_default_source(t, A.ImagePool([Image.new("RGB", (20, 20), (9, 9, 9))]))
    assert isinstance(dict(t.steps)["a"].transform.source, A.RandomTexture)
    assert dict(bound.steps)["a"].transform.source.items[0].getpixel((0, 0)) == (9, 9, 9)
    assert dict(bound.steps)["b"].transforms[0].source.items[0].getpixel((0, 0)) == (0, 0, 0)


def test_bw_variants_store_greyscale_originals(sources):
    for recipe in ("bw", "blur_bw", "color_bw", "face_bw"):
        original = A.generate_copies(sources[0], build(recipe), n=0, seed=0, image_id="x")[0]
        a = np.asarray(original)
        assert (
            original.size == (256, 256) and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
        )
    colour = np.asarray(A.generate_copies(sources[0], build("d2lv_base"), n=0, seed=0, image_id="x")[0])
    assert (colour[..., 0] != colour[..., 2]).any()


def test_color_bw_is_grey_where_no_later_overlay_paints(sources):
    later = [f"augmentation.transforms.{k}=null" for k in ("emoji", "text_1", "text_2", "scale_paste")]
    for out in outputs(build("color_bw", *later), sources):
        a = np.asarray(out)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_color_variant_draws_false_colours(photo):
    t = A.Colorize(1.0, color=None, black=None, white=None)
    grey = photo.convert("L").convert("RGB")
    outs = [np.asarray(t(grey, rng_for(0, i))).astype(int) for i in range(4)]
    assert all(np.abs(o[..., 0] - o[..., 2]).mean() > 5 for o in outs)  # a grey input comes out coloured
    darkest = np.unravel_index(np.asarray(grey)[..., 0].argmin(), grey.size[::-1])
    assert len({tuple(o[darkest]) for o in outs}) == 4  # the black point is drawn too


def test_symmetric_pad_mirrors_left_right_and_top_bottom(photo):
    for i in range(5):
        out = A.Pad((0.0, 0.1), color=(1, 2, 3), symmetric=True)(photo, rng_for(0, i))
        dw, dh = out.width - photo.width, out.height - photo.height
        assert dw % 2 == 0 and dh % 2 == 0 and dw <= 2 * 0.1 * photo.width and dh <= 2 * 0.1 * photo.height
        a = np.asarray(out)
        assert np.array_equal(
            a[dh // 2 : dh // 2 + photo.height, dw // 2 : dw // 2 + photo.width], np.asarray(photo)
        )


def test_perspective_sigma_in_pixels_scales_with_the_image(photo):
    img = photo.resize((256, 256))
    px = A.Perspective((20.0, 20.0), unit="px")
    frac = A.Perspective((20.0 / 256, 20.0 / 256))
    assert px(img, rng_for(0)).tobytes() == frac(img, rng_for(0)).tobytes()


def test_shuffle_pixels_moves_at_most_the_drawn_fraction(photo):
    src = np.asarray(photo).reshape(-1, 3)
    for f in (0.1, 0.4):
        out = np.asarray(A.ShufflePixels((f, f))(photo, rng_for(0))).reshape(-1, 3)
        moved = (out != src).any(axis=-1).mean()
        assert 0.5 * f < moved <= f + 1e-9


def test_degenerate_ends_are_no_edits(photo):
    img = photo.resize((64, 64))
    nothing = [
        A.EmojiOverlay((0.0, 0.0), category="smileys", x_pos=(0, 0.5), y_pos=(0, 0.5), relative_to="height"),
        A.EmojiOverlay((0.5, 0.5), opacity=(0.0, 0.0)),
        A.TextOverlay(length=(0, 0), lines=(1, 1), font="NotoNaskhArabic-Regular.ttf", charset=100),
        A.TextOverlay(font_size=(0.0, 0.0), length=(20, 20)),
        A.TextOverlay(opacity=(0.0, 0.0), length=(20, 20)),
        A.TextOverlay(length=(5, 5), lines=(0, 0)),
        A.ImageUnderlay((0.0, 0.0)),
        A.ShufflePixels((0.0, 0.0)),
        A.Pad((0.0, 0.0), symmetric=True),
        A.Perspective((0.0, 0.0), unit="px"),
    ]
    for t in nothing:
        for i in range(3):
            assert t(img, rng_for(0, i)).tobytes() == img.tobytes(), t
    one = A.Pixelize((1.0, 1.0), down="bicubic", up="bicubic")(img, rng_for(0))
    assert np.abs(as_array(one) - as_array(img)).max() <= 1


@pytest.mark.parametrize("end", ["low", "high"])
def test_base_recipe_runs_at_both_ends_of_every_range(end, sources, tmp_path):
    pick = 0 if end == "low" else 1
    ranges = {
        "pixelize": ("ratio", [0.1, 1.0]),
        "shuffle_pixels": ("factor", [0.0, 0.4]),
        "perspective": ("sigma", [0.0, 50.0]),
        "pad": ("amount", [0.0, 0.1]),
        "paste_under": ("scale", [0.04, 0.1]),
        "emoji": ("size", [0.0, 1.0]),
        "text_1": ("font_size", [0.0, 1.0]),
        "text_2": ("length", [0, 20]),
        "scale_paste": ("scale", [2.5, 3.5]),
    }
    overrides = [f"augmentation.transforms.{s}.p=1.0" for s in ranges] + [
        f"augmentation.transforms.{s}.transform.{k}=[{v[pick]},{v[pick]}]" for s, (k, v) in ranges.items()
    ]
    overrides += [
        f"augmentation.transforms.{s}.transform.opacity=[{pick}.0,{pick}.0]" for s in ("emoji", "text_1")
    ]
    t = build("d2lv_base", *overrides, *with_pool(pool_dir(tmp_path, [(0, 0, 0)])))
    for out in outputs(t, sources):
        assert out.size == (256, 256) and out.mode == "RGB"


@pytest.mark.parametrize("recipe", D2LV_RECIPES)
def test_recipe_is_deterministic_per_seed(recipe, sources, tmp_path):
    pool = with_pool(pool_dir(tmp_path, [(255, 0, 255), (0, 128, 255)]))
    a, b = build(recipe, *pool), build(recipe, *pool)
    first = [x.tobytes() for x in outputs(a, sources, seed=3)]
    assert first == [x.tobytes() for x in outputs(b, sources, seed=3)]
    assert first != [x.tobytes() for x in outputs(a, sources, seed=4)]
