"""Helpers the resume tests inject into a real ``run.py`` process (``+callbacks.pause._target_=...``).

Not a test module: pytest does not collect it (no ``test_`` prefix). The subprocess imports it through
``PYTHONPATH`` so the kill lands at an exact point of an epoch, not wherever a timer happens to fall.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L


class PauseAt(L.Callback):
    """Before batch ``batch`` of epoch ``epoch``: write ``marker``, then sleep until killed.

    The test waits for the marker and sends SIGKILL, so the run dies mid-epoch after exactly ``batch``
    optimiser steps of that epoch, with ``last.ckpt`` from the end of the previous epoch on disk.
    """

    def __init__(self, epoch: int, batch: int, marker: str, sleep_s: float = 600.0) -> None:
        self.epoch, self.batch, self.marker, self.sleep_s = epoch, batch, Path(marker), sleep_s

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            tmp = self.marker.with_suffix(".tmp")
            tmp.write_text(f"epoch {trainer.current_epoch} step {trainer.global_step}\n")
            tmp.replace(self.marker)  # appears whole: the test reads it as soon as it exists
            time.sleep(self.sleep_s)
