"""Evaluate, predict or run D2LV's test stage on a DISC21-layout folder: the one orchestration, Hydra-free.

``task=evaluate``, ``task=predict`` and the test stage are :func:`evaluate_layout` with a layout, the
models and the run's settings; a notebook calls it the same way. In order, before any heavy work: the
layout and ground truth are checked, every image passes the pre-pass, the settings are resolved once
for the training set and the models' dimensions. Then descriptors are extracted (the one engine,
:mod:`isc.evaluation.extract`) or read, matched (:mod:`isc.evaluation.matching`, or
:mod:`isc.evaluation.inference` for the test stage), and the official files, ``metrics.json`` and the
report are written atomically into ``out_dir``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from isc.data.images import Disc21Layout, SkippedImages, screen_decode, screen_quick
from isc.evaluation.distributed import Ranks
from isc.evaluation.evaluated_model import evaluated_model
from isc.evaluation.extract import Listing
from isc.evaluation.inference import ConcatModel, run_test_stage, share_test_stage
from isc.evaluation.matching import match_descriptors
from isc.evaluation.postprocess import check_whitening_dim
from isc.evaluation.report import write_report
from isc.evaluation.results import EvaluationResult, GridResult
from isc.evaluation.settings import EvaluationSettings
from isc.formats.descriptor_files import read_descriptors, write_descriptors
from isc.formats.files import atomic_write
from isc.formats.pair_csv import write_predictions
from isc.formats.pairs import GroundTruth

__all__ = ["EvaluationRun", "evaluate_layout", "resolve_settings", "split_paths"]

log = logging.getLogger(__name__)

Splits = dict[str, np.ndarray]
ONE_PROCESS = Ranks()


@dataclass
class EvaluationRun:
    """What :func:`evaluate_layout` did: the result, the settings it ran with and the files it wrote."""

    result: EvaluationResult
    settings: EvaluationSettings
    ground_truth: GroundTruth | None
    metrics: dict[str, Any]
    out_dir: Path


def split_paths(layout: Disc21Layout, max_training: int | None) -> dict[str, list[Path]]:
    """The images each split evaluates on: all queries and references, the first ``max_training``
    training images by id (D2LV fits its PCA on 20k of the 1M), or none without ``training/``."""
    paths = {split: layout.paths(split) for split in ("queries", "references")}
    if layout.has_split("training"):
        paths["training"] = layout.paths("training")[:max_training]
    return paths


def resolve_settings(
    settings: EvaluationSettings, num_training: int, descriptor_dims: Sequence[int] = ()
) -> EvaluationSettings:
    """The settings of this run, resolved once: for its training set and its descriptors' dimensions.

    Whitening and the descriptor-track limit are checked against every model's (or file's) dimension
    here, before any image is read.
    """
    s = settings.for_training_set(num_training)
    for dim in descriptor_dims:
        check_whitening_dim(s.whitening_dim, dim)
        out_dim = s.whitening_dim or dim
        limit = s.descriptor_track_max_dim
        if limit is not None and out_dim > limit:
            raise ValueError(
                f"the descriptors would have {out_dim} dims but evaluation.descriptor_track_max_dim={limit}: "
                "enable evaluation.whitening with dim <= that, or raise the limit"
            )
    return s


def _screen(
    layout: Disc21Layout, listed: dict[str, list[Path]], skip_bad: bool, skipped: SkippedImages, workers: int
) -> dict[str, list[Path]]:
    """The pre-pass: no empty split, valid ids, readable headers; with ``skip_bad`` a full decode too."""
    for split in ("queries", "references"):
        if split in listed and not listed[split]:
            raise ValueError(f"{layout.root / split} holds no images: nothing to evaluate")
    screened = {}
    for split, files in listed.items():
        good, bad = screen_quick(files, f"{split}/ of {layout.root}", skip_bad=skip_bad, num_workers=workers)
        if skip_bad:
            good, more = screen_decode(good, skip_bad=True, num_workers=workers)
            bad += more
        skipped.add(split, bad)
        screened[split] = good
    return screened


def _check_descriptor_ids(ids: Splits, layout: Disc21Layout) -> None:
    """Descriptors must describe this dataset's images: none known is an error, some unknown a warning.

    Otherwise a file for another dataset (or another query set) scores uAP 0 without a word.
    """
    for split in ("queries", "references"):
        given = np.asarray(ids[split])
        unknown = ~np.isin(given, np.asarray(layout.ids(split)))
        if len(given) and unknown.all():
            raise ValueError(
                f"none of the {len(given)} {split} ids in evaluation.descriptors is an image of "
                f"{layout.root / split} (first {given[0]!r}, folder e.g. {layout.ids(split)[:1]}): "
                "descriptors of another dataset?"
            )
        if unknown.any():
            log.warning(
                "%d of %d %s ids in evaluation.descriptors are not images of %s, e.g. %s",
                int(unknown.sum()),
                len(given),
                split,
                layout.root / split,
                ", ".join(map(str, given[unknown][:5])),
            )


def _read_descriptor_file(settings: EvaluationSettings, layout: Disc21Layout) -> tuple[Splits, Splits]:
    """Precomputed descriptors: a submission HDF5 file, or per-split files {queries, references, training}."""
    d = read_descriptors(settings.descriptors)
    ids: Splits = {"queries": d.query_ids, "references": d.reference_ids}
    vectors: Splits = {"queries": d.query, "references": d.reference}
    if d.training is not None and d.training_ids is not None:
        ids["training"], vectors["training"] = d.training_ids, d.training
    log.info("descriptors from %s: %s", settings.descriptors, {k: v.shape for k, v in vectors.items()})
    _check_descriptor_ids(ids, layout)
    if "training" in ids and settings.max_training is not None:  # as split_paths: the first N by id
        keep = np.sort(np.argsort(ids["training"], kind="stable")[: settings.max_training])
        ids["training"], vectors["training"] = ids["training"][keep], vectors["training"][keep]
    return ids, vectors


def evaluate_layout(
    layout: Disc21Layout,
    models: Sequence[nn.Module],
    settings: EvaluationSettings,
    out_dir: str | Path,
    *,
    predict: bool = False,
    skip_bad: bool = False,
    cache_dir: Path | None = None,
    subtitle: str = "",
    ranks: Ranks = ONE_PROCESS,
) -> EvaluationRun | None:
    """Descriptors of every split -> matching (or the test stage) -> official files, metrics and report.

    ``models``: the descriptor models (several for an ensemble; none with ``settings.descriptors``).
    ``predict=True`` (``task=predict``) never reads a ground truth: only the official matching CSV and
    descriptor file are written. ``cache_dir``: the extraction engine's resumable shards.

    ``ranks``: in a group of processes (every one calls this with the same arguments), each extracts its
    share into ``cache_dir`` (:mod:`isc.evaluation.distributed`); then rank 0 goes on alone and the
    others return ``None``.
    """
    out = Path(out_dir)
    if ranks.world > 1 and cache_dir is None and not settings.descriptors:
        raise ValueError(
            f"evaluation.cache_dir=null: the {ranks.world} processes share the extraction through the shard "
            "cache; set evaluation.cache_dir to a folder every process can reach (or auto)"
        )
    if not predict:
        layout.validate()
    log.info("dataset: %s", layout.root)
    ground_truth = layout.ground_truth() if layout.has_ground_truth() and not predict else None
    skipped = SkippedImages(out / "skipped_images.csv")
    listed = split_paths(layout, settings.max_training)
    if settings.descriptors:
        if settings.test_stage:
            raise ValueError(
                "evaluation.descriptors holds one descriptor per image; scales, local_verification and "
                "ensemble need the models: drop evaluation.descriptors or those settings"
            )
        if ranks.rank > 0:
            return None  # nothing to extract: rank 0 reads the file
        ids, vectors = _read_descriptor_file(settings, layout)
        n_training, dims = len(ids.get("training", ())), [vectors["queries"].shape[1]]
        s = resolve_settings(settings, n_training, dims)
        grid = _grid_settings(settings, s, n_training, dims, ground_truth)
        result = _match(ids, vectors, ground_truth, s)
        result.grid = _score_grid(grid, s, result, lambda g: _match(ids, vectors, ground_truth, g))
        paths = listed  # the report shows the images the ids name
    else:
        paths = _screen(layout, listed, skip_bad, skipped, max(8, settings.num_workers))
        models, settings = _combined(models, settings)
        n_training, dims = len(paths.get("training", ())), [int(m.dim) for m in models]  # type: ignore[arg-type]
        s = resolve_settings(settings, n_training, dims)
        grid = _grid_settings(settings, s, n_training, dims, ground_truth)
        if ranks.world > 1:
            assert cache_dir is not None
            shared = cache_dir
            ranks.share(lambda: _share(models, paths, s, shared, ranks))
            if ranks.rank > 0:
                return None
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if s.test_stage and grid and cache_dir is None:  # the grid's runs read the one extraction back
                cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="isc-grid-")))
            if s.test_stage:
                ids_ = {split: [p.stem for p in files] for split, files in paths.items()}
                cache = cache_dir

                def score(g: EvaluationSettings) -> EvaluationResult:
                    return run_test_stage(models, paths, ids_, g, ground_truth, cache)

            else:
                ids, vectors = _global(models[0], paths, s, cache_dir)

                def score(g: EvaluationSettings) -> EvaluationResult:
                    return _match(ids, vectors, ground_truth, g)

            result = score(s)
            log.info("extraction and matching took %.1f s", time.perf_counter() - started)
            result.grid = _score_grid(grid, s, result, score)
    write_descriptors(
        out / "descriptors.h5",
        result.query_ids,
        result.query,
        result.reference_ids,
        result.reference,
        result.training_ids,
        result.training,
        max_dim=s.descriptor_track_max_dim,
    )
    write_predictions(out / "predictions.csv", result.predictions, max_rows=s.max_predictions)
    metrics = result.summary()
    metrics["skipped_images"] = {split: skipped.count(split) for split in paths} if not s.descriptors else {}
    if ground_truth is not None:
        metrics["report"] = str(
            write_report(
                out / "report.html",
                predictions=result.predictions,
                ground_truth=ground_truth,
                stages=result.stages,
                query_paths={p.stem: p for p in paths["queries"]},  # ids are file stems
                reference_paths={p.stem: p for p in paths["references"]},
                evidence=result.evidence,
                grid=[GridResult("configured", s.describe(), result.stages, 0.0), *result.grid]
                if result.grid
                else (),
                subtitle=f"{subtitle} · {result.postprocessing}" if subtitle else result.postprocessing,
            )
        )
    with atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    if any(metrics["skipped_images"].values()):
        log.warning("skipped unreadable images: %s, listed in %s", metrics["skipped_images"], skipped.path)
    return EvaluationRun(result, s, ground_truth, metrics, out)


def _combined(
    models: Sequence[nn.Module], settings: EvaluationSettings
) -> tuple[list[nn.Module], EvaluationSettings]:
    """The models as evaluation runs them (``evaluation.gem_p``, ``whitening.raw``); the ensemble's
    ``concat`` rule makes one model of them whose descriptor is whitened to ``concat_dim``; without
    ``scales`` the test stage runs at the model's recorded input size."""
    if not models:
        raise ValueError("no model to evaluate: give ckpt_path, a backbone or evaluation.ensemble.models")
    models = [evaluated_model(m, settings) for m in models]
    e = settings.ensemble
    if e.models and e.rule == "concat":
        models = [ConcatModel(models)]
        whitening = dataclasses.replace(settings.whitening, enabled=True, dim=e.concat_dim)
        settings = dataclasses.replace(settings, whitening=whitening)
    if settings.test_stage and settings.scales is None:
        size = getattr(models[0], "image_size", None) or settings.image_size
        settings = dataclasses.replace(settings, scales=(size,))
    return models, settings


