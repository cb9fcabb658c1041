"""A fault on one DDP rank ends the whole job: no hung peer, no orphan process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import corrupt_pixels, ddp_env, make_copy_benchmark
from test_finetune import tiny

from isc.data.images import ImageLoadError, load_image, screen_quick

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_an_image_error_on_one_rank_ends_both_ranks(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    bench = make_copy_benchmark(tmp_path / "bench")
    bad = bench / "training" / "T000002.png"  # a fine-tuning class, and an image the callback embeds
    corrupt_pixels(bad)
    assert screen_quick([bad], "test")[1] == []  # passes the pre-pass ...
    with pytest.raises(ImageLoadError):
        load_image(bad)  # ... but cannot be decoded
    command = [
        sys.executable,
        "run.py",
        *[o for o in tiny(bench) if o != "trainer.fast_dev_run=true"],
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.sync_batchnorm=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = ddp_env() | {"ISC_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    job = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    seconds = time.monotonic() - started
    text = output.decode(errors="replace")
    assert job.returncode != 0
    assert "T000002.png" in text and "truncated or corrupt image data" in text, text[-3000:]
    time.sleep(2)
    with pytest.raises(ProcessLookupError):  # the other rank and every worker are gone too
        os.killpg(job.pid, 0)
    assert seconds < 240, f"the job took {seconds:.0f} s to end after the fault"
