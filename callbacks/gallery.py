"""The per-epoch match gallery: a few matched queries and their top references, green when correct."""

from __future__ import annotations

import numpy as np
from PIL import Image

from isc.data.images import Disc21Layout, load_image
from isc.evaluation.results import EvaluationResult


def match_gallery(
    layout: Disc21Layout, result: EvaluationResult, n_queries: int, top: int = 4, thumb: int = 96
) -> Image.Image:
    """Rows of (query | top matches), green border = correct match, red = wrong."""
    gt = layout.ground_truth()
    truth = dict(zip(*gt.pairs(), strict=True))
    pred = result.predictions
    queries = [q for q in dict.fromkeys(pred.query_ids.tolist()) if q in truth][:n_queries]
    refs = {p.stem: p for p in layout.paths("references")}
    qpaths = {p.stem: p for p in layout.paths("queries")}
    sheet = Image.new("RGB", ((top + 1) * (thumb + 6), max(1, len(queries)) * (thumb + 6)), "white")
    for row, q in enumerate(queries):
        mine = np.flatnonzero(pred.query_ids == q)
        mine = mine[np.argsort(-pred.scores[mine], kind="stable")][:top]
        cells = [(qpaths[q], (128, 128, 128))] + [
            (refs[r], (0, 170, 0) if truth[q] == r else (200, 0, 0)) for r in pred.reference_ids[mine]
        ]
        for col, (path, colour) in enumerate(cells):
            tile = load_image(path).resize((thumb, thumb))
            x, y = col * (thumb + 6), row * (thumb + 6)
            sheet.paste(Image.new("RGB", (thumb + 6, thumb + 6), colour), (x, y))
            sheet.paste(tile, (x + 3, y + 3))
    return sheet
