"""D2LV's test stage end to end on a tiny photo benchmark: the joins between views, search and scoring."""

from __future__ import annotations

import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
from conftest import compose_cfg
from PIL import Image

import run
import tasks
from isc.evaluation import inference
from isc.evaluation.aggregate import Candidates
from isc.evaluation.extract import extract
from isc.evaluation.inference import ConcatModel, run_test_stage
from isc.evaluation.matching import match_descriptors
from isc.evaluation.settings import EvaluationSettings
from isc.evaluation.views import View
from isc.formats.pair_csv import read_predictions, write_ground_truth
from isc.formats.pairs import GroundTruth
from isc.models.descriptor import DescriptorModel, save_descriptor_model
from isc.models.pooling import GeM
from isc.models.trunks import efficientnet_lite0

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "colorwheel",
    "hubble_deep_field",
]
OTHERS = ["camera", "coins", "moon", "horse", "clock", "brick", "grass", "gravel", "page"]


def _photo(name: str, side: int = 192) -> Image.Image:
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    image.thumbnail((side, side))
    return image


@pytest.fixture(scope="module")
def photo_benchmark(tmp_path_factory) -> Path:
    """7 references; queries: a small crop, a paste into another photo, a rotation, an exact copy, 3 unmatched."""
    root = tmp_path_factory.mktemp("photos")
    for split in ("references", "queries", "training"):
        (root / split).mkdir()
    refs = [_photo(n) for n in PHOTOS]
    for i, image in enumerate(refs):
        image.save(root / "references" / f"R{i:06d}.jpg", quality=95)
    for i, name in enumerate(OTHERS[3:]):
        _photo(name).save(root / "training" / f"T{i:06d}.jpg", quality=95)
    w, h = refs[0].size
    crop = refs[0].crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)).resize((192, 192))
    background = _photo(OTHERS[0], 288).resize((288, 288))
    background.paste(refs[1].resize((refs[1].width // 2, refs[1].height // 2)), (150, 160))
    queries = [crop, background, refs[2].transpose(Image.Transpose.ROTATE_90), refs[3]]
    queries += [_photo(n) for n in OTHERS[:3]]
    q_ids = [f"Q{i:05d}" for i in range(len(queries))]
    for qid, image in zip(q_ids, queries, strict=True):
        image.save(root / "queries" / f"{qid}.jpg", quality=95)
    write_ground_truth(
        root / "ground_truth.csv",
        GroundTruth(q_ids, ["R000000", "R000001", "R000002", "R000003", "", "", ""]),
    )
    return root


def _splits(root: Path) -> tuple[dict, dict]:
    paths = {s: sorted((root / s).glob("*.jpg")) for s in ("queries", "references", "training")}
    ids = {s: [p.stem for p in v] for s, v in paths.items()}
    return paths, ids


def _model() -> DescriptorModel:
    return DescriptorModel(efficientnet_lite0(pretrained=True), GeM(p=3.0))


SETTINGS = dict(
    num_workers=0,
    batch_size=16,
    k=5,
    score_normalization={"enabled": True, "beta": 1.0, "k": 2},
    scales=[128, 160],
    local_verification={
        "enabled": True,
        "reference_crops": True,
        "query": {"min_size": 40, "proposals": {"max_proposals": 4}},
    },
)


def _settings(**changes) -> EvaluationSettings:
    values = {**SETTINGS, **changes}
    return EvaluationSettings.from_dict(values)


@pytest.fixture(scope="module")
def full_run(photo_benchmark):
    paths, ids = _splits(photo_benchmark)
    gt = GroundTruth(
        *zip(
            *[line.split(",") for line in (photo_benchmark / "ground_truth.csv").read_text().split()[1:]],
            strict=True,
        )
    )
    return run_test_stage([_model()], paths, ids, _settings(), gt), paths, ids, gt


def test_global_stage_equals_the_single_descriptor_path(full_run):
    result, paths, ids, gt = full_run
    model = _model()
    plain = _settings(scales=None, local_verification={"enabled": False}, image_size=128)
    descriptors = {
        s: extract(model, paths[s], scales=[128], batch_size=16, num_workers=0, progress=False).vectors
        for s in paths
    }
    expected = match_descriptors(
        np.asarray(ids["queries"]),
        descriptors["queries"],
        np.asarray(ids["references"]),
        descriptors["references"],
        descriptors["training"],
        gt,
        plain,
    )
    stage = result.stages[0]
    assert stage.name == "global"
    assert stage.metrics.uAP == pytest.approx(expected.metrics.uAP, abs=1e-6)
    got = {
        (q, r): s
        for q, r, s in zip(
            stage.predictions.query_ids,
            stage.predictions.reference_ids,
            stage.predictions.scores,
            strict=True,
        )
    }
    want = {
        (q, r): s
        for q, r, s in zip(
            expected.predictions.query_ids,
            expected.predictions.reference_ids,
            expected.predictions.scores,
            strict=True,
        )
    }
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=1e-5)


def test_stages_are_cumulative_and_outputs_meet_the_official_rules(full_run):
    result, paths, ids, gt = full_run
    assert [s.name for s in result.stages] == [
        "global",
        "+ multi-scale",
        "+ local verification",
        "+ reference crops",
    ]
    final = result.final.predictions
    final.check_no_duplicates()
    assert len(final) <= 500_000
    # each stage's time per query covers what it adds: the crop stage its references' 18 crops
    times = [st.seconds_per_query for st in result.stages]
    assert all(t is not None and t > 0 for t in times)
    assert times[0] < times[1] < times[2] < times[3]  # type: ignore[operator]
    # every query view lies inside its image, the original first, and the crops really are crops
    kinds = [v.kind for v in result.rows.query_views]
    assert {"original", "rotation", "crop"} <= set(kinds)
    for v in result.rows.query_views:
        assert v.box[0] >= 0 and v.box[1] >= 0
    # the local stage holds every pair the global stage found with a score at least as high minus the penalty
    g = result.stages[0].predictions
    local = {(q, r): s for q, r, s in zip(final.query_ids, final.reference_ids, final.scores, strict=True)}
    for q, r in zip(g.query_ids, g.reference_ids, strict=True):
        assert (q, r) in local
    # reference crops score only the original query (D2LV's OQ + AR)
    c = result.rows.candidates
    crop_rows = c.reference_view > 0
    assert crop_rows.any()
    assert {result.rows.query_views[i].kind for i in c.query_view[crop_rows]} == {"original"}
    assert set(c.scale[crop_rows].tolist()) == {0}
    # the crop search's whole-reference rows (crop _0, reference view 1) are kept, as the seed keeps them:
    # the same original view against the same whole reference as the views' search, scored the same
    whole_of_crops = np.flatnonzero(c.reference_view == 1)
    assert len(whole_of_crops) and set(c.reference_view[crop_rows].tolist()) > {1}
    views_search = {
        (int(c.query_view[i]), int(c.reference[i])): float(c.score[i])
        for i in np.flatnonzero((c.reference_view == 0) & (c.scale == 0))
    }
    for i in whole_of_crops:
        key = (int(c.query_view[i]), int(c.reference[i]))
        if key in views_search:
            assert float(c.score[i]) == pytest.approx(views_search[key], abs=1e-5)


def test_rows_of_small_views_are_dropped_after_the_search_originals_too():
    # query 0: a 50 x 50 original; query 1: a 300 x 300 original and a 100 x 100 crop; min_size 80
    views = [
        View("original", (0, 0, 50, 50)),
        View("original", (0, 0, 300, 300)),
        View("crop", (0, 0, 100, 100)),
    ]
    rows = inference.TestStageRows(
        Candidates(
            query=np.array([0, 1, 1, 0]),
            reference=np.array([0, 1, 0, 2]),
            score=np.array([0.9, 0.8, 0.95, 0.7]),
            query_view=np.array([0, 1, 2, 0]),
            reference_view=np.array([0, 0, 0, 1]),  # the last row: the reference-crop search's
            scale=np.zeros(4, dtype=np.int64),
            model=np.zeros(4, dtype=np.int64),
        ),
        views,
        [(100, 100)] * 3,
        ["224 px"],
    )
    s = EvaluationSettings.from_dict(
        {
            "score_normalization": {"enabled": False},
            "local_verification": {"enabled": True, "reference_crops": True, "query": {"min_size": 80}},
        }
    )
    ids = {"queries": ["Q0", "Q1"], "references": ["R0", "R1", "R2"]}
    stages = inference._stages(rows, s, ids, None, np.ones((1, 1)), 0.0, np.zeros(1))

    def pairs(i: int) -> dict[tuple[str, str], float]:
        p = stages[i].stage.predictions
        return {
            (q, r): round(float(x), 4) for q, r, x in zip(p.query_ids, p.reference_ids, p.scores, strict=True)
        }

    assert pairs(0) == {("Q0", "R0"): 0.9, ("Q1", "R1"): 0.8}  # the global stage filters nothing
    # local verification: Q0's tiny original loses its row; Q1's 100-px crop stays (0.95 - 0.05)
    assert pairs(1) == {("Q1", "R1"): 0.8, ("Q1", "R0"): 0.9}
    # the reference-crop search's rows are not filtered by size (the seed cleans that CSV of faces only)
    assert pairs(2) == {("Q1", "R1"): 0.8, ("Q1", "R0"): 0.9, ("Q0", "R2"): 0.65}


@pytest.mark.slow  # two test-stage runs
def test_face_references_lose_their_crop_rows_and_nothing_else(photo_benchmark):
    paths, ids = _splits(photo_benchmark)
    base = dict(scales=[128], local_verification={"enabled": False, "reference_crops": True})
    plain = run_test_stage([_model()], paths, ids, _settings(**base))
    faces = dict(
        base, local_verification={**base["local_verification"], "reference_faces": {"enabled": True}}
    )
    cleaned = run_test_stage([_model()], paths, ids, _settings(**faces))
    a, b = plain.rows.candidates, cleaned.rows.candidates
    # the cascade finds one face among the 7 references: the astronaut, R000000 (index 0)
    face_crop_rows = (a.reference == 0) & (a.reference_view >= 1)
    assert face_crop_rows.any() and not ((b.reference == 0) & (b.reference_view >= 1)).any()
    rest = a.take(~face_crop_rows)
    for column in ("query", "reference", "query_view", "reference_view", "scale", "model"):
        np.testing.assert_array_equal(getattr(b, column), getattr(rest, column))
    np.testing.assert_allclose(b.score, rest.score, atol=1e-6)
    assert plain.stages[0].predictions.scores.tolist() == cleaned.stages[0].predictions.scores.tolist()


def test_blocked_reference_search_gives_the_same_candidates(full_run, photo_benchmark):
    result, paths, ids, gt = full_run
    blocked = run_test_stage([_model()], paths, ids, _settings(reference_block=2), gt)
    for a, b in zip(result.stages, blocked.stages, strict=True):
        assert a.metrics.uAP == pytest.approx(b.metrics.uAP, abs=1e-6)
        np.testing.assert_allclose(np.sort(a.predictions.scores), np.sort(b.predictions.scores), atol=1e-5)


def test_two_identical_models_vote_like_one_and_a_stranger_vetoes(full_run):
    result, paths, ids, gt = full_run
    two = run_test_stage(
        [_model(), _model()], paths, ids, _settings(ensemble={"models": ["a", "b"], "min_votes": 2}), gt
    )
    assert two.stages[-1].name == "+ ensemble"
    # identical models return identical rows: pooling them changes no pair score
    same = two.stages[-1].predictions
    before = result.final.predictions
    assert sorted(zip(same.query_ids, same.reference_ids, strict=True)) == sorted(
        zip(before.query_ids, before.reference_ids, strict=True)
    )
    np.testing.assert_allclose(np.sort(same.scores), np.sort(before.scores), atol=1e-5)
    # a second model that sees different things keeps only the pairs both return
    stranger = DescriptorModel(efficientnet_lite0(pretrained=False), GeM(p=3.0))
    mixed = run_test_stage(
        [_model(), stranger], paths, ids, _settings(ensemble={"models": ["a", "b"], "min_votes": 2}), gt
    )
    voted = set(
        zip(mixed.stages[-1].predictions.query_ids, mixed.stages[-1].predictions.reference_ids, strict=True)
    )
    alone = set(
        zip(mixed.stages[-2].predictions.query_ids, mixed.stages[-2].predictions.reference_ids, strict=True)
    )
    assert voted < alone


def test_the_cap_keeps_the_best_pairs(full_run):
    result, paths, ids, gt = full_run
    capped = run_test_stage([_model()], paths, ids, _settings(max_predictions=7), gt)
    top = np.sort(result.final.predictions.scores)[::-1][:7]
    np.testing.assert_allclose(np.sort(capped.final.predictions.scores)[::-1], top, atol=1e-5)


TEST_STAGE = [
    "evaluation.num_workers=0",
    "evaluation.k=5",
    "evaluation.score_normalization.k=2",
    "evaluation.scales=[128,160]",
    "evaluation.local_verification.enabled=true",
    "evaluation.local_verification.query.min_size=40",
    "evaluation.local_verification.query.proposals.max_proposals=4",
]


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.ids.add(a.get("data-image-id", ""))


def test_task_evaluate_writes_stages_report_and_files(photo_benchmark, tmp_path):
    out = tmp_path / "eval"
    cfg = compose_cfg(
        [
            f"dataset.root={photo_benchmark}",
            "evaluation.whitening.enabled=true",
            "evaluation.whitening.dim=4",
            *TEST_STAGE,
        ],
        out,
    )
    out.mkdir(exist_ok=True)
    metrics = tasks.evaluate(cfg)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert list(on_disk["stages"]) == ["global", "+ multi-scale", "+ local verification"]
    assert on_disk["uAP"] == pytest.approx(on_disk["stages"]["+ local verification"]["uAP"])
    assert metrics["uAP"] == on_disk["uAP"]
    predictions = read_predictions(out / "predictions.csv")
    predictions.check_no_duplicates()
    with h5py.File(out / "descriptors.h5") as f:
        names = [n.decode() for n in f["query_ids"][:]]
        assert names == sorted(names)
        assert f["query"].shape == (7, 4)  # whitened to 4 dims, one descriptor per query
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    shown_queries = {i for i in parser.ids if i.startswith("Q")}
    assert shown_queries and shown_queries <= set(predictions.query_ids) | {
        "Q00000",
        "Q00001",
        "Q00002",
        "Q00003",
    }


def test_task_predict_needs_no_ground_truth(photo_benchmark, tmp_path):
    root = tmp_path / "no_gt"
    for split in ("queries", "references"):
        (root / split).mkdir(parents=True)
        for p in (photo_benchmark / split).iterdir():
            (root / split / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "predict"
    out.mkdir(exist_ok=True)
    cfg = compose_cfg(
        ["task=predict", f"dataset.root={root}", *TEST_STAGE, "evaluation.score_normalization.enabled=false"],
        out,
    )
    metrics = run.run_task(cfg)
    assert metrics is None  # nothing to score
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".csv", ".h5")) == [
        "descriptors.h5",
        "predictions.csv",
    ]
    assert not (out / "report.html").exists()
    assert len(read_predictions(out / "predictions.csv")) > 0


def test_ensemble_files_load_before_any_image(photo_benchmark, tmp_path):
    model_file = save_descriptor_model(_model(), tmp_path / "m.pt")
    out = tmp_path / "ens"
    out.mkdir(exist_ok=True)
    cfg = compose_cfg(
        [
            f"dataset.root={photo_benchmark}",
            *TEST_STAGE,
            f"evaluation.ensemble.models=[{model_file},{tmp_path / 'missing.pt'}]",
        ],
        out,
    )
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        tasks.evaluate(cfg)
    assert not (out / "predictions.csv").exists()


def test_concat_ensemble_whitens_to_concat_dim(photo_benchmark, tmp_path):
    model_file = save_descriptor_model(_model(), tmp_path / "m.pt")
    out = tmp_path / "concat"
    out.mkdir(exist_ok=True)
    cfg = compose_cfg(
        [
            f"dataset.root={photo_benchmark}",
            *TEST_STAGE,
            "evaluation.local_verification.enabled=false",
            f"evaluation.ensemble.models=[{model_file},{model_file}]",
            "evaluation.ensemble.rule=concat",
            "evaluation.ensemble.min_votes=1",
            "evaluation.ensemble.concat_dim=5",
        ],
        out,
    )
    tasks.evaluate(cfg)
    with h5py.File(out / "descriptors.h5") as f:
        assert f["query"].shape[1] == 5


def test_concat_model_is_the_normalised_concatenation():
    import torch

    a, b = _model().eval(), _model().eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        out = ConcatModel([a, b])(x)
        expected = torch.nn.functional.normalize(torch.cat([a(x), b(x)], dim=1), dim=1)
    torch.testing.assert_close(out, expected)
    assert ConcatModel([a, b]).dim == a.dim + b.dim


def test_d2lv_inference_recipe_has_the_seeds_values_and_asks_for_its_models(tmp_path):
    cfg = compose_cfg(["experiment=d2lv_inference", "evaluation.ensemble.models=[a.pt,b.pt,c.pt]"], tmp_path)
    s = tasks.common.evaluation_settings(cfg)
    assert s.scales == (256, 320, 200) and s.multiscale == "max"
    w, sn = s.whitening, s.score_normalization
    # Test/final/V5_baseline_CC/: extract_features.py:123/254/266, extract_reference_50.sh,
    # score_normalization_50.sh
    assert (w.enabled, w.dim, w.raw, w.samples, w.seed, w.eigen_power) == (True, 1500, True, 20000, 123, -0.5)
    assert (sn.enabled, sn.beta, sn.k, s.max_training) == (True, 2.0, 10, None)  # every training image
    assert (s.gem_p, s.candidates, s.max_results) == (3.0, "range", 1_000_000)
    lv, e = s.local_verification, s.ensemble
    assert (lv.enabled, lv.reference_crops, lv.penalty, lv.top, lv.query.min_size) == (
        True,
        True,
        0.05,
        2,
        200,
    )
    # every proposal at full resolution (selective_search_nms.py:53-80); faces drop crop rows (combine.py:47-48)
    pr = lv.query.proposals
    assert (pr.max_proposals, pr.max_side, pr.min_pixels) == (None, None, 2000)
    assert lv.reference_faces.enabled and not EvaluationSettings().local_verification.reference_faces.enabled
    assert (e.models, e.rule, e.min_votes) == (("a.pt", "b.pt", "c.pt"), "vote", 2)
    track = tasks.common.evaluation_settings(compose_cfg(["task=evaluate", "evaluation=d2lv_256"], tmp_path))
    assert (track.whitening.dim, track.whitening.raw, track.descriptor_track_max_dim) == (256, True, 256)
    with pytest.raises(ValueError, match="evaluation.ensemble.models="):
        run.run_task(compose_cfg(["experiment=d2lv_inference"], tmp_path / "missing"))


def test_the_report_and_its_figures_reach_wandb(photo_benchmark, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wandb_run"
    out.mkdir(exist_ok=True)
    cfg = compose_cfg(
        [f"dataset.root={photo_benchmark}", "logger=wandb", "evaluation.image_size=128", *TEST_STAGE[:3]], out
    )
    metrics = tasks.evaluate(cfg)
    assert (out / "metrics.json").exists() and Path(metrics["report"]).exists()
    media = list((out / "wandb").glob("offline-run-*/files/media/**/*"))
    names = " ".join(p.name for p in media)
    assert "report" in names and "pr_curve" in names


def test_descriptor_track_limit_is_checked_before_extraction(photo_benchmark, tmp_path):
    out = tmp_path / "track"
    out.mkdir(exist_ok=True)
    cfg = compose_cfg(
        [f"dataset.root={photo_benchmark}", *TEST_STAGE, "evaluation.descriptor_track_max_dim=256"], out
    )
    with pytest.raises(ValueError, match="1280 dims but evaluation.descriptor_track_max_dim=256"):
        tasks.evaluate(cfg)
    assert not (out / "predictions.csv").exists()


def _same_result(a, b) -> None:
    for x, y in zip(a.stages, b.stages, strict=True):
        assert x.name == y.name
        assert x.predictions.query_ids.tolist() == y.predictions.query_ids.tolist()
        assert x.predictions.reference_ids.tolist() == y.predictions.reference_ids.tolist()
        np.testing.assert_array_equal(x.predictions.scores, y.predictions.scores)
    np.testing.assert_array_equal(a.query, b.query)
    np.testing.assert_array_equal(a.reference, b.reference)
    assert a.rows.query_views == b.rows.query_views and a.rows.reference_sizes == b.rows.reference_sizes


def test_the_test_stage_resumes_from_its_cache(full_run, tmp_path: Path) -> None:
    """Each extraction (training, query views, every reference block and its crops) is kept as it
    finishes: a run killed in block 2 keeps the rest, and its rerun gives the uncached result."""
    result, paths, ids, gt = full_run
    settings = _settings(reference_block=3)
    model, calls = _model(), []
    model.register_forward_hook(lambda *args: calls.append(1))
    fresh = run_test_stage([model], paths, ids, settings, gt)  # no cache
    n_forward = len(calls)

    cache = tmp_path / "cache"
    shards = lambda: sorted(cache.rglob("shard-*.h5"))  # noqa: E731  (<key>/<listing name>/shard-N.h5)
    files = lambda: sorted(p.parent.name for p in shards())  # noqa: E731
    calls.clear()
    first = run_test_stage([model], paths, ids, settings, gt, cache_dir=cache)
    assert len(calls) == n_forward  # a cold cache computes everything once
    names = files()
    assert names[:2] == ["queries", "references-000000000"]
    assert "training-000000000" in names and "training-000000003" in names  # 6 images, blocks of 3
    assert "references-000000003-crops" in names
    _same_result(first, fresh)

    calls.clear()
    again = run_test_stage([model], paths, ids, settings, gt, cache_dir=cache)
    assert calls == []  # every extraction read back: no forward pass at all
    _same_result(again, fresh)

    for p in shards():  # as if killed before the second block finished
        if p.parent.name.startswith("references-000000003"):
            p.unlink()
    next(p for p in shards() if p.parent.name == "queries").write_bytes(b"truncated")  # and a corrupt piece
    calls.clear()
    resumed = run_test_stage([model], paths, ids, settings, gt, cache_dir=cache)
    assert 0 < len(calls) < n_forward
    _same_result(resumed, fresh)
    assert files() == names


@pytest.mark.parametrize("combine", ["pool", "mean"])
def test_aggregating_queries_in_blocks_changes_no_prediction(full_run, combine):
    """Penalty, votes and the top-2 rule each group rows of one query, so query blocks of any size give
    the unblocked stages exactly: same pairs, same order, same scores (the cap applied to each block
    and again overall). Two models: the run's rows and a noisy copy missing every third row."""
    from isc.evaluation.aggregate import Candidates
    from isc.evaluation.inference import TestStageRows, _stages

    result, _, ids, gt = full_run
    c = result.rows.candidates
    rng = np.random.default_rng(0)
    other = c.take(np.flatnonzero(np.arange(len(c)) % 3 != 0))
    other = dataclasses.replace(
        other.with_scores(other.score + rng.normal(0, 0.01, len(other)).astype(np.float32)),
        model=np.ones(len(other), dtype=np.int32),
    )
    rows = dataclasses.replace(result.rows, candidates=Candidates.concat([c, other]))
    assert isinstance(rows, TestStageRows)
    ensemble = {"models": ["a", "b"], "min_votes": 2, "combine": combine}
    forward = np.ones((2, len(rows.scale_names)))

    def stages(**changes):
        s = _settings(ensemble=ensemble, max_predictions=40, **changes)
        return [x.stage for x in _stages(rows, s, ids, gt, forward, 0.0)]

    whole = stages(query_block=10**6)
    assert [x.name for x in whole][-1] == "+ ensemble" and len(whole[-1].predictions) == 40
    for size in (1, 3):
        for a, b in zip(whole, stages(query_block=size), strict=True):
            assert a.predictions.query_ids.tolist() == b.predictions.query_ids.tolist()
            assert a.predictions.reference_ids.tolist() == b.predictions.reference_ids.tolist()
            np.testing.assert_array_equal(a.predictions.scores, b.predictions.scores)
            assert a.metrics.uAP == b.metrics.uAP


def test_training_in_blocks_with_a_whitening_sample_gives_the_one_block_result(full_run):
    """Score normalisation searches the training set block by block (each query view's running top-k),
    and the whitening is fitted on its sample, extracted on its own when the training set spans several
    blocks: the same figures as the whole training set in one block."""
    _, paths, ids, gt = full_run
    cheap = {"scales": [128], "local_verification": {"enabled": False}}  # the training path is the same
    plain = run_test_stage([_model()], paths, ids, _settings(**cheap), gt)
    whitening = {"enabled": True, "dim": 3, "samples": 5}
    one = run_test_stage([_model()], paths, ids, _settings(whitening=whitening, **cheap), gt)
    blocked = run_test_stage(
        [_model()], paths, ids, _settings(whitening=whitening, reference_block=2, **cheap), gt
    )
    assert len(paths["training"]) == 6
    for a, b in zip(one.stages, blocked.stages, strict=True):
        assert a.metrics.uAP == pytest.approx(b.metrics.uAP, abs=1e-6)
        assert sorted(zip(a.predictions.query_ids, a.predictions.reference_ids, strict=True)) == sorted(
            zip(b.predictions.query_ids, b.predictions.reference_ids, strict=True)
        )
        np.testing.assert_allclose(np.sort(a.predictions.scores), np.sort(b.predictions.scores), atol=1e-5)
    np.testing.assert_allclose(one.training, blocked.training, atol=1e-5)
    assert one.training.shape == (6, 3)
    # the whitening changed the figures: the sample was used, not ignored
    whitened, raw = np.sort(one.final.predictions.scores), np.sort(plain.final.predictions.scores)
    assert len(whitened) != len(raw) or not np.allclose(whitened, raw)


def test_the_whitening_sample_is_the_seeds_draw():
    """D2LV draws ``RandomState(123).choice(n, size, replace=False)``, which is the first ``size`` of
    ``RandomState(123).permutation(n)``; the sample is those rows in index order."""
    s = _settings(whitening={"enabled": True, "dim": 3, "samples": 4})
    np.testing.assert_array_equal(
        s.whitening_sample(10), np.sort(np.random.RandomState(123).permutation(10)[:4])
    )
    assert s.whitening_sample(4) is None  # as many as there are: all of them
    assert _settings(whitening={"enabled": True, "dim": 3, "samples": None}).whitening_sample(10) is None
    with pytest.raises(ValueError, match="exceeds the 2 training images the PCA is fitted on"):
        _settings(whitening={"enabled": True, "dim": 3, "samples": 2}).for_training_set(10)


def test_range_candidates_in_the_test_stage(full_run):
    """``evaluation.candidates=range``: with a cap above every pair each view meets every reference, as a
    top-k over all of them does (same stages, same figures); with a small cap each search keeps at most
    ``max_results`` rows, the best by score-normalised score, and its rows are still scored normalised."""
    _, paths, ids, gt = full_run
    n_refs = len(paths["references"])
    lv = {**SETTINGS["local_verification"], "reference_crops": False}
    topk = run_test_stage(
        [_model()], paths, ids, _settings(k=n_refs, local_verification=lv, reference_block=3), gt
    )
    everything = run_test_stage(
        [_model()],
        paths,
        ids,
        _settings(candidates="range", max_results=10**9, local_verification=lv, reference_block=3),
        gt,
    )
    assert len(everything.rows.candidates) == len(topk.rows.candidates)
    for a, b in zip(topk.stages, everything.stages, strict=True):
        assert a.name == b.name and a.metrics.uAP == pytest.approx(b.metrics.uAP, abs=1e-6)
        np.testing.assert_allclose(np.sort(a.predictions.scores), np.sort(b.predictions.scores), atol=1e-5)

    capped = run_test_stage(
        [_model()], paths, ids, _settings(candidates="range", max_results=30, local_verification=lv), gt
    )
    c, all_rows = capped.rows.candidates, everything.rows.candidates
    for scale in (0, 1):
        mine, full = c.score[c.scale == scale], np.sort(all_rows.score[all_rows.scale == scale])[::-1]
        assert 0 < len(mine) <= 30
        np.testing.assert_allclose(np.sort(mine)[::-1], full[: len(mine)], atol=1e-5)  # the best ones


def test_whitening_on_every_image_of_a_multi_block_training_set_is_warned(caplog):
    """All of a large training set held raw for the PCA, and extracted twice: said before any work."""
    s = _settings(whitening={"enabled": True, "dim": 3}, reference_block=2)
    with caplog.at_level("WARNING"):
        s.for_training_set(6)
    assert "set evaluation.whitening.samples" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        _settings(whitening={"enabled": True, "dim": 3, "samples": 4}, reference_block=2).for_training_set(6)
    assert "whitening.samples" not in caplog.text


def test_families_pool_their_rows_and_a_grey_family_sees_grey_images(full_run):
    """Two one-model families (colour and grey) of the same model: each votes alone (1 of 1), the
    ensemble stage pools both families' rows, so every pair of the colour family alone is kept with a
    score at least as high; the grey family's rows are its own (the grey prep reached its extraction)."""
    _, paths, ids, gt = full_run
    families = [{"name": "colour", "models": ["a"]}, {"name": "grey", "models": ["b"], "grey": True}]
    s = _settings(
        scales=[128],
        local_verification={**SETTINGS["local_verification"], "reference_crops": False},
        ensemble={"families": families, "min_votes": 1},
    )
    model = _model()
    result = run_test_stage([model, model], paths, ids, s, gt)
    colour, pooled = result.stages[-2], result.stages[-1]
    assert (colour.name, pooled.name) == ("+ local verification", "+ ensemble")
    best = dict(
        zip(
            zip(pooled.predictions.query_ids, pooled.predictions.reference_ids, strict=True),
            pooled.predictions.scores,
            strict=True,
        )
    )
    for q, r, score in zip(
        colour.predictions.query_ids, colour.predictions.reference_ids, colour.predictions.scores, strict=True
    ):
        assert best[(q, r)] >= score - 1e-6
    c = result.rows.candidates
    by_model = [
        {
            (int(v), int(r)): float(x)
            for v, r, x in zip(
                c.query_view[c.model == m], c.reference[c.model == m], c.score[c.model == m], strict=True
            )
        }
        for m in (0, 1)
    ]
    shared = set(by_model[0]) & set(by_model[1])
    assert shared and max(abs(by_model[0][k] - by_model[1][k]) for k in shared) > 1e-3
