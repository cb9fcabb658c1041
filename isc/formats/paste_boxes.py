"""The paste-box CSV: where generation pasted an image into a larger canvas, one row per pasted image.

Format (UTF-8, header first)::

    image_id,x0,y0,x1,y1
    T000010/03,12.5,40.0,180.25,201.0     pasted image on x in [12.5, 180.25), y in [40, 201) of the output
    T000010/07,,,,                        pasted, but no exact box (rotated or warped after the paste)

Coordinates are output pixels (floats, two decimals; ``x1``/``y1`` exclusive as PIL's ``crop``). An image
without a row had no paste. ``image_id`` is the image's path below the set's folder without extension
(``<class_id>/<NN>`` for ``task=generate``) or its DISC21 id (``Q00012`` for a benchmark's queries).
Written atomically; :func:`read_paste_boxes` checks what it reads.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from isc.formats.files import atomic_write

__all__ = ["PASTE_BOXES_HEADER", "PasteBox", "read_paste_boxes", "write_paste_boxes"]

PASTE_BOXES_HEADER = ("image_id", "x0", "y0", "x1", "y1")

PasteBox = tuple[float, float, float, float] | None  # None: pasted, no exact box


def paste_box_rows(boxes: Mapping[str, PasteBox] | Iterable[tuple[str, PasteBox]]) -> list[list[str]]:
    """The CSV rows (without header) of ``image_id -> box`` entries, in the given order."""
    items = boxes.items() if isinstance(boxes, Mapping) else boxes
    return [
        [image_id] + (["", "", "", ""] if box is None else [f"{v:.2f}" for v in box])
        for image_id, box in items
    ]


def write_paste_boxes(
    path: str | os.PathLike[str], boxes: Mapping[str, PasteBox] | Iterable[tuple[str, PasteBox]]
) -> Path:
    """Write ``image_id -> box`` (``None``: pasted without an exact box) as a paste-box CSV, atomically."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PASTE_BOXES_HEADER)
        writer.writerows(paste_box_rows(boxes))
    return path


def read_paste_boxes(path: str | os.PathLike[str]) -> dict[str, PasteBox]:
    """``image_id -> box`` of a paste-box CSV; a bad header, row or box is a ``ValueError`` naming the line."""
    path = Path(path)
    out: dict[str, PasteBox] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != PASTE_BOXES_HEADER:
            raise ValueError(f"{path}: expected the header {','.join(PASTE_BOXES_HEADER)}, got {header}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 5:
                raise ValueError(f"{path}:{line}: expected 5 fields, got {len(row)}")
            image_id, *coords = (v.strip() for v in row)
            if all(c == "" for c in coords):
                out[image_id] = None
                continue
            try:
                x0, y0, x1, y1 = (float(c) for c in coords)
            except ValueError:
                raise ValueError(
                    f"{path}:{line}: coordinates must be numbers or all empty, got {coords}"
                ) from None
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
                raise ValueError(f"{path}:{line}: need 0 <= x0 < x1 and 0 <= y0 < y1, got {coords}")
            out[image_id] = (x0, y0, x1, y1)
    return out
