"""``run.py task=evaluate`` end to end on tiny generated DISC21-layout benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import N_MATCHED, N_REFS, N_TRAIN, N_UNMATCHED, compose_cfg, official_uap

import tasks
from isc.formats.descriptor_files import read_descriptors, write_descriptors
from isc.formats.pair_csv import read_predictions

ROOT = Path(__file__).resolve().parents[2]


def perfect_descriptors(benchmark: Path) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """One-hot descriptors: a matched query gets its reference's vector, others an unused direction."""
    dim = N_REFS + N_UNMATCHED + N_TRAIN
    eye = np.eye(dim, dtype=np.float32)
    ref_ids = [f"R{i:06d}" for i in range(N_REFS)]
    gt = (benchmark / "ground_truth.csv").read_text().splitlines()[1:]
    query_ids, query = [], []
    for j, line in enumerate(gt):
        q, r = line.split(",")
        query_ids.append(q)
        query.append(eye[int(r[1:])] if r else eye[N_REFS + j - N_MATCHED])
    return query_ids, np.stack(query), ref_ids, eye[:N_REFS]


def evaluate(overrides: list[str], out_dir: Path) -> dict:
    return tasks.evaluate(compose_cfg(overrides, out_dir))


def test_perfect_descriptors_give_uap_one(benchmark: Path, tmp_path: Path) -> None:
    q_ids, q, r_ids, r = perfect_descriptors(benchmark)
    write_descriptors(tmp_path / "in.h5", q_ids, q, r_ids, r, max_dim=None)
    out = tmp_path / "run"
    metrics = evaluate([f"dataset.root={benchmark}", f"evaluation.descriptors={tmp_path / 'in.h5'}"], out)
    assert metrics["uAP"] == pytest.approx(1.0)
    assert metrics["recall_at_rank1"] == pytest.approx(1.0)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["uAP"] == pytest.approx(1.0)
    predictions = read_predictions(out / "predictions.csv")
    assert len(predictions) == len(q_ids) * 10  # k = 10 neighbours per query (conf/evaluation)
    assert read_descriptors(out / "descriptors.h5").query.shape == q.shape


def test_shuffled_descriptors_give_low_uap(benchmark: Path, tmp_path: Path) -> None:
    q_ids, q, r_ids, r = perfect_descriptors(benchmark)
    shuffled = np.roll(q[:N_MATCHED], 1, axis=0)  # every matched query now looks like another reference
    q = np.concatenate([shuffled, q[N_MATCHED:]])
    write_descriptors(tmp_path / "in.h5", q_ids, q, r_ids, r, max_dim=None)
    metrics = evaluate(
        [f"dataset.root={benchmark}", f"evaluation.descriptors={tmp_path / 'in.h5'}"], tmp_path
    )
    assert metrics["uAP"] < 0.2
    assert metrics["recall_at_rank1"] == 0.0


def test_extraction_with_pretrained_backbone(benchmark: Path, tmp_path: Path) -> None:
    """Exact copies get identical descriptors, so the packaged EfficientNet-Lite0 must rank them first."""
    metrics = evaluate(
        [
            f"dataset.root={benchmark}",
            "debug=default",
            "evaluation.score_normalization.enabled=false",
        ],
        tmp_path,
    )
    assert metrics["uAP"] == pytest.approx(1.0)
    descriptors = read_descriptors(tmp_path / "descriptors.h5")
    assert descriptors.query.shape == (N_MATCHED + N_UNMATCHED, 1280)
    assert descriptors.training is not None and descriptors.training.shape == (N_TRAIN, 1280)
    np.testing.assert_allclose(np.linalg.norm(descriptors.reference, axis=1), 1.0, rtol=1e-5)


def test_whitening_and_score_normalisation_path(benchmark: Path, tmp_path: Path) -> None:
    metrics = evaluate(
        [
            f"dataset.root={benchmark}",
            "debug=default",
            "evaluation.whitening.enabled=true",
            f"evaluation.whitening.dim={N_TRAIN - 1}",
            "evaluation.score_normalization.enabled=true",
            "evaluation.score_normalization.k=2",
            "evaluation.descriptor_track_max_dim=256",
        ],
        tmp_path,
    )
    assert metrics["uAP"] == pytest.approx(official_uap(benchmark, tmp_path / "predictions.csv"), abs=1e-9)
    assert metrics["uAP_raw"] != metrics["uAP"]  # the post-processing changed the scores
    assert metrics["postprocessing"] == f"PCA-whitening {N_TRAIN - 1} + score normalisation (beta 1, k 2)"
    assert read_descriptors(tmp_path / "descriptors.h5").query.shape[1] == N_TRAIN - 1