def _share(
    models: Sequence[nn.Module],
    paths: dict[str, list[Path]],
    s: EvaluationSettings,
    cache_dir: Path,
    ranks: Ranks,
) -> None:
    """This process's share of every extraction the run will make (the test stage's, or the global one)."""
    if s.test_stage:
        share_test_stage(models, paths, s, cache_dir, ranks.rank, ranks.world, ranks.sync)
        return
    for listing in _global_listings(models[0], paths, s):
        listing.extract_share(models[0], rank=ranks.rank, world=ranks.world, **s.engine(cache_dir))


def _global_listings(model: nn.Module, paths: dict[str, list[Path]], s: EvaluationSettings) -> list[Listing]:
    """One whole-image view per image of every split, at the model's recorded input size."""
    image_size = getattr(model, "image_size", None) or s.image_size
    return [
        Listing(files, [image_size], name=split, desc=f"{split} ({len(files)} images)")
        for split, files in paths.items()
    ]


def _grid_settings(
    settings: EvaluationSettings,
    resolved: EvaluationSettings,
    num_training: int,
    dims: Sequence[int],
    ground_truth: GroundTruth | None,
) -> list[tuple[str, EvaluationSettings]]:
    """``evaluation.grid``'s settings, each resolved as the run's are (checked before any extraction);
    none to score without a ground truth (``task=predict``)."""
    out = []
    for name in settings.grid:
        try:
            out.append((name, resolve_settings(settings.variant(name), num_training, dims)))
        except ValueError as e:
            raise ValueError(f"evaluation.grid entry {name!r}: {e}") from e
    if out and ground_truth is None:  # checked all the same; nothing to score them against
        log.info("evaluation.grid is not scored without a ground truth")
        return []
    if out:
        log.info(
            "scoring %d post-processing setting(s) besides %s: %s",
            len(out),
            resolved.describe(),
            ", ".join(name for name, _ in out),
        )
    return out


