"""``task=evaluate`` and ``task=predict``: config -> layout, models and settings -> the Hydra-free runner.

The orchestration itself (pre-pass, extraction, matching or the test stage, files, report) is
:func:`isc.evaluation.runner.evaluate_layout`; this module only builds its inputs from the config, then
logs to wandb when configured and prints the headline and where the outputs are.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from isc.data.images import Disc21Layout
from isc.evaluation.runner import EvaluationRun, evaluate_layout
from isc.evaluation.settings import EvaluationSettings
from isc.models.descriptor import load_descriptor_model
from tasks.common import (
    dataset_root,
    descriptor_cache,
    descriptor_model,
    evaluation_settings,
    extraction_group,
    fmt,
    recipe_name,
)
from tasks.wandb_report import log_report_to_wandb

log = logging.getLogger(__name__)


def evaluation_models(cfg: DictConfig, settings: EvaluationSettings) -> list[nn.Module]:
    """``evaluation.ensemble.models`` (or its families' models, in order), else ``ckpt_path`` or the
    configured backbone; none for a file.

    Every file is loaded before any image is read, so a wrong path fails at once.
    """
    if settings.descriptors:
        return []
    paths = list(settings.ensemble.models)
    if not paths:
        return [descriptor_model(cfg)]
    if cfg.ckpt_path:
        raise ValueError("give either ckpt_path or evaluation.ensemble.models (or families), not both")
    return [load_descriptor_model(Path(p).expanduser()) for p in paths]


def model_name(cfg: DictConfig, settings: EvaluationSettings) -> str:
    e = settings.ensemble
    if e.families:
        return f"ensemble of {len(e.models)} in {len(e.families)} families"
    if e.models:
        return f"ensemble of {len(e.models)} ({e.rule})"
    return str(cfg.ckpt_path or recipe_name("backbone") or cfg.backbone.get("_target_", ""))


def evaluate(cfg: DictConfig, predict: bool = False) -> dict[str, object]:
    """Extract descriptors on a DISC21-layout folder, match them, and score them against its ground truth.

    With ``predict=True`` (``task=predict``) the ground truth is never read. Any of ``evaluation.scales``,
    ``local_verification`` or ``ensemble`` switches to D2LV's full test stage. With ``trainer=ddp
    trainer.devices=N`` (and ``trainer.num_nodes``) N processes share the extraction; rank 0 matches,
    writes and prints, the others end when their share is done.
    """
    settings = evaluation_settings(cfg)
    root = dataset_root(cfg)
    models = evaluation_models(cfg, settings)
    ranks = extraction_group(cfg)
    run = evaluate_layout(
        Disc21Layout(root),
        models,
        settings,
        cfg.paths.output_dir,
        predict=predict,
        skip_bad=cfg.dataset.skip_bad_images,
        cache_dir=descriptor_cache(cfg, settings),
        subtitle=f"{root} · model {model_name(cfg, settings)}",
        ranks=ranks,
    )
    if run is None:
        log.info(
            "rank %d of %d: its share of the extraction is done; rank 0 goes on", ranks.rank, ranks.world
        )
        return {}
    if run.ground_truth is not None and "report" in run.metrics and "wandb" in (cfg.get("logger") or {}):
        log_report_to_wandb(cfg, run)
    _print_headline(run)
    return run.metrics


def predict(cfg: DictConfig) -> dict[str, object]:
    """``task=predict``: the official matching CSV and descriptor file for queries without ground truth."""
    return evaluate(cfg, predict=True)


def _print_headline(run: EvaluationRun) -> None:
    m, out = run.metrics, run.out_dir
    if run.ground_truth is None:
        print(f"predictions written to {out / 'predictions.csv'}, descriptors to {out / 'descriptors.h5'}")
        return
    staged = "stages" in m
    if staged:
        for st in run.result.stages:
            f = st.figures
            print(
                f"  {st.name:<22} uAP {fmt(f['uAP'])}  recall@P90 {fmt(f['recall_at_p90'])}  "
                f"{1000 * (st.seconds_per_query or 0.0):.1f} ms/query"
            )
    for g in run.result.grid:  # evaluation.grid: every stage under another post-processing, same extraction
        cells = " | ".join(f"{st.name} {fmt(st.figures['uAP'])}" for st in g.stages)
        print(f"  grid {g.name:<19} uAP {cells}  ({g.postprocessing}; {g.seconds:.2f} s)")
    raw = "" if staged else f" (raw {fmt(m['uAP_raw'])})"
    print(
        f"uAP {fmt(m['uAP'])} with {m['postprocessing']}{raw}, "
        f"recall@P90 {fmt(m['recall_at_p90'])}, recall@rank1 {fmt(m['recall_at_rank1'])}"
    )
    if "report" in m:
        print(f"report: {m['report']}")
    print(f"outputs in {out}")
