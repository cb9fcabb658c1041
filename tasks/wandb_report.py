"""``logger=wandb`` for evaluation tasks: the headline figures, the PR curve, score histograms, the page."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from isc.evaluation.report import report_figures
from isc.evaluation.runner import EvaluationRun


def grid_figures(run: EvaluationRun) -> dict[str, float]:
    """``evaluation.grid``'s cells as ``test/grid/<setting>/<stage>/<metric>`` (the defined ones)."""
    return {
        f"test/grid/{g.name}/{st.name}/{k}": v
        for g in run.result.grid
        for st in g.stages
        for k, v in st.figures.items()
        if v is not None
    }


def log_report_to_wandb(cfg: DictConfig, run: EvaluationRun) -> None:
    """One wandb run per evaluation (offline unless ``WANDB_MODE=online``), read from the run's result."""
    import wandb

    assert run.ground_truth is not None
    figures = report_figures(run.result.predictions, run.ground_truth)
    w = cfg.logger.wandb
    logged = wandb.init(
        project=w.project, name=f"{cfg.task}", dir=str(cfg.paths.output_dir), mode=w.mode, reinit=True
    )
    try:
        pr = wandb.Table(
            columns=["recall", "precision"],
            data=list(zip(figures["recall"], figures["precision"], strict=True)),
        )
        logged.log(
            {
                **{f"test/{k}": v for k, v in run.metrics.items() if isinstance(v, int | float)},
                **grid_figures(run),
                "test/pr_curve": wandb.plot.line(pr, "recall", "precision", title="precision-recall"),
                "test/true_pair_scores": wandb.Histogram(
                    np_histogram=(figures["true_counts"], figures["bin_edges"])
                ),
                "test/false_pair_scores": wandb.Histogram(
                    np_histogram=(figures["false_counts"], figures["bin_edges"])
                ),
                "test/report": wandb.Html(Path(run.metrics["report"]).read_text()),
            }
        )
    finally:
        logged.finish()
