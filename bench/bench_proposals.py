"""Time per query of the selective-search proposals (``isc.evaluation.proposals.selective_search_boxes``).

D2LV runs selective search on every query at full resolution (seed
``Test/augmentation/query/selective_search_nms.py``); DISC21 queries are about 640x480. This script resizes
skimage's sample photos to 640x480 and times the default settings and any overrides given as
``key=value`` (``max_side=320``, ``max_proposals=none``), one thread, after one warm-up call.

    .venv/bin/python bench/bench_proposals.py
    .venv/bin/python bench/bench_proposals.py max_side=320 max_proposals=40
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402

from isc.evaluation.proposals import ProposalSettings, selective_search_boxes  # noqa: E402

PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "motorcycle_left",
    "hubble_deep_field",
]


def _photo(name: str) -> Image.Image | None:
    try:
        array = getattr(skimage.data, name)()
    except (AttributeError, ValueError, OSError):  # a sample that needs a download
        return None
    array = np.stack([array] * 3, -1) if array.ndim == 2 else array[..., :3]
    return Image.fromarray(np.ascontiguousarray(array)).resize((640, 480), Image.Resampling.BILINEAR)


def _value(text: str) -> object:
    if text.lower() in ("none", "null"):
        return None
    return float(text) if "." in text else int(text)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    overrides = {k: _value(v) for k, v in (a.split("=", 1) for a in args)}
    settings = ProposalSettings(**overrides)  # type: ignore[arg-type]
    photos = [p for p in map(_photo, PHOTOS) if p is not None]
    selective_search_boxes(photos[0], settings)
    times, counts = [], []
    for image in photos:
        started = time.perf_counter()
        counts.append(len(selective_search_boxes(image, settings)))
        times.append(time.perf_counter() - started)
    print(f"{settings}")
    print(
        f"{len(photos)} photos at 640x480: {1000 * np.mean(times):.0f} ms per photo "
        f"(min {1000 * min(times):.0f}, max {1000 * max(times):.0f}), {np.mean(counts):.1f} proposals"
    )


if __name__ == "__main__":
    main()
