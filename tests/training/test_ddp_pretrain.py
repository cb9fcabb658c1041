"""Barlow Twins under two-process CPU DDP (gloo) equals one process on the full batch: loss and gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))

import ddp_pretrain_job as job  # noqa: E402


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_barlow_twins_ddp_loss_and_gradients_equal_the_full_batch(ddp_jobs: Path) -> None:
    out = ddp_jobs / "barlow"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    seen = sorted(ranks[0]["indices"] + ranks[1]["indices"])
    assert seen == list(range(job.N_SAMPLES))  # the two shards make up the full batch

    model = job.build_model()
    model.load_state_dict(torch.load(out / "init.pt", weights_only=True))
    v1, v2 = job.views()
    loss = model.loss(model.embed(v1), model.embed(v2))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ranks[0]["grads"].keys() and len(grads) >= 6
    with torch.no_grad():  # the check is sensitive: one shard alone gives another loss
        shard = ranks[0]["indices"]
        assert abs(model.loss(model.embed(v1[shard]), model.embed(v2[shard])).item() - loss.item()) > 1e-3
    for rank in ranks:
        torch.testing.assert_close(rank["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(rank["grads"][name], g, rtol=1e-5, atol=1e-5, msg=name)
