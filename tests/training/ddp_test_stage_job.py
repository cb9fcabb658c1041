"""Run through ``tests/training/ddp_jobs.py`` for test_distributed_evaluate.py: D2LV's test stage (two
scales, local verification, reference crops) evaluated by the 2-process group, each rank extracting its
share of the shards; rank 0 writes the run's files into ``OUT/run``. Then the same on a copy of the
benchmark with an image only rank 1 decodes corrupted: each rank records the error it ended with."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's helpers

from conftest import corrupt_pixels  # noqa: E402
from ddp_eval_job import tiny_trunk  # noqa: E402

from isc.data.images import Disc21Layout  # noqa: E402
from isc.evaluation.distributed import Ranks  # noqa: E402
from isc.evaluation.runner import evaluate_layout  # noqa: E402
from isc.evaluation.settings import EvaluationSettings  # noqa: E402
from isc.models.descriptor import DescriptorModel  # noqa: E402
from isc.models.pooling import GeM  # noqa: E402

BAD = "R000013.png"  # shard 3 of the references (shards of 4): rank 1's
SETTINGS = {  # shards of 4 images (batches of 2): both ranks get shards of every listing
    "image_size": 32,
    "num_workers": 0,
    "batch_size": 2,
    "shard_size": 4,
    "reference_block": 8,
    "scales": [32, 40],
    "score_normalization": {"k": 2},
    "local_verification": {
        "enabled": True,
        "reference_crops": True,
        "query": {"min_size": 8, "proposals": {"max_proposals": 2}},
    },
}


def model() -> DescriptorModel:
    torch.manual_seed(0)
    return DescriptorModel(tiny_trunk(), GeM()).eval()


def evaluate(benchmark: Path, out: Path, ranks: Ranks) -> None:
    evaluate_layout(
        Disc21Layout(benchmark),
        [model()],
        EvaluationSettings.from_dict(SETTINGS),
        out / "run",
        cache_dir=out / "cache",
        ranks=ranks,
    )


def fit(out: Path, benchmark: Path) -> None:
    ranks = Ranks.current()
    evaluate(benchmark, out, ranks)
    broken = out / f"broken-{ranks.rank}"  # each rank builds the same copy: no rank waits for another
    shutil.copytree(benchmark, broken)
    corrupt_pixels(broken / "references" / BAD)
    try:
        evaluate(broken, out / "failed", ranks)
    except Exception as e:
        (out / f"error-{ranks.rank}.txt").write_text(f"{type(e).__name__}: {e}")
