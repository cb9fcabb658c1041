"""Every library-level two-process CPU (gloo) DDP job of the tests, run one after another in one launch.

Usage: ``python tests/training/ddp_jobs.py BENCHMARK_ROOT OUT_DIR``. Lightning's ``strategy="ddp"``
re-launches this command for rank 1, so both ranks run the same jobs in the same order, in one process
group: one start-up (imports, rendezvous) serves every test. Job ``name`` writes into ``OUT_DIR/name/``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddp_correctness_job  # noqa: E402
import ddp_eval_job  # noqa: E402
import ddp_pretrain_job  # noqa: E402
import ddp_retrieval_job  # noqa: E402
import ddp_test_stage_job  # noqa: E402

JOBS: dict[str, Callable[[Path, Path], None]] = {
    "xbm": ddp_correctness_job.fit_xbm,  # cross-batch memory
    "m2t": ddp_correctness_job.fit_m2t,  # Momentum2-Teacher's per-rank statistics
    "barlow": ddp_pretrain_job.fit,  # Barlow Twins' loss and gradients
    "eval": ddp_eval_job.fit,  # the callback with ranks whose BN statistics drift apart
    "retrieval": ddp_retrieval_job.fit,  # the callback's gather of every rank's shard
    "test_stage": ddp_test_stage_job.fit,  # task=evaluate's test stage, each rank extracting its share
}


def main(benchmark: Path, out: Path) -> None:
    for name, fit in JOBS.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        fit(out / name, benchmark)
    # end the group before the interpreter does: left to exit, gloo's threads can abort the process
    # ("terminate called without an active exception", seen once in a full run)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
