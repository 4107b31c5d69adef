"""Helpers for the reliability tests (no tests here): a callback that parks a run at a known
point so a test can SIGKILL it there (imported by the ``reclight fit`` subprocesses of
tests/test_resume.py through ``--trainer.callbacks+=reliability_helpers.PauseAtStep``)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl


class PauseAtStep(pl.Callback):
    """At the start of step ``step`` (after checkpoint ``step={step}.ckpt`` was written at the end
    of the previous step), write ``marker`` and sleep until killed."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(self.step))
            while True:
                time.sleep(0.05)