def test_cli_prints_uap(benchmark: Path, tmp_path: Path) -> None:
    q_ids, q, r_ids, r = perfect_descriptors(benchmark)
    write_descriptors(tmp_path / "in.h5", q_ids, q, r_ids, r, max_dim=None)
    result = subprocess.run(
        [
            sys.executable,
            "run.py",
            "task=evaluate",
            f"dataset.root={benchmark}",
            f"evaluation.descriptors={tmp_path / 'in.h5'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ISC_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    assert "uAP 1.0000 with no post-processing (raw 1.0000)" in result.stdout  # no training descriptors
    for name in ("metrics.json", "predictions.csv", "descriptors.h5", "config_resolved.yaml"):
        assert (tmp_path / "run" / name).is_file(), name


def test_missing_dataset_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate([f"dataset.root={tmp_path / 'nope'}"], tmp_path)


def test_descriptors_of_another_dataset_are_an_error_not_a_zero(benchmark: Path, tmp_path: Path) -> None:
    q_ids, q, r_ids, r = perfect_descriptors(benchmark)
    other_q = [f"X{i:05d}" for i in range(len(q_ids))]
    write_descriptors(tmp_path / "other.h5", other_q, q, r_ids, r, max_dim=None)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="none of the 16 queries ids in evaluation.descriptors"):
        evaluate([f"dataset.root={benchmark}", f"evaluation.descriptors={tmp_path / 'other.h5'}"], out)
    assert not (out / "predictions.csv").exists()


class _Collapsed(torch.nn.Module):
    """A model whose descriptor is zero for the fourth reference image and for nothing else."""

    dim, image_size = 4, 32
    zero_pixel = -1.0  # inputs whose first pixel has this value get a zero descriptor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.normalize(x.mean(dim=(2, 3)).repeat(1, 2)[:, :4] + 0.1, dim=1)
        keep = (x[:, 0, 0, 0] != self.zero_pixel).float()[:, None]
        return out * keep


def test_a_zero_descriptor_during_extraction_names_the_image(benchmark: Path) -> None:
    """An all-zero descriptor stops extraction at its batch and names the file, not a uAP of 0.07."""
    from isc.data.images import list_images, load_image
    from isc.evaluation.extract import eval_transform, extract

    paths = list_images(benchmark / "references")
    model = _Collapsed()
    pixels = [float(eval_transform(32)(load_image(p))[0, 0, 0]) for p in paths[2:4]]
    model.zero_pixel = pixels[1]
    assert pixels[0] != model.zero_pixel  # only the fourth image is hit
    with pytest.raises(ValueError, match=rf"all-zero descriptor for image .*{paths[3].name}"):
        extract(model, paths, scales=[32], batch_size=8, num_workers=0, progress=False)


def test_an_all_zero_descriptor_file_is_refused_before_matching(benchmark: Path, tmp_path: Path) -> None:
    import h5py

    q_ids, q, r_ids, r = perfect_descriptors(benchmark)
    with h5py.File(tmp_path / "zero.h5", "w") as f:
        f["query"], f["query_ids"] = np.zeros_like(q), np.array(q_ids, dtype="S")
        f["reference"], f["reference_ids"] = r, np.array(r_ids, dtype="S")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"zero\.h5.*16 of 16 query descriptor\(s\) are all zeros"):
        evaluate([f"dataset.root={benchmark}", f"evaluation.descriptors={tmp_path / 'zero.h5'}"], out)
    assert not (out / "metrics.json").exists()


def test_max_training_caps_the_training_split_of_a_descriptor_file(benchmark: Path, tmp_path: Path) -> None:
    """As for extracted descriptors: post-processing is fitted on the first N training images by id."""
    q_ids, q, r_ids, r = perfect_descriptors(benchmark)
    rng = np.random.default_rng(0)
    q = q + 0.3 * rng.normal(size=q.shape).astype(np.float32)  # imperfect: the training bias matters
    t = rng.normal(size=(N_TRAIN, q.shape[1])).astype(np.float32)
    t_ids = [f"T{i:06d}" for i in range(N_TRAIN)][::-1]  # stored out of order: the cap goes by id
    write_descriptors(tmp_path / "all.h5", q_ids, q, r_ids, r, t_ids, t, max_dim=None)
    first = [N_TRAIN - 1 - i for i in range(3)]  # rows of T000000..T000002
    write_descriptors(
        tmp_path / "first3.h5", q_ids, q, r_ids, r, [t_ids[i] for i in first], t[first], max_dim=None
    )
    args = [f"dataset.root={benchmark}", "evaluation.score_normalization.k=2"]
    capped = evaluate(
        [*args, f"evaluation.descriptors={tmp_path / 'all.h5'}", "evaluation.max_training=3"], tmp_path / "a"
    )
    three = evaluate([*args, f"evaluation.descriptors={tmp_path / 'first3.h5'}"], tmp_path / "b")
    evaluate([*args, f"evaluation.descriptors={tmp_path / 'all.h5'}"], tmp_path / "c")  # uncapped
    for key in ("uAP", "recall_at_p90", "uAP_raw"):
        assert capped[key] == three[key]
    assert len(read_descriptors(tmp_path / "c" / "descriptors.h5").training_ids) == N_TRAIN
    assert read_descriptors(tmp_path / "a" / "descriptors.h5").training_ids.tolist() == [
        "T000000",
        "T000001",
        "T000002",
    ]


