"""One self-contained HTML page that shows how a copy detector did: numbers, curves, and its worst mistakes.

A metric table says *how much* a detector got wrong; only looking at the pairs says *why* (a crop it
cannot handle, a near-duplicate distractor, a score that is badly calibrated). The page is written into
every evaluation run directory and must open anywhere, offline and years later, so it holds everything:
no network, no scripts, no external CSS or fonts; thumbnails are inlined as base64 JPEG ``data:`` URIs and
the charts are inline SVG drawn here (matplotlib is not a dependency).

- :func:`write_report`: the page (header numbers, precision-recall curve with the P90 operating point,
  score histograms of true and false pairs, a per-stage table, galleries of the top false positives and
  the missed copies, with the evidence boxes that produced a score drawn on the thumbnails).
- :func:`report_figures`: the numbers behind the charts, for logging elsewhere (e.g. wandb).

The metric itself is not re-implemented: curves and operating points come from
:mod:`isc.evaluation.metrics`, so the page always agrees with the official figures.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from isc.data.images import load_image
from isc.evaluation.metrics import evaluate, match_ranks, precision_recall_curve
from isc.evaluation.results import Evidence, GridResult, StageResult
from isc.formats.files import atomic_write
from isc.formats.pairs import GroundTruth, Predictions, pair_codes

__all__ = ["render_report", "report_figures", "write_report"]

THUMBNAIL_SIZE = 192
"""Longer side, in pixels, of the thumbnails (small enough that a 24-card page stays well under 1 MB)."""
P90 = 0.9
_METRICS = (
    ("uAP", "uAP"),
    ("recall_at_p90", "R@P90"),
    ("recall_at_rank1", "recall@1"),
    ("recall_at_rank10", "recall@10"),
)


# --------------------------------------------------------------------------------------------------
# the numbers behind the charts


def report_figures(
    predictions: Predictions, ground_truth: GroundTruth, *, max_points: int = 2000, bins: int = 40
) -> dict[str, Any]:
    """The data the charts draw, as numpy arrays, for logging the same pictures elsewhere.

    Keys:
    - ``precision``, ``recall``, ``thresholds`` (K,): the official precision-recall curve
      (:func:`~isc.evaluation.metrics.precision_recall_curve`), thinned to at most ``max_points`` points;
      ``curve_index`` (K,) are their positions in the full curve of ``num_curve_points`` points (the first,
      the last and the P90 point are always kept). Empty when the ground truth has no matched pair.
    - ``p90``: ``{"recall", "precision", "threshold"}`` of the recall-at-precision-90 operating point, or
      ``None`` when precision 0.9 is never reached.
    - ``bin_edges`` (bins + 1,), ``true_counts`` / ``false_counts`` (bins,) int64: histograms, over shared
      bins spanning all scores, of the scores of true pairs (the prediction is a ground-truth pair) and
      false pairs.
    - ``metrics``: :func:`~isc.evaluation.metrics.evaluate` as a dict; ``num_predictions``,
      ``num_positives`` (ground-truth pairs), ``num_true``, ``num_false``.

    Raises ``ValueError`` on duplicate predictions, as the official evaluation does.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    metrics = evaluate(ground_truth, predictions)
    empty = np.zeros(0, dtype=np.float64)
    p90: dict[str, float] | None = None
    if ground_truth.num_positives:
        curve = precision_recall_curve(ground_truth, predictions)
        precision, recall, thresholds = curve.precision, curve.recall, curve.thresholds
        true_scores, false_scores = thresholds[curve.is_match], thresholds[~curve.is_match]
        keep = [0, len(precision) - 1] if len(precision) else []
        if metrics.recall_at_p90 is not None:
            # locate the point evaluate() chose: the first one with its recall and precision >= 0.9
            at = int(np.flatnonzero((precision >= P90) & (recall == metrics.recall_at_p90))[0])
            p90 = {
                "recall": float(recall[at]),
                "precision": float(precision[at]),
                "threshold": float(thresholds[at]),
            }
            keep.append(at)
        n = len(precision)
        if n > max_points:
            spread = np.round(np.linspace(0, n - 1, max_points - 1)).astype(np.int64)
            index = np.unique(np.concatenate([spread, np.asarray(keep, dtype=np.int64)]))  # <= max_points
        else:
            index = np.arange(n, dtype=np.int64)
        precision, recall, thresholds = precision[index], recall[index], thresholds[index]
        num_curve_points = n
    else:
        precision = recall = thresholds = empty
        index = np.zeros(0, dtype=np.int64)
        num_curve_points = 0
        true_scores, false_scores = empty, predictions.scores
    scores = predictions.scores
    edges = np.histogram_bin_edges(scores, bins=bins) if len(scores) else np.linspace(0.0, 1.0, bins + 1)
    true_counts = np.histogram(true_scores, bins=edges)[0].astype(np.int64)
    false_counts = np.histogram(false_scores, bins=edges)[0].astype(np.int64)
    return {
        "precision": precision,
        "recall": recall,
        "thresholds": thresholds,
        "curve_index": index,
        "num_curve_points": num_curve_points,
        "p90": p90,
        "bin_edges": edges,
        "true_counts": true_counts,
        "false_counts": false_counts,
        "metrics": metrics.to_dict(),
        "num_predictions": len(predictions),
        "num_positives": ground_truth.num_positives,
        "num_true": len(true_scores),
        "num_false": len(false_scores),
    }


