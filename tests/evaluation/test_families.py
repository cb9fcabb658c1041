"""D2LV's model families: settings, the images each family sees, votes within a family, the 33-model recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from conftest import compose_cfg
from PIL import Image, ImageFilter

from isc.evaluation.aggregate import Candidates, keep_voted
from isc.evaluation.extract import extract
from isc.evaluation.families import Family, ImagePrep
from isc.evaluation.inference import _Plan
from isc.evaluation.settings import EvaluationSettings
from isc.evaluation.views import query_views
from isc.models.descriptor import DescriptorModel
from isc.models.pooling import GeM
from isc.models.trunks import efficientnet_lite0

FAMILIES = [
    {"name": "base", "models": ["b1.ckpt", "b2.ckpt", "b3.ckpt"], "min_size": 200},
    {"name": "blur_bw", "models": ["g1.ckpt", "g2.ckpt"], "grey": True, "blur": 5.0, "min_size": 100},
]


def _settings(**ensemble) -> EvaluationSettings:
    return EvaluationSettings.from_dict(
        {
            "local_verification": {"enabled": True, "reference_crops": True},
            "ensemble": {"families": FAMILIES, **ensemble},
        }
    )


def test_families_list_their_models_in_order_and_name_each_models_family():
    e = _settings().ensemble
    assert e.models == ("b1.ckpt", "b2.ckpt", "b3.ckpt", "g1.ckpt", "g2.ckpt")
    np.testing.assert_array_equal(e.family_of_model(5), [0, 0, 0, 1, 1])
    assert [e.family(m).name for m in range(5)] == ["base"] * 3 + ["blur_bw"] * 2
    assert e.voters == 2  # the smallest family
    grey = e.families[1]
    assert grey.prep("queries") == ImagePrep(grey=True, blur=0.0)  # the seed blurs no query
    assert grey.prep("references") == ImagePrep(grey=True, blur=5.0)
    assert e.families[0].prep("training") is None


@pytest.mark.parametrize(
    ("ensemble", "message"),
    [
        ({"models": ["x.ckpt"]}, "both given"),
        ({"min_votes": 3}, "between 1 and the 2 models of the smallest family"),
        ({"rule": "concat"}, "rule must be vote"),
        ({"combine": "mean"}, "combine pool"),
        ({"families": [FAMILIES[0], {**FAMILIES[1], "name": "base"}]}, "names must be unique"),
        ({"families": [{"name": "a", "models": []}]}, r"\['a'\]\.models must be a non-empty list"),
        ({"families": [{"name": "a", "models": ["m"], "blur": -1}]}, "blur must be >= 0"),
        ({"families": [{"name": "a", "models": ["m"], "gray": True}]}, r"unknown key\(s\) \['gray'\]"),
        ({"families": [{"models": ["m"]}]}, "needs a name and its models"),
    ],
)
def test_family_settings_that_cannot_work_are_refused_naming_the_key(ensemble, message):
    with pytest.raises(ValueError, match=message):
        _settings(**ensemble)


def test_models_vote_only_with_their_own_family():
    """Hand-worked: models 0, 1 form family 0 and models 2, 3 family 1; 2 votes needed.

    pair (view 0, ref 0): models 0 and 2 (one per family) -> no family has 2 votes: dropped with families,
    kept without; pair (view 1, ref 0): models 0 and 1 -> kept either way; pair (view 2, ref 1): models
    2 and 3 -> kept either way."""
    model = np.array([0, 2, 0, 1, 2, 3])
    view = np.array([0, 0, 1, 1, 2, 2])
    reference = np.array([0, 0, 0, 0, 1, 1])
    zeros = np.zeros(6, dtype=np.int64)
    c = Candidates(view, reference, np.linspace(1, 0, 6), view, zeros, zeros, model)
    family = np.array([0, 0, 1, 1])[model]
    np.testing.assert_array_equal(keep_voted(c, 2), [True] * 6)
    np.testing.assert_array_equal(keep_voted(c, 2, family=family), [False, False, True, True, True, True])


def test_a_familys_images_are_changed_before_the_model_sees_them(tmp_path: Path):
    """Extraction with a prep equals extraction of copies changed beforehand (an independent path)."""
    model = DescriptorModel(efficientnet_lite0(pretrained=True), GeM(p=3.0))
    prep = ImagePrep(grey=True, blur=2.0)
    plain, changed = [], []
    for name in ("astronaut", "coffee"):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        image.thumbnail((96, 96))
        plain.append(tmp_path / f"{name}.png")
        image.save(plain[-1])
        changed.append(tmp_path / f"{name}-changed.png")
        image.convert("L").convert("RGB").filter(ImageFilter.GaussianBlur(2.0)).save(changed[-1])
    options = {"scales": [64], "num_workers": 0, "progress": False}
    with_prep = extract(model, plain, prepare=prep, **options).vectors
    np.testing.assert_allclose(with_prep, extract(model, changed, **options).vectors, atol=1e-5)
    assert not np.allclose(with_prep, extract(model, plain, **options).vectors, atol=1e-3)
    # the prep is part of the cache key: a cached colour extraction is not read back for grey
    cache = tmp_path / "cache"
    colour = extract(model, plain, cache_dir=cache, **options).vectors
    grey = extract(model, plain, prepare=prep, cache_dir=cache, **options).vectors
    np.testing.assert_allclose(grey, with_prep, atol=1e-6)
    assert not np.allclose(colour, grey, atol=1e-3)


def test_each_models_plan_sees_its_familys_images_and_only_the_first_family_searches_crops():
    s = _settings()
    paths = {
        split: [Path(f"/{split}/{i}.jpg") for i in range(3)]
        for split in ("queries", "references", "training")
    }
    views = query_views
    base, grey = (_Plan.of(paths, [256], views, s, "", m) for m in (0, 3))
    assert base.queries.prepare is None and base.blocks[0].whole.prepare is None and base.crops
    assert base.blocks[0].crops is not None
    assert grey.queries.prepare == ImagePrep(grey=True)
    assert grey.blocks[0].whole.prepare == ImagePrep(grey=True, blur=5.0)
    assert grey.training[0].prepare == ImagePrep(grey=True, blur=5.0)
    assert not grey.crops and grey.blocks[0].crops is None


def test_the_33_model_recipe_has_the_seeds_families():
    """experiment=d2lv_inference_families: 11 families of 3 as Test/README.md:7-21 and combine.py:45-78."""
    cfg = compose_cfg(["experiment=d2lv_inference_families", "d2lv_models=/models"])
    from tasks.common import evaluation_settings

    e = evaluation_settings(cfg).ensemble
    got = {f.name: (f.grey, f.blur, f.min_size, len(f.models)) for f in e.families}
    assert got == {
        "base": (False, 0.0, 200, 3),
        "blur": (False, 5.0, 100, 3),
        "face": (False, 0.0, 100, 3),
        "color": (False, 0.0, 100, 3),
        "dark": (False, 0.0, 100, 3),
        "bw": (True, 0.0, 200, 3),
        "u": (False, 0.0, 200, 3),
        "color_bw": (True, 0.0, 200, 3),
        "blur_bw": (True, 5.0, 100, 3),
        "face_bw": (True, 0.0, 150, 3),
        "opa": (False, 0.0, 200, 3),
    }
    assert e.families[0].name == "base"  # the family that searches the reference crops
    assert len(e.models) == 33 and e.models[0] == "/models/base_r50.ckpt"
    assert (e.min_votes, e.crop_votes, e.rule, e.combine) == (2, 3, "vote", "pool")


def test_family_is_a_frozen_setting():
    f = Family("a", ("m",))
    with pytest.raises(AttributeError):
        f.grey = True  # type: ignore[misc]


def test_each_family_drops_the_rows_of_views_under_its_own_min_size():
    """Hand-worked: query 0 has a 300-px original (view 0) and a 100-px crop (view 1); family a keeps
    views of 40 px and more, family b of 150 px (the seed's clean_small_query / _150 per family)."""
    from isc.evaluation import inference
    from isc.evaluation.views import View

    rows = inference.TestStageRows(
        Candidates(
            query=np.zeros(3, dtype=np.int64),
            reference=np.array([0, 1, 2]),
            score=np.array([0.9, 0.95, 0.6]),
            query_view=np.array([1, 1, 0]),
            reference_view=np.zeros(3, dtype=np.int64),
            scale=np.zeros(3, dtype=np.int64),
            model=np.array([0, 1, 1]),
        ),
        [View("original", (0, 0, 300, 300)), View("crop", (0, 0, 100, 100))],
        [(300, 300)] * 3,
        ["224 px"],
    )
    families = [
        {"name": "a", "models": ["m0"], "min_size": 40},
        {"name": "b", "models": ["m1"], "min_size": 150},
    ]
    s = EvaluationSettings.from_dict(
        {
            "score_normalization": {"enabled": False},
            "local_verification": {"enabled": True},
            "ensemble": {"families": families, "min_votes": 1},
        }
    )
    ids = {"queries": ["Q0"], "references": ["R0", "R1", "R2"]}
    stages = inference._stages(rows, s, ids, None, np.ones((2, 1)), 0.0, np.zeros(2))
    assert stages[-1].stage.name == "+ ensemble"
    p = stages[-1].stage.predictions
    got = {(q, r): round(float(x), 4) for q, r, x in zip(p.query_ids, p.reference_ids, p.scores, strict=True)}
    # family a's crop row stays (0.9 - 0.05 penalty); family b's crop row is under its 150 px: dropped
    assert got == {("Q0", "R0"): 0.85, ("Q0", "R2"): 0.6}