def _score_grid(
    grid: list[tuple[str, EvaluationSettings]],
    s: EvaluationSettings,
    configured: EvaluationResult,
    score: Callable[[EvaluationSettings], EvaluationResult],
) -> list[GridResult]:
    """Each grid entry's stages on the run's extraction (the global descriptors, or the test stage's
    shards read back): one post-processing fit and search each; an entry equal to the configured
    setting takes the configured result."""
    out = []
    for name, g in grid:
        started = time.perf_counter()
        same = g == s.as_grid_entry()
        result = configured if same else score(g)
        seconds = time.perf_counter() - started
        log.info(
            "grid %s (%s): %.1f s%s", name, g.describe(), seconds, " (the configured one)" if same else ""
        )
        out.append(GridResult(name, g.describe(), result.stages, seconds))
    return out


def _global(
    model: nn.Module, paths: dict[str, list[Path]], s: EvaluationSettings, cache_dir: Path | None
) -> tuple[Splits, Splits]:
    """One descriptor per image of every split at the model's recorded input size: (ids, vectors)."""
    image_size = getattr(model, "image_size", None) or s.image_size
    if image_size != s.image_size:
        log.info("evaluating at the model's %d px (evaluation.image_size=%d)", image_size, s.image_size)
    vectors: Splits = {}
    ids: Splits = {}
    started = time.perf_counter()
    for split, listing in zip(paths, _global_listings(model, paths, s), strict=True):
        d = listing.extract(model, **s.engine(cache_dir))
        vectors[split], ids[split] = d.vectors, d.ids
    n = sum(len(v) for v in ids.values())
    seconds = time.perf_counter() - started
    log.info("extracted %d descriptors in %.1f s (%.1f images/s)", n, seconds, n / max(seconds, 1e-9))
    return ids, vectors


def _match(
    ids: Splits, vectors: Splits, ground_truth: GroundTruth | None, s: EvaluationSettings
) -> EvaluationResult:
    return match_descriptors(
        ids["queries"],
        vectors["queries"],
        ids["references"],
        vectors["references"],
        vectors.get("training"),
        ground_truth,
        s,
        training_ids=ids.get("training"),
    )