# --------------------------------------------------------------------------------------------------
# formatting


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _finite(value: object) -> float | None:
    """A metric as a float, or ``None`` when it is missing, ``None`` or not finite (all shown as n/a)."""
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _metric(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _score(value: float) -> str:
    return f"{value:.3e}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _num(value: float) -> str:
    """An SVG coordinate: one decimal keeps 2,000-point curves small."""
    return f"{value:.1f}"


def _nice_ticks(lo: float, hi: float, count: int = 5) -> tuple[list[float], int]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering ``[lo, hi]``, and decimals."""
    span = hi - lo if hi > lo else 1.0
    raw = span / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw * (1 - 1e-9)) * magnitude
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if round(step / magnitude, 6) == 2.5 else 0)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + step * 1e-9:
        ticks.append(round(k * step, 12))
        k += 1
    return ticks, decimals


# --------------------------------------------------------------------------------------------------
# charts (inline SVG)

_W, _H = 560, 360
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 20, 34, 50


def _axes(
    x_ticks: Sequence[float],
    x_decimals: int,
    y_ticks: Sequence[float],
    y_decimals: int,
    x_of: Any,
    y_of: Any,
    x_label: str,
    y_label: str,
    y_suffix: str = "",
) -> list[str]:
    """Grid lines, ticks, tick labels and axis titles shared by both charts."""
    out = ['<g class="grid">']
    for v in x_ticks:
        out.append(f'<line x1="{_num(x_of(v))}" y1="{_TOP}" x2="{_num(x_of(v))}" y2="{_H - _BOTTOM}"/>')
    for v in y_ticks:
        out.append(f'<line x1="{_LEFT}" y1="{_num(y_of(v))}" x2="{_W - _RIGHT}" y2="{_num(y_of(v))}"/>')
    out.append("</g>")
    out.append(
        f'<g class="axis"><line x1="{_LEFT}" y1="{_H - _BOTTOM}" x2="{_W - _RIGHT}" y2="{_H - _BOTTOM}"/>'
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_H - _BOTTOM}"/>'
    )
    for v in x_ticks:
        x = _num(x_of(v))
        out.append(f'<line x1="{x}" y1="{_H - _BOTTOM}" x2="{x}" y2="{_H - _BOTTOM + 5}"/>')
        out.append(
            f'<text class="tick" x="{x}" y="{_H - _BOTTOM + 18}" text-anchor="middle">{v:.{x_decimals}f}</text>'
        )
    for v in y_ticks:
        y = _num(y_of(v))
        out.append(f'<line x1="{_LEFT - 5}" y1="{y}" x2="{_LEFT}" y2="{y}"/>')
        out.append(
            f'<text class="tick" x="{_LEFT - 8}" y="{y}" text-anchor="end" dominant-baseline="middle">'
            f"{v:.{y_decimals}f}{y_suffix}</text>"
        )
    out.append("</g>")
    mid_x, mid_y = (_LEFT + _W - _RIGHT) / 2, (_TOP + _H - _BOTTOM) / 2
    out.append(
        f'<text class="label" x="{_num(mid_x)}" y="{_H - 10}" text-anchor="middle">{_esc(x_label)}</text>'
    )
    out.append(
        f'<text class="label" x="16" y="{_num(mid_y)}" text-anchor="middle" '
        f'transform="rotate(-90 16 {_num(mid_y)})">{_esc(y_label)}</text>'
    )
    return out


def _pr_chart(figures: Mapping[str, Any]) -> str:
    """Precision against recall, the P90 line, and the operating point the official R@P90 reports."""
    if figures["num_positives"] == 0:
        return (
            '<p class="note" data-note="no-positives">The ground truth lists no copy pair, so precision and '
            "recall are undefined: there is no curve to draw.</p>"
        )
    if figures["num_predictions"] == 0:
        return '<p class="note" data-note="no-predictions">There are no predictions: no curve to draw.</p>'
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x_of(r: float) -> float:
        return _LEFT + r * pw

    def y_of(p: float) -> float:
        return _TOP + (1 - p) * ph

    ticks = [i / 5 for i in range(6)]
    out = [
        f'<svg class="chart" id="pr-curve" viewBox="0 0 {_W} {_H}" role="img" '
        'aria-labelledby="pr-title"><title id="pr-title">Precision-recall curve</title>'
    ]
    out += _axes(ticks, 1, ticks, 1, x_of, y_of, "recall", "precision")
    recall, precision = figures["recall"], figures["precision"]
    points = [(0.0, float(precision[0]))] + list(zip(recall.tolist(), precision.tolist(), strict=True))
    line = " ".join(f"{_num(x_of(r))},{_num(y_of(p))}" for r, p in points)
    area = f"{_num(x_of(0))},{_num(y_of(0))} {line} {_num(x_of(points[-1][0]))},{_num(y_of(0))}"
    y90 = _num(y_of(P90))
    out.append(f'<polygon class="pr-area" points="{area}"/>')
    out.append(f'<line class="p90-line" x1="{_LEFT}" y1="{y90}" x2="{_W - _RIGHT}" y2="{y90}"/>')
    out.append(f'<text class="p90-line-label" x="{_LEFT + 6}" y="{_num(y_of(P90) - 5)}">precision 0.9</text>')
    out.append(f'<polyline class="pr-line" points="{line}"/>')
    p90 = figures["p90"]
    if p90 is not None:
        cx, cy = x_of(p90["recall"]), y_of(p90["precision"])
        label = f"P90: recall {p90['recall']:.3f} at score {_score(p90['threshold'])}"
        right = p90["recall"] > 0.55
        tx = cx - 10 if right else cx + 10
        out.append(
            f'<line class="p90-drop" x1="{_num(cx)}" y1="{_num(cy)}" x2="{_num(cx)}" y2="{_H - _BOTTOM}"/>'
        )
        out.append(
            f'<circle class="p90-point" cx="{_num(cx)}" cy="{_num(cy)}" r="5" '
            f'data-recall="{p90["recall"]!r}" data-precision="{p90["precision"]!r}" '
            f'data-threshold="{p90["threshold"]!r}"><title>{_esc(label)}</title></circle>'
        )
        out.append(
            f'<text class="p90-label" x="{_num(tx)}" y="{_num(max(cy, y_of(P90)) + 22)}" '
            f'text-anchor="{"end" if right else "start"}">{_esc(label)}</text>'
        )
    out.append("</svg>")
    if p90 is None:
        best = float(np.max(figures["precision"])) if len(figures["precision"]) else 0.0
        out.append(
            '<p class="note" data-note="p90-unreached">Precision 0.9 is never reached (best precision '
            f"{best:.3f}), so recall at precision 90 is undefined and there is no operating threshold.</p>"
        )
    return "".join(out)


def _histogram_chart(figures: Mapping[str, Any]) -> str:
    """Score histograms of true and false pairs: how well one threshold can separate them."""
    if figures["num_predictions"] == 0:
        return '<p class="note" data-note="no-predictions">There are no predictions: no scores to show.</p>'
    edges = figures["bin_edges"].astype(np.float64)
    series = [
        ("true", "true pairs", figures["true_counts"], figures["num_true"]),
        ("false", "false pairs", figures["false_counts"], figures["num_false"]),
    ]
    # Each class as a share of its own pairs: false pairs usually outnumber true ones 50 to 1, and raw
    # counts would flatten the true histogram into the axis. Raw counts are in each bar's tooltip.
    shares = [c / total if total else np.zeros(len(c)) for _, _, c, total in series]
    top = max(float(max(s.max() for s in shares)), 1e-12)
    lo, hi = float(edges[0]), float(edges[-1])
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    x_ticks, x_decimals = _nice_ticks(lo, hi, 8)
    x_ticks = [v for v in x_ticks if lo - 1e-12 <= v <= hi + 1e-12]
    y_ticks, y_decimals = _nice_ticks(0.0, top * 100)
    y_max = max(y_ticks[-1], top * 100)

    def x_of(v: float) -> float:
        return _LEFT + (v - lo) / (hi - lo) * pw

    def y_of(percent: float) -> float:
        return _TOP + (1 - percent / y_max) * ph

    out = [
        f'<svg class="chart" id="score-histogram" viewBox="0 0 {_W} {_H}" role="img" '
        'aria-labelledby="hist-title"><title id="hist-title">Score histograms of true and false pairs</title>'
    ]
    out += _axes(
        x_ticks, x_decimals, y_ticks, y_decimals, x_of, y_of, "score", "share of the class's pairs", "%"
    )
    for (key, name, counts, _), share in zip(series, shares, strict=True):
        out.append(f'<g class="bars {key}" data-series="{key}">')
        for i, (count, part) in enumerate(zip(counts.tolist(), share.tolist(), strict=True)):
            if count == 0:
                continue
            x0, x1 = x_of(float(edges[i])), x_of(float(edges[i + 1]))
            y = y_of(part * 100)
            tip = f"{name}, score {_score(float(edges[i]))} to {_score(float(edges[i + 1]))}: {count}"
            out.append(
                f'<rect x="{_num(x0)}" y="{_num(y)}" width="{_num(max(x1 - x0, 0.5))}" '
                f'height="{_num(_H - _BOTTOM - y)}" data-bin="{i}" data-count="{count}">'
                f"<title>{_esc(tip)}</title></rect>"
            )
        out.append("</g>")
    p90 = figures["p90"]
    if p90 is not None:
        x = _num(x_of(p90["threshold"]))
        label = f"P90 threshold {_score(p90['threshold'])}"
        anchor_right = (p90["threshold"] - lo) / (hi - lo) > 0.6
        out.append(
            f'<line class="p90-threshold" x1="{x}" y1="{_TOP}" x2="{x}" y2="{_H - _BOTTOM}" '
            f'data-threshold="{p90["threshold"]!r}"/>'
        )
        out.append(
            f'<text class="p90-threshold-label" x="{_num(x_of(p90["threshold"]) + (-6 if anchor_right else 6))}" '
            f'y="{_TOP + 14}" text-anchor="{"end" if anchor_right else "start"}">{_esc(label)}</text>'
        )
    # the legend sits in the top margin, where it can hide no bar
    lx = _LEFT
    for key, name, _, total in series:
        text = f"{name} (n={total:,})"
        out.append(
            f'<g class="legend" data-series="{key}"><rect class="swatch {key}" x="{lx}" y="8" '
            f'width="14" height="14"/><text x="{lx + 20}" y="19">{_esc(text)}</text></g>'
        )
        lx += 20 + 7 * len(text) + 24
    out.append("</svg>")
    if p90 is None:
        out.append(
            '<p class="note" data-note="no-threshold">Precision 0.9 is never reached: no P90 threshold to '
            "draw.</p>"
        )
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# thumbnails


@dataclass(frozen=True)
class _Thumb:
    uri: str
    width: int  # display size, longer side THUMBNAIL_SIZE
    height: int
    scale: float  # display pixels per original pixel


def _load_thumb(path: str | os.PathLike[str] | None) -> _Thumb | str:
    """A JPEG data URI of the image at thumbnail size, or why it could not be made (never raises)."""
    if path is None:
        return "no image file is known for this id"
    try:
        image = load_image(path)
        width, height = image.size
        scale = THUMBNAIL_SIZE / max(width, height)
        shown = (max(1, round(width * scale)), max(1, round(height * scale)))
        if scale < 1:
            image = image.resize(shown, Image.Resampling.LANCZOS, reducing_gap=3.0)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=82, optimize=True)
    except Exception as e:  # a report must never fail over one image: show a placeholder instead
        return getattr(e, "reason", "") or f"{type(e).__name__}: {e}"
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return _Thumb(uri, shown[0], shown[1], scale)


def _thumb_html(
    role: str,
    image_id: str,
    thumb: _Thumb | str,
    box: tuple[int, int, int, int] | None,
) -> str:
    """One thumbnail with its evidence box (an SVG rect over the <img>), or a placeholder naming the id."""
    caption = f"<figcaption>{role} <code>{_esc(image_id)}</code></figcaption>"
    if isinstance(thumb, str):
        return (
            f'<figure class="thumb"><div class="thumb-box"><div class="placeholder" role="img" '
            f'data-image-id="{_esc(image_id)}" aria-label="{_esc(f"{role} {image_id}: image unavailable")}" '
            f'title="{_esc(thumb)}"><code>{_esc(image_id)}</code><small>image unavailable</small>'
            f"<small>{_esc(thumb)}</small></div></div>{caption}</figure>"
        )
    overlay = ""
    if box is not None:
        x0, y0, x1, y1 = (float(v) * thumb.scale for v in box)
        x0, x1 = sorted((min(max(x0, 0.0), thumb.width), min(max(x1, 0.0), thumb.width)))
        y0, y1 = sorted((min(max(y0, 0.0), thumb.height), min(max(y1, 0.0), thumb.height)))
        if x1 > x0 and y1 > y0:
            geometry = f'x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}"'
            overlay = (
                f'<svg class="overlay" viewBox="0 0 {thumb.width} {thumb.height}" preserveAspectRatio="none" '
                f'aria-hidden="true"><rect class="evidence-halo" {geometry}/>'
                f'<rect class="evidence-box" {geometry} data-box-image="{_esc(image_id)}" '
                f'data-box="{",".join(str(int(v)) for v in box)}"/></svg>'
            )
    width_percent = 100 * thumb.width / THUMBNAIL_SIZE
    return (
        f'<figure class="thumb"><div class="thumb-box"><div class="frame" style="width:{width_percent:.2f}%">'
        f'<img src="{thumb.uri}" data-image-id="{_esc(image_id)}" alt="{_esc(f"{role} {image_id}")}" '
        f'width="{thumb.width}" height="{thumb.height}" loading="lazy">{overlay}</div></div>{caption}</figure>'
    )


# --------------------------------------------------------------------------------------------------
# galleries


@dataclass(frozen=True)
class _Card:
    kind: str  # "false-positive" or "missed"
    query_id: str
    reference_id: str
    score: float | None  # None: not retrieved
    rank: int | None  # 1-based, pessimistic ties as in recall@k
    of: int  # predictions for this query
    facts: tuple[tuple[str, str], ...]


class _Galleries:
    """The false positives and missed copies to show, chosen with the same pair matching as the metric."""

    def __init__(
        self, predictions: Predictions, ground_truth: GroundTruth, threshold: float | None, size: int
    ) -> None:
        self.predictions, self.threshold = predictions, threshold
        q, r, s = predictions.query_ids, predictions.reference_ids, predictions.scores
        gt_q, gt_r = ground_truth.pairs()
        self.gt_q, self.gt_r = gt_q, gt_r
        n = len(predictions)
        codes = pair_codes(np.concatenate([q, gt_q]), np.concatenate([r, gt_r]))
        prediction_codes, truth_codes = codes[:n], codes[n:]
        is_match = np.isin(prediction_codes, truth_codes)

        wrong = np.flatnonzero(~is_match)
        order = np.lexsort((r[wrong], q[wrong], -s[wrong]))
        self.num_false = len(wrong)
        self.false_above = int(np.sum(s[wrong] >= threshold)) if threshold is not None else None
        self.false_positives = [self._false_card(int(i)) for i in wrong[order[:size]]]

        # the prediction row of each ground-truth pair, -1 when the pair was never retrieved
        row = np.full(len(truth_codes), -1, dtype=np.int64)
        if n:
            sorter = np.argsort(prediction_codes, kind="stable")
            pos = np.minimum(np.searchsorted(prediction_codes[sorter], truth_codes), n - 1)
            found = prediction_codes[sorter][pos] == truth_codes
            row[found] = sorter[pos[found]]
        truth_scores = np.where(row >= 0, s[np.maximum(row, 0)] if n else 0.0, np.inf)
        ranks = match_ranks(ground_truth, predictions) if len(truth_codes) else np.zeros(0, np.int64)
        unretrieved = np.flatnonzero(row < 0)
        unretrieved = unretrieved[np.lexsort((gt_r[unretrieved], gt_q[unretrieved]))]
        low = np.flatnonzero((row >= 0) & (truth_scores < (threshold if threshold is not None else np.inf)))
        low = low[np.lexsort((gt_r[low], gt_q[low], truth_scores[low]))]
        missed = np.concatenate([unretrieved, low])
        self.num_missed, self.num_unretrieved = len(missed), len(unretrieved)
        self.missed = [self._missed_card(int(j), int(row[j]), int(ranks[j])) for j in missed[:size].tolist()]

    def _query_rows(self, query_id: str) -> np.ndarray:
        return np.flatnonzero(self.predictions.query_ids == query_id)

    def _false_card(self, i: int) -> _Card:
        p = self.predictions
        query_id, score = str(p.query_ids[i]), float(p.scores[i])
        rows = self._query_rows(query_id)
        true_refs = self.gt_r[self.gt_q == query_id]
        truth = ", ".join(str(t) for t in true_refs) if len(true_refs) else "none: this query is not a copy"
        facts = [("true match", truth)]
        if self.threshold is not None:
            facts.append(
                ("vs P90", "at or above the threshold" if score >= self.threshold else "below the threshold")
            )
        rank = int(np.sum(p.scores[rows] >= score))
        return _Card(
            "false-positive", query_id, str(p.reference_ids[i]), score, rank, len(rows), tuple(facts)
        )

    def _missed_card(self, j: int, row: int, rank: int) -> _Card:
        p = self.predictions
        query_id, reference_id = str(self.gt_q[j]), str(self.gt_r[j])
        rows = self._query_rows(query_id)
        facts = []
        if len(rows):
            best = rows[np.argmax(p.scores[rows])]
            if p.reference_ids[best] != reference_id:
                facts.append(("top-1 instead", f"{p.reference_ids[best]} ({_score(float(p.scores[best]))})"))
        else:
            facts.append(("top-1 instead", "no prediction for this query"))
        if row < 0:
            return _Card("missed", query_id, reference_id, None, None, len(rows), tuple(facts))
        return _Card(
            "missed", query_id, reference_id, float(p.scores[row]), rank + 1, len(rows), tuple(facts)
        )


def _card_html(
    card: _Card,
    thumbs: dict[tuple[str, str], _Thumb | str],
    query_paths: Mapping[str, str | os.PathLike[str]],
    reference_paths: Mapping[str, str | os.PathLike[str]],
    evidence: Mapping[tuple[str, str], Evidence],
) -> str:
    def thumb(kind: str, image_id: str, paths: Mapping[str, str | os.PathLike[str]]) -> _Thumb | str:
        if (kind, image_id) not in thumbs:
            thumbs[kind, image_id] = _load_thumb(paths.get(image_id))
        return thumbs[kind, image_id]

    found = evidence.get((card.query_id, card.reference_id))
    query = _thumb_html(
        "query", card.query_id, thumb("q", card.query_id, query_paths), found.query_box if found else None
    )
    reference = _thumb_html(
        "reference",
        card.reference_id,
        thumb("r", card.reference_id, reference_paths),
        found.reference_box if found else None,
    )
    score = "not retrieved" if card.score is None else _score(card.score)
    rank = "n/a" if card.rank is None else f"{card.rank} of {card.of}"
    facts = [("score", score), ("rank", rank), *card.facts]
    if found is not None and found.label:
        facts.append(("evidence", found.label))
    rows = "".join(
        f'<dt>{_esc(k)}</dt><dd class="{_esc(k.replace(" ", "-"))}">{_esc(v)}</dd>' for k, v in facts
    )
    score_attr = "" if card.score is None else f' data-score="{card.score!r}"'
    return (
        f'<article class="card {card.kind}" data-kind="{card.kind}" data-query-id="{_esc(card.query_id)}" '
        f'data-reference-id="{_esc(card.reference_id)}"{score_attr}>'
        f'<div class="pair">{query}{reference}</div><dl class="facts">{rows}</dl></article>'
    )


# --------------------------------------------------------------------------------------------------
# the page

_CSS = """
:root {
  --fg: #1f2328; --muted: #59636e; --bg: #f6f8fa; --panel: #ffffff; --border: #d1d9e0;
  --accent: #0969da; --true: #2166ac; --false: #e08214; --mark: #d1242f; --good: #1a7f37;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 24px; }
header.top { background: var(--panel); border: 1px solid var(--border); border-radius: 10px; padding: 20px 24px; }
h1 { margin: 0; font-size: 26px; line-height: 1.25; }
h2 { margin: 0 0 4px; font-size: 20px; }
.subtitle { margin: 4px 0 0; color: var(--muted); overflow-wrap: anywhere; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; margin: 18px 0 10px; }
.tile { border: 1px solid var(--border); border-radius: 8px; padding: 10px 14px; background: var(--bg); }
.tile .name { color: var(--muted); font-size: 13px; }
.tile .value { font-size: 26px; font-weight: 600; font-variant-numeric: tabular-nums; white-space: nowrap; }
.tile .extra { color: var(--muted); font-size: 12px; }
.counts { margin: 0; color: var(--muted); font-size: 14px; }
nav { margin-top: 10px; font-size: 14px; }
nav a { color: var(--accent); margin-right: 16px; text-decoration: none; }
nav a:hover { text-decoration: underline; }
section { background: var(--panel); border: 1px solid var(--border); border-radius: 10px; padding: 18px 24px;
  margin-top: 18px; }
.explain { margin: 0 0 12px; color: var(--muted); font-size: 14px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(440px, 100%), 1fr)); gap: 20px; }
.charts figure { margin: 0; }
.charts figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart text { font: 12px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: var(--muted); }
svg.chart text.label { font-size: 13px; fill: var(--fg); }
.grid line { stroke: #eaeef2; stroke-width: 1; }
.axis line { stroke: #8c959f; stroke-width: 1; }
.pr-line { fill: none; stroke: var(--accent); stroke-width: 2; stroke-linejoin: round; }
.pr-area { fill: var(--accent); fill-opacity: 0.08; stroke: none; }
.p90-line { stroke: var(--mark); stroke-width: 1; stroke-dasharray: 5 4; opacity: 0.7; }
svg.chart text.p90-line-label { fill: var(--mark); paint-order: stroke; stroke: #fff; stroke-width: 3px; }
.p90-drop { stroke: var(--mark); stroke-width: 1; stroke-dasharray: 2 3; }
.p90-point { fill: var(--mark); stroke: #fff; stroke-width: 2; }
svg.chart text.p90-label { fill: var(--mark); font-weight: 600; font-size: 13px; paint-order: stroke;
  stroke: #fff; stroke-width: 4px; }
.bars.true rect, .swatch.true { fill: var(--true); fill-opacity: 0.6; }
.bars.false rect, .swatch.false { fill: var(--false); fill-opacity: 0.6; }
.legend text { fill: var(--fg) !important; }
.p90-threshold { stroke: var(--mark); stroke-width: 1.5; stroke-dasharray: 6 4; }
svg.chart text.p90-threshold-label { fill: var(--mark); font-weight: 600; paint-order: stroke; stroke: #fff;
  stroke-width: 4px; }
.note { margin: 8px 0 0; padding: 8px 12px; border-left: 4px solid var(--false); background: #fff8ec;
  font-size: 14px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 8px 12px; border-bottom: 1px solid var(--border); text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { color: var(--muted); font-weight: 600; font-size: 13px; border-bottom-width: 2px; }
tbody tr:last-child > * { border-bottom: none; }
tbody tr.final { background: #f1f8ff; }
td.best { font-weight: 700; }
.delta { display: block; font-size: 12px; color: var(--muted); font-weight: 400; }
.delta.up { color: var(--good); }
.delta.down { color: var(--mark); }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(350px, 100%), 1fr)); gap: 14px; }
.card { border: 1px solid var(--border); border-radius: 8px; padding: 10px; background: var(--panel); }
.card.false-positive { border-top: 4px solid var(--false); }
.card.missed { border-top: 4px solid var(--true); }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
figure.thumb { margin: 0; min-width: 0; }
.thumb-box { width: 100%; max-width: 192px; aspect-ratio: 1 / 1; margin: 0 auto; display: flex;
  align-items: center; justify-content: center; background: #eef1f4; border-radius: 4px; overflow: hidden; }
.frame { position: relative; max-width: 100%; }
.frame img { display: block; width: 100%; height: auto; }
.overlay { position: absolute; inset: 0; width: 100%; height: 100%; pointer-events: none; }
.evidence-halo { fill: none; stroke: #fff; stroke-width: 4; vector-effect: non-scaling-stroke; }
.evidence-box { fill: var(--mark); fill-opacity: 0.12; stroke: var(--mark); stroke-width: 2;
  vector-effect: non-scaling-stroke; }
.placeholder { width: 100%; height: 100%; display: flex; flex-direction: column; align-items: center;
  justify-content: center; gap: 2px; padding: 8px; text-align: center; color: var(--muted);
  border: 2px dashed #afb8c1; border-radius: 4px; font-size: 12px; overflow-wrap: anywhere; }
.placeholder code { font-size: 13px; color: var(--fg); }
figure.thumb figcaption { text-align: center; font-size: 12px; color: var(--muted); margin-top: 4px;
  overflow-wrap: anywhere; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; margin: 10px 0 0;
  font-size: 13px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; font-variant-numeric: tabular-nums; }
dl.facts dd.evidence { color: var(--mark); }
.empty { color: var(--muted); font-style: italic; }
footer { color: var(--muted); font-size: 13px; text-align: center; margin: 18px 0 6px; }
@media (max-width: 600px) {
  main { padding: 10px; }
  header.top, section { padding: 14px; }
  .tiles { grid-template-columns: repeat(2, 1fr); }
  .tile .value { font-size: 22px; }
}
"""


def _tiles(stage: StageResult | None, metrics: Mapping[str, Any], p90: Mapping[str, float] | None) -> str:
    values = stage.figures if stage is not None else metrics
    tiles = []
    for key, name in _METRICS:
        value = _finite(values.get(key))
        extra = ""
        if key == "recall_at_p90" and p90 is not None:
            extra = f"at score {_score(p90['threshold'])}"
        tiles.append(
            f'<div class="tile" data-metric="{key}"><div class="name">{name}</div>'
            f'<div class="value">{_metric(value)}</div><div class="extra">{_esc(extra)}</div></div>'
        )
    seconds = stage.seconds_per_query if stage is not None else None
    tiles.append(
        '<div class="tile" data-metric="seconds_per_query"><div class="name">time per query</div>'
        f'<div class="value">{_seconds(_finite(seconds))}</div><div class="extra"></div></div>'
    )
    source = f"after stage “{_esc(stage.name)}”" if stage is not None else "of the submitted predictions"
    return f'<div class="tiles" title="{source}">{"".join(tiles)}</div>'


def _stage_table(stages: Sequence[StageResult]) -> str:
    """Each stage's metrics and the change from the stage before: which step earned its cost."""
    if not stages:
        return '<p class="empty">No stages were recorded.</p>'
    columns = [*_METRICS, ("seconds_per_query", "time / query")]
    table = [
        [_finite(s.seconds_per_query if k == "seconds_per_query" else s.figures.get(k)) for k, _ in columns]
        for s in stages
    ]
    best: list[float | None] = []
    for c, (key, _) in enumerate(columns):
        defined = [row[c] for row in table if row[c] is not None]
        pick = min if key == "seconds_per_query" else max
        best.append(pick(defined) if len(defined) > 1 else None)  # type: ignore[type-var]
    head = "".join(f'<th scope="col">{name}</th>' for _, name in columns)
    body = []
    for i, (stage, row) in enumerate(zip(stages, table, strict=True)):
        cells = []
        for c, (key, _) in enumerate(columns):
            value = row[c]
            text = _seconds(value) if key == "seconds_per_query" else _metric(value)
            delta = ""
            previous = table[i - 1][c] if i else None
            if key != "seconds_per_query" and value is not None and previous is not None:
                change = value - previous
                direction = "up" if change > 5e-5 else "down" if change < -5e-5 else "same"
                delta = f'<span class="delta {direction}">{change:+.4f}</span>'
            classes = "num best" if best[c] is not None and value == best[c] else "num"
            data = "" if value is None else repr(value)
            cells.append(f'<td class="{classes}" data-metric="{key}" data-value="{data}">{text}{delta}</td>')
        final = ' class="final"' if i == len(stages) - 1 else ""
        body.append(
            f'<tr{final} data-stage="{_esc(stage.name)}"><th scope="row">{_esc(stage.name)}</th>{"".join(cells)}</tr>'
        )
    return (
        '<div class="table-wrap"><table id="stage-table"><thead><tr><th scope="col">stage</th>'
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _grid_table(grid: Sequence[GridResult]) -> str:
    """uAP of every stage (rows) under every post-processing setting (columns: the configured one first,
    then ``evaluation.grid``'s), one extraction for all; the best cell is marked."""
    columns = [(g.name, g.postprocessing, g.stages) for g in grid]
    stages = grid[0].stages
    uap = [{st.name: _finite(st.figures.get("uAP")) for st in col} for _, _, col in columns]
    defined = [v for col in uap for v in col.values() if v is not None]
    best = max(defined) if defined else None
    head = "".join(
        f'<th scope="col" title="{_esc(words)}">{_esc(name)}<br><small>{_esc(words)}</small></th>'
        for name, words, _ in columns
    )
    body = []
    for st in stages:
        cells = []
        for (name, _, _), col in zip(columns, uap, strict=True):
            value = col.get(st.name)
            classes = "num best" if best is not None and value == best else "num"
            data = "" if value is None else repr(value)
            cells.append(
                f'<td class="{classes}" data-setting="{_esc(name)}" data-value="{data}">{_metric(value)}</td>'
            )
        body.append(
            f'<tr data-stage="{_esc(st.name)}"><th scope="row">{_esc(st.name)}</th>{"".join(cells)}</tr>'
        )
    return (
        '<section id="grid"><h2>Post-processing grid</h2><p class="explain">uAP of each stage with each '
        "post-processing setting, all scored on the same extraction; bold marks the best cell.</p>"
        '<div class="table-wrap"><table id="grid-table"><thead><tr><th scope="col">stage</th>'
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>"
    )


def render_report(
    *,
    predictions: Predictions,
    ground_truth: GroundTruth,
    stages: Sequence[StageResult],
    query_paths: Mapping[str, str | os.PathLike[str]],
    reference_paths: Mapping[str, str | os.PathLike[str]],
    evidence: Mapping[tuple[str, str], Evidence] | None = None,
    grid: Sequence[GridResult] = (),
    title: str = "Copy detection report",
    subtitle: str = "",
    gallery_size: int = 12,
) -> str:
    """The report page as one HTML string (see :func:`write_report`)."""
    if gallery_size < 0:
        raise ValueError(f"gallery_size must be >= 0, got {gallery_size}")
    evidence = evidence or {}
    figures = report_figures(predictions, ground_truth)
    p90 = figures["p90"]
    threshold = p90["threshold"] if p90 is not None else None
    galleries = _Galleries(predictions, ground_truth, threshold, gallery_size)
    thumbs: dict[tuple[str, str], _Thumb | str] = {}

    def cards(chosen: Sequence[_Card]) -> str:
        if not chosen:
            return '<p class="empty">Nothing to show.</p>'
        return "".join(_card_html(c, thumbs, query_paths, reference_paths, evidence) for c in chosen)

    num_queries = len(np.unique(ground_truth.query_ids))
    num_copies = len(np.unique(galleries.gt_q))
    counts = (
        f"{num_queries:,} queries ({num_copies:,} with a copy), {figures['num_positives']:,} ground-truth "
        f"pairs, {figures['num_predictions']:,} predictions ({figures['num_true']:,} true, "
        f"{figures['num_false']:,} false)."
    )
    last = stages[-1] if stages else None
    if threshold is not None:
        fp_explain = (
            f"The {len(galleries.false_positives)} highest-scoring of {galleries.num_false:,} predictions that "
            f"are not ground-truth pairs; {galleries.false_above:,} of them score at or above the P90 "
            f"threshold {_score(threshold)}."
        )
        missed_explain = (
            f"Ground-truth pairs not retrieved at all ({galleries.num_unretrieved:,}) or scored below the P90 "
            f"threshold {_score(threshold)}: {galleries.num_missed:,} in all. Shown: "
            f"{len(galleries.missed)}, the unretrieved first, then the lowest scores."
        )
    else:
        fp_explain = (
            f"The {len(galleries.false_positives)} highest-scoring of {galleries.num_false:,} predictions that "
            "are not ground-truth pairs."
        )
        missed_explain = (
            "Precision 0.9 is never reached, so there is no operating threshold: every ground-truth pair "
            f"counts as missed ({galleries.num_missed:,}; {galleries.num_unretrieved:,} never retrieved). "
            f"Shown: {len(galleries.missed)}, the unretrieved first, then the lowest scores."
        )
    metrics = figures["metrics"]
    uap = _finite(metrics.get("uAP"))
    pr_caption = "Precision-recall curve" + (
        f" (uAP {uap:.4f} of the submitted predictions)" if uap is not None else ""
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        '<header class="top">',
        f"<h1>{_esc(title)}</h1>",
        f'<p class="subtitle">{_esc(subtitle)}</p>' if subtitle else "",
        _tiles(last, metrics, p90),
        f'<p class="counts">{_esc(counts)}</p>',
        '<nav><a href="#curves">curves</a><a href="#stages">stages</a>'
        '<a href="#false-positives">top false positives</a><a href="#missed">missed copies</a></nav>',
        "</header>",
        '<section id="curves"><h2>How the scores separate copies from non-copies</h2>',
        '<p class="explain">Predictions ranked by score, ties counted pessimistically as in the official '
        "metric. R@P90 is the highest recall at which at least 90% of the predictions above the threshold "
        "are copies.</p>",
        '<div class="charts">',
        f"<figure><figcaption>{_esc(pr_caption)}</figcaption>{_pr_chart(figures)}</figure>",
        "<figure><figcaption>Scores of true and false pairs</figcaption>"
        f"{_histogram_chart(figures)}</figure>",
        "</div></section>",
        '<section id="stages"><h2>Stages</h2>',
        '<p class="explain">Metrics after each step of the pipeline; small numbers give the change from the '
        "step before, bold marks the best value of each column.</p>",
        _stage_table(stages),
        "</section>",
        _grid_table(grid) if grid else "",
        '<section id="false-positives"><h2>Top false positives</h2>',
        f'<p class="explain">{_esc(fp_explain)}</p>',
        f'<div class="gallery" data-gallery="false-positives">{cards(galleries.false_positives)}</div>',
        "</section>",
        '<section id="missed"><h2>Missed copies</h2>',
        f'<p class="explain">{_esc(missed_explain)}</p>',
        f'<div class="gallery" data-gallery="missed">{cards(galleries.missed)}</div>',
        "</section>",
        "<footer>Self-contained page: images and charts are embedded, nothing is loaded from the network. "
        "Ranks count every prediction of the query scoring at least as high (as recall@k does).</footer>",
        "</main>",
        "</body>",
        "</html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def write_report(
    path: str | os.PathLike[str],
    *,
    predictions: Predictions,
    ground_truth: GroundTruth,
    stages: Sequence[StageResult],
    query_paths: Mapping[str, str | os.PathLike[str]],
    reference_paths: Mapping[str, str | os.PathLike[str]],
    evidence: Mapping[tuple[str, str], Evidence] | None = None,
    grid: Sequence[GridResult] = (),
    title: str = "Copy detection report",
    subtitle: str = "",
    gallery_size: int = 12,
) -> Path:
    """Write the self-contained HTML report to ``path`` atomically and return the path.

    ``predictions`` are the final, submitted ones (the curves and galleries show them); ``stages`` the
    metrics after each pipeline step, the last one giving the headline numbers. ``query_paths`` and
    ``reference_paths`` map ids to image files; a missing or unreadable file becomes a placeholder naming
    the id. ``evidence`` maps ``(query_id, reference_id)`` to the boxes and label behind the pair's score.
    ``grid``: every stage under each post-processing setting (the configured one first), a table of uAP.
    ``gallery_size`` cards are shown in each gallery.
    """
    page = render_report(
        predictions=predictions,
        ground_truth=ground_truth,
        stages=stages,
        query_paths=query_paths,
        reference_paths=reference_paths,
        evidence=evidence,
        grid=grid,
        title=title,
        subtitle=subtitle,
        gallery_size=gallery_size,
    )
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    return path
