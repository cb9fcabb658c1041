"""``evaluation.grid``: every stage under each post-processing setting, from one extraction, equal to
separate runs with that setting alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from isc.data.images import Disc21Layout
from isc.evaluation.runner import EvaluationRun, evaluate_layout
from isc.evaluation.settings import GRID_STEPS, EvaluationSettings
from isc.models.descriptor import DescriptorModel
from isc.models.pooling import GeM
from isc.models.trunks import Trunk
from tasks.common import fmt
from tasks.evaluation import _print_headline
from tasks.wandb_report import grid_figures

GRID = list(GRID_STEPS)


class _Counted(nn.Module):
    """A tiny conv body that counts the images it has seen: extraction happens once or not at all."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self._images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._images += len(x)
        return torch.relu(self.conv(x))


def _model() -> DescriptorModel:
    return DescriptorModel(Trunk(_Counted(), 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), GeM(p=3.0))


def _settings(**changes: object) -> EvaluationSettings:
    values = {
        "num_workers": 0,
        "batch_size": 16,
        "image_size": 48,
        "k": 5,
        "cache_dir": None,
        "whitening": {"dim": 4},
        "score_normalization": {"enabled": True, "k": 2},
        **changes,
    }
    return EvaluationSettings.from_dict(values)


def _run(benchmark: Path, out: Path, s: EvaluationSettings, model: nn.Module) -> EvaluationRun:
    run = evaluate_layout(Disc21Layout(benchmark), [model], s, out)
    assert run is not None
    return run


@pytest.mark.parametrize("stage", ["global", "test"])
def test_grid_cells_equal_separate_runs_from_one_extraction(
    benchmark: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: str
) -> None:
    changes = {"scales": [48, 64]} if stage == "test" else {}
    model = _model()
    run = _run(benchmark, tmp_path / "grid", _settings(grid=GRID, **changes), model)
    images = sum(1 for split in ("queries", "references", "training") for _ in (benchmark / split).iterdir())
    scales = 2 if stage == "test" else 1
    assert model.trunk.body._images == images * scales  # one extraction for the five settings

    configured = run.result
    assert [g.name for g in configured.grid] == GRID
    for g in configured.grid:
        alone = _run(benchmark, tmp_path / g.name, _settings(**changes).variant(g.name), _model()).result
        assert [st.name for st in g.stages] == [st.name for st in alone.stages]
        for mine, theirs in zip(g.stages, alone.stages, strict=True):
            np.testing.assert_array_equal(mine.predictions.query_ids, theirs.predictions.query_ids)
            np.testing.assert_array_equal(mine.predictions.reference_ids, theirs.predictions.reference_ids)
            np.testing.assert_allclose(mine.predictions.scores, theirs.predictions.scores, atol=1e-6)
            assert mine.figures == pytest.approx(theirs.figures)
    raw_scores = configured.grid[GRID.index("raw")].stages[-1].predictions.scores
    assert not np.allclose(raw_scores[:5], configured.final.predictions.scores[:5])  # the settings differ
    same = configured.grid[GRID.index("score_normalization")]  # the configured setting: its own result
    assert [st.figures for st in same.stages] == [st.figures for st in configured.stages]

    on_disk = json.loads((tmp_path / "grid" / "metrics.json").read_text())
    assert list(on_disk["grid"]) == GRID
    raw = on_disk["grid"]["raw"]
    assert raw["postprocessing"] == "no post-processing"
    assert list(raw["stages"]) == [st.name for st in configured.stages]
    assert on_disk["uAP"] == pytest.approx(configured.final.figures["uAP"])  # the headline: configured

    assert grid_figures(run)[f"test/grid/raw/{configured.stages[-1].name}/uAP"] == pytest.approx(
        configured.grid[0].stages[-1].figures["uAP"]
    )
    _print_headline(run)
    lines = capsys.readouterr().out.splitlines()
    printed = [line.split()[1] for line in lines if line.startswith("  grid ")]
    assert printed == GRID  # one line per setting, then the configured headline
    assert lines[-3].startswith(f"uAP {fmt(on_disk['uAP'])} with {configured.postprocessing}")

    page = (tmp_path / "grid" / "report.html").read_text()
    table = page[page.index('id="grid-table"') :]
    table = table[: table.index("</table>")]
    values = [float(v) for v in re.findall(r'data-value="([^"]+)"', table)]
    best = [float(v) for v in re.findall(r'class="num best"[^>]*data-value="([^"]+)"', table)]
    assert len(values) == len(configured.stages) * (1 + len(GRID))
    assert best and set(best) == {max(values)}


def test_grid_names_and_settings_are_checked_before_extraction(benchmark: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="evaluation.grid"):
        _settings(grid=["raw", "dba"])
    with pytest.raises(ValueError, match="evaluation.grid"):
        _settings(grid=["raw", "raw"])
    model = _model()
    too_wide = _settings(grid=["whitening"], whitening={"dim": 64})  # 6 training images
    with pytest.raises(ValueError, match="evaluation.grid entry 'whitening'.*whitening.dim"):
        _run(benchmark, tmp_path / "bad", too_wide, model)
    assert model.trunk.body._images == 0


def test_a_variant_switches_the_steps_and_keeps_their_parameters() -> None:
    s = _settings(
        whitening={"dim": 4, "raw": True, "enabled": False}, score_normalization={"beta": 2.0, "k": 7}
    )
    both = s.variant("both")
    assert both.whitening.enabled and both.score_normalization.enabled
    assert (both.whitening.dim, both.score_normalization.beta, both.score_normalization.k) == (4, 2.0, 7)
    assert not both.whitening.raw  # the models were built for whitening off: it whitens their unit output
    assert s.variant("raw").describe() == "no post-processing"