def test_the_readme_notebook_call_gives_what_task_evaluate_gives(benchmark: Path, tmp_path: Path) -> None:
    """README's Hydra-free ``evaluate_layout`` snippet, run as shown on an exported model, prints the
    uAP that ``task=evaluate`` reports for the same file."""
    tiny = ["evaluation.image_size=96", "evaluation.num_workers=0", "evaluation.score_normalization.k=2"]
    tasks.export(compose_cfg(tiny, tmp_path / "export"))
    model_file = tmp_path / "export" / "descriptor_model.pt"
    expected = evaluate([*tiny, f"dataset.root={benchmark}", f"ckpt_path={model_file}"], tmp_path / "cli")
    readme = (ROOT / "README.md").read_text()
    start = readme.index("from isc.data.images import Disc21Layout")
    snippet = readme[start : readme.index("```", start)]
    snippet = snippet.replace('"descriptor_model.pt"', repr(str(model_file)))
    snippet = snippet.replace('"/data/disc21"', repr(str(benchmark))).replace(
        '"outputs/notebook"', repr(str(tmp_path / "nb"))
    )
    snippet = snippet.replace(
        "EvaluationSettings()",
        "EvaluationSettings(num_workers=0, score_normalization=ScoreNormalization(k=2))",
    )
    namespace: dict = {}
    exec("from isc.evaluation.settings import ScoreNormalization\n" + snippet, namespace)
    assert namespace["run"].metrics["uAP"] == pytest.approx(expected["uAP"], abs=1e-9)
    assert (tmp_path / "nb" / "predictions.csv").read_bytes() == (
        tmp_path / "cli" / "predictions.csv"
    ).read_bytes()


def test_an_approximate_index_reports_its_recall_and_probing_all_lists_changes_nothing(
    benchmark: Path, tmp_path: Path
) -> None:
    """``evaluation.index``: an IVF index with every list probed is exact (recall@k 1.0, the same uAP);
    metrics.json records the index and the recall measured against exact search in the same run."""
    common = [f"dataset.root={benchmark}", "debug=default", "evaluation.score_normalization.k=2"]
    exact = evaluate(common, tmp_path / "flat")
    ivf = ["evaluation.index='IVF4,Flat'", "evaluation.index_parameters='nprobe=4'"]  # quoted for Hydra
    approx = evaluate([*common, *ivf], tmp_path / "ivf")
    assert "search" not in exact
    search = json.loads((tmp_path / "ivf" / "metrics.json").read_text())["search"]
    assert search == {
        "index": "IVF4,Flat",
        "parameters": "nprobe=4",
        "k": 10,
        "queries_checked": N_MATCHED + N_UNMATCHED,
        "recall_at_k": 1.0,
    }
    assert approx["uAP"] == pytest.approx(exact["uAP"], abs=1e-6)
    with pytest.raises(ValueError, match="evaluation.index=IVF4,Flat: approximate indexes serve global"):
        evaluate([*common, ivf[0], "evaluation.scales=[64]"], tmp_path / "staged")


def test_the_global_cap_candidate_rule_scores_normalised_pairs_of_the_whole_run(
    benchmark: Path, tmp_path: Path
) -> None:
    """``evaluation.candidates=range``: at most ``max_results`` pairs over all queries, each scored as
    the top-k rule scores it (score normalisation folded into the vectors), the best ones kept."""
    common = [f"dataset.root={benchmark}", "debug=default", "evaluation.score_normalization.k=2"]
    evaluate(common, tmp_path / "topk")
    capped = evaluate(
        [*common, "evaluation.candidates=range", "evaluation.max_results=40"], tmp_path / "range"
    )
    topk, ranged = (read_predictions(tmp_path / d / "predictions.csv") for d in ("topk", "range"))
    assert 0.8 * 40 <= len(ranged) <= 40 and capped["num_predictions"] == len(ranged)
    by_pair = dict(zip(zip(topk.query_ids, topk.reference_ids, strict=True), topk.scores, strict=True))
    common_pairs = [
        (p, s)
        for p, s in zip(zip(ranged.query_ids, ranged.reference_ids, strict=True), ranged.scores, strict=True)
        if p in by_pair
    ]
    assert common_pairs and all(abs(by_pair[p] - s) < 1e-5 for p, s in common_pairs)
    assert min(ranged.scores) >= sorted(topk.scores, reverse=True)[len(ranged) - 1] - 1e-5  # the best pairs
