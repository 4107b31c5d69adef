"""SIGTERM (what batch schedulers send before they kill a job): stop within seconds, leave a
resumable checkpoint, exit non-zero.

Before, Lightning's own handler only set a flag read between steps: a long generation kept
running for minutes, and the run then ended with exit status 0 and no checkpoint, so a
scheduler took it for finished. :class:`SignalCheckpoint` (added by ``reclight fit``) instead:

1. its handler only records the request (:func:`reclight.engines.stop.request_stop`); every
   decoding loop checks it once per token and raises ``StopRequested``, at points where no
   training state is half-updated;
2. a request seen at the end of a training step (the signal came during the update, or while
   a queued batch was taken): that step is finished, logged, and the checkpoint is written
   right there, the place where ``ModelCheckpoint(every_n_train_steps)`` writes its own; then
   the run stops (a validation that was due is abandoned);
3. a request that abandoned a generation (the rollout of the next step, a validation, the
   start-of-RL evaluation): the checkpoint holds the state of the end of the last finished
   step. Nothing the checkpoint holds changed since then but the rollout queue, which may
   hold more batches generated ahead (each one complete, and the same ones a straight run
   generates: they are functions of the weights and (seed, step)), and Lightning's loop
   counters, which are replaced by a copy taken at the end of that step, so the resume goes
   down exactly the path of a ``ModelCheckpoint`` checkpoint of that step;
4. the file (``<checkpoint folder>/interrupted-step=<N>.ckpt``, N = steps done) is written
   through the trainer's CheckpointIO (atomic: ``reclight.trainer.checkpoint``), found by
   ``--ckpt_path last``, and the command exits with status 143 (128 + SIGTERM).

Limits: a request before the first step has finished (during the supervised warm-up or step
0's rollout) writes nothing (there is no step to resume; the warm-up is redone); with several
data-parallel ranks no interrupted-run checkpoint is written (the ranks stop at different
points; the last periodic checkpoint resumes), the exit status is still 143.
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from reclight.engines.stop import StopRequested, clear_stop, request_stop, stop_requested

EXIT_CODE = 128 + signal.SIGTERM
"""The exit status of a run stopped by SIGTERM (as a shell reports a process killed by it)."""


class SignalCheckpoint(Callback):
    """On SIGTERM: finish or abandon the current step promptly and write a resumable
    checkpoint (module doc). ``saved`` is its path once written; ``stopped`` whether the run
    stopped early because of the signal."""

    def __init__(self) -> None:
        self.saved: Path | None = None
        self.stopped = False
        self._loops: dict[str, Any] | None = None  # Lightning's loop state at the end of the last step
        self._previous: Any = None

    # -- the handler ------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        clear_stop()
        try:  # Lightning adds its own handler later, composed with this one
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    @staticmethod
    def _on_sigterm(signum: int, frame: Any) -> None:
        request_stop(f"received {signal.Signals(signum).name}")

    # -- the checkpoint ---------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if stop_requested() is None:
            self._loops = copy.deepcopy(trainer._checkpoint_connector._get_loops_state_dict())
            return
        self.stopped = True
        if trainer.world_size > 1:
            return
        self._save(trainer, trainer._checkpoint_connector.dump_checkpoint(weights_only=False))
        # The step is logged next; then Lightning's own handler (composed with ours) raises its
        # SIGTERMException at the end of the step, or a due validation's generation raises.

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.saved is not None:  # a step after the checkpoint, whose batch needed no generation
            raise StopRequested(f"training stopped after the checkpoint of step {trainer.global_step}")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, (StopRequested, SIGTERMException)) or self.saved is not None:
            return
        self.stopped = True
        if trainer.world_size > 1:
            rank_zero_warn("SIGTERM with several data-parallel ranks: no interrupted-run checkpoint is written (the "
                           "ranks stop at different points); resume from the last periodic checkpoint")
            return
        if self._loops is None:
            rank_zero_warn(f"stopped ({exception}) before the first training step finished: there is no step to "
                           "resume, no checkpoint is written; the next run starts from the beginning")
            return
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        checkpoint["loops"] = self._loops  # the counters of the end of the last finished step (module doc)
        self._save(trainer, checkpoint)

    def _save(self, trainer: Any, checkpoint: dict[str, Any]) -> None:
        cb = trainer.checkpoint_callback
        if cb is not None and cb.dirpath:
            folder = Path(cb.dirpath)
        else:  # no ModelCheckpoint: where Lightning would put its checkpoints
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        path = folder / f"interrupted-step={trainer.global_step}.ckpt"
        trainer.strategy.save_checkpoint(checkpoint, path)  # the CLI's AtomicCheckpointIO: atomic and fsynced
        self.saved = path
        rank_zero_info(f"{stop_requested() or 'stop requested'}: checkpoint of step {trainer.global_step} written "
                       f"to {path}")
