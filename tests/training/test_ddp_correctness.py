"""State that DDP must not change: the cross-batch memory and Momentum2-Teacher's momentum-BN statistics.

Each test reads a real two-process CPU (gloo) Lightning DDP fit (``tests/training/ddp_correctness_job.py``, one
launch runs every test's fit), so ``DistributedDataParallel``'s per-forward buffer broadcast (rank 0 over the
others) is in play, then checks the saved per-rank state against the definition, recomputed in this process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))

import ddp_correctness_job as job  # noqa: E402

from isc.losses.xbm import CrossBatchMemory  # noqa: E402
from isc.models.momentum import commit_statistics, set_statistics_momentum, statistics_momentum  # noqa: E402


def ranks_of(ddp_jobs: Path, name: str) -> list[dict[str, Any]]:
    """Each rank's saved record of job ``name``."""
    ranks = [torch.load(ddp_jobs / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    return ranks


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_xbm_memory_holds_the_global_batches_identically_on_every_rank(ddp_jobs: Path) -> None:
    ranks = ranks_of(ddp_jobs, "xbm")
    # what DDP fed each step: rank 0's shard then rank 1's (the all-gather order)
    order = [i for step in range(job.STEPS) for r in ranks for i in r["indices"][step]]
    assert sorted(order) == list(range(job.N_SAMPLES))  # both ranks' batches of both steps
    x, y = job.xbm_inputs()
    embed = torch.nn.Linear(job.DIM, 5)
    embed.load_state_dict(ranks[0]["embed"])
    with torch.no_grad():
        expected = embed(x[order])
    for r in ranks:
        assert r["memory_labels"].tolist() == y[order].tolist()
        torch.testing.assert_close(r["memory"], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(ranks[0]["memory"], ranks[1]["memory"])  # identical, not merely close
    resumed = CrossBatchMemory(embedding_dim=None, memory_size=job.N_SAMPLES)  # checkpoint round trip
    resumed.load_state_dict(ranks[1]["state"])
    assert resumed.embedding_dim == 5 and torch.equal(resumed.get_memory()[0], ranks[1]["memory"])


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_m2t_teacher_statistics_are_per_rank_as_the_official_code(ddp_jobs: Path) -> None:
    ranks = ranks_of(ddp_jobs, "m2t")
    v1, v2 = job.m2t_views()
    total = ranks[0]["total_steps"]
    assert total == job.STEPS
    for k in range(job.STEPS):  # the teacher's weights are the EMA of the DDP-synchronised student
        for name, p in ranks[0]["steps"][k]["teacher"].items():
            torch.testing.assert_close(ranks[1]["steps"][k]["teacher"][name], p, rtol=0, atol=0)
    for rank in ranks:  # each rank's statistics: momentum updates with its own batches only
        model = job.build_m2t().train()
        model.teacher.load_state_dict(rank["initial"], strict=False)
        for rec in rank["steps"]:
            missing, unexpected = model.teacher.load_state_dict(rec["teacher"], strict=False)
            assert unexpected == [] and all("running" in m for m in missing)
            set_statistics_momentum(model.teacher, statistics_momentum(rec["step"], total))
            idx = rec["indices"]
            with torch.no_grad():
                model.teacher_embed(v2[idx])
                model.teacher_embed(v1[idx])
            commit_statistics(model.teacher)
            got = job.teacher_statistics(model.teacher)
            assert got.keys() == rec["statistics"].keys() and len(got) == 4  # trunk BN + projector BN
            for name, value in got.items():
                torch.testing.assert_close(rec["statistics"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    last = [r["steps"][-1]["statistics"] for r in ranks]
    assert any(not torch.allclose(last[0][n], last[1][n], atol=1e-3) for n in last[0])  # really per rank


# --- SyncBatchNorm: automatic on several CUDA GPUs only ------------------------------------------------------


@pytest.mark.parametrize(
    ("accelerator", "devices", "num_nodes", "cuda", "expected"),
    [
        ("cpu", 2, 1, True, False),  # gloo processes: PyTorch has no CPU SyncBatchNorm kernels
        ("cpu", 4, 2, False, False),
        ("gpu", 2, 1, True, True),
        ("cuda", [0, 1], 1, True, True),
        ("gpu", "0,1", 1, True, True),
        ("gpu", "2", 1, True, True),
        ("gpu", 1, 1, True, False),  # one process: nothing to synchronise
        ("gpu", 1, 2, True, True),  # one GPU on each of two nodes
        ("gpu", "auto", 1, True, True),  # all 4 visible GPUs
        ("gpu", -1, 1, True, True),
        ("auto", 2, 1, True, True),
        ("auto", 2, 1, False, False),  # auto without CUDA is the CPU
        ("gpu", 2, 1, False, False),  # "gpu" without CUDA (MPS / none): no SyncBatchNorm
        ("mps", 2, 1, False, False),
    ],
)
def test_wants_sync_batchnorm(
    monkeypatch: pytest.MonkeyPatch,
    accelerator: str,
    devices: Any,
    num_nodes: int,
    cuda: bool,
    expected: bool,
) -> None:
    from lightning_modules.base import wants_sync_batchnorm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4 if cuda else 0)
    assert wants_sync_batchnorm(accelerator, devices, num_nodes) is expected


def test_wants_sync_batchnorm_single_visible_gpu_and_trainer_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
    from omegaconf import OmegaConf

    from lightning_modules.base import wants_sync_batchnorm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not wants_sync_batchnorm("gpu", "auto", 1) and not wants_sync_batchnorm("gpu", -1, 1)
    assert wants_sync_batchnorm(CUDAAccelerator(), 2, 1) and not wants_sync_batchnorm(CPUAccelerator(), 2, 1)
    trainer = ROOT / "conf" / "trainer"
    values = {
        name: OmegaConf.load(trainer / f"{name}.yaml").get("sync_batchnorm") for name in ("default", "ddp")
    }
    assert values == {"default": None, "ddp": None}  # null = auto, resolved by run.py
    assert OmegaConf.load(trainer / "cpu.yaml").sync_batchnorm is False


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_two_process_evaluation_equals_one_process_with_the_same_weights(
    benchmark: Path, ddp_jobs: Path
) -> None:
    """Ranks whose BN statistics drifted apart still embed with one set of statistics: rank 0's."""
    import ddp_eval_job

    from callbacks.retrieval import SPLITS
    from isc.data.images import Disc21Layout
    from isc.evaluation.extract import extract
    from isc.evaluation.matching import match_descriptors
    from isc.evaluation.settings import EvaluationSettings

    out = ddp_jobs / "eval"
    ranks = [torch.load(out / f"bn_rank{r}.pt", weights_only=True)["running_mean"] for r in (0, 1)]
    assert not torch.allclose(ranks[0], ranks[1])  # the situation the callback must handle
    saved = torch.load(out / "result.pt", weights_only=True)

    module = ddp_eval_job.TinyBN()
    module.load_state_dict(saved["state_dict"])
    layout = Disc21Layout(benchmark)
    paths = [p for split in SPLITS if layout.has_split(split) for p in layout.paths(split)]
    settings = EvaluationSettings.from_dict(ddp_eval_job.EVALUATION)
    one = extract(module.descriptor_model(), paths, scales=[32], num_workers=0, progress=False).vectors
    np.testing.assert_allclose(saved["descriptors"].numpy(), one, atol=1e-6, rtol=0)

    n_q, n_r = len(layout.paths("queries")), len(layout.paths("references"))
    matched = match_descriptors(
        np.asarray(layout.ids("queries")),
        one[:n_q],
        np.asarray(layout.ids("references")),
        one[n_q : n_q + n_r],
        one[n_q + n_r :],
        layout.ground_truth(),
        settings,
    )
    for key, value in matched.headline(prefix="val/").items():
        assert saved["metrics"][key] == pytest.approx(value, abs=1e-6), key
