"""Weight-sync lag: the rollout queue that realises ``reclight.sync.behavior_version``.

The engine holds ONE copy of the weights (its ``version``). The batch of training step t must
come from theta_v, v = behavior_version(t, k, d). Trainer weights theta_s exist only at the
start of step s, so at that moment:

1. if some step t >= s will need version s (and the engine does not hold it yet): first
   generate and queue every not-yet-generated batch that needs the engine's CURRENT version
   (the engine "runs ahead"), then push theta_s into the engine;
2. take step s's batch from the queue, or generate it now (then engine.version == v(s)).

Batches are generated in step order, so "not yet generated" is the suffix from
``next_step``. The queue never holds more than d + k batches, and no model copy per pending
step is ever kept. Offline (``offline: true``) is d = max_steps: the engine never syncs after
step 0 and generates each batch when its step comes.

Why a callback and not a DataLoader: see :mod:`reclight.data` (Lightning prefetches batches).

State for exact resume (``state_dict``): the queued batches, ``next_step`` and the sync count.
The engine's weights and version are saved by the module (``RLModule.on_save_checkpoint``);
prompt order and sampling noise are functions of (seed, step), so they need no state.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from reclight.rollout import RolloutBatch, collect_rollout
from reclight.sync import behavior_version


class WeightSync(Callback):
    """When the rollout engine receives the trainer's weights (ALGORITHMS.md section 4).

    Args:
        sync_interval: k, push weights every k steps (1 = every step).
        sync_offset: d, the engine runs d steps ahead (0 = no lag).
        offline: every batch comes from the initial policy (sets d = max_steps).
        eager: generate every batch of a version right when the engine receives it, while the
            trainer still holds exactly those weights (instead of lazily, just before the next
            sync). Same versions, same queue bound d + k (offline: all batches at step 0).
            Needed by engines that re-score samples with the trainer's model
            (``VLLMEngine(recompute_logp_behav=True)``); the module turns it on for them.
    """

    def __init__(
        self, sync_interval: int = 1, sync_offset: int = 0, offline: bool = False, eager: bool = False
    ) -> None:
        for name, value, low in (("sync_interval", sync_interval, 1), ("sync_offset", sync_offset, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"WeightSync.{name}={value!r} is not valid; accepted: an integer >= {low}")
        self.sync_interval = sync_interval
        self.sync_offset = sync_offset
        self.offline = bool(offline)
        self.eager = bool(eager)
        self.max_steps = 0
        self.queue: dict[int, RolloutBatch] = {}
        self.next_step = 0  # first step whose batch has not been generated
        self.num_syncs = 0
        self.max_queue_len = 0

    # -- the schedule -------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        return max(self.max_steps, self.sync_offset) if self.offline else self.sync_offset

    def version_for(self, step: int) -> int:
        return behavior_version(step, self.sync_interval, self.offset)

    def _needed_as_version(self, s: int) -> bool:
        """Whether some step t in [s, max_steps) trains on a batch from theta_s."""
        end = min(self.max_steps, s + self.offset + self.sync_interval)
        return any(self.version_for(t) == s for t in range(s, end))

    def rollout_for_step(self, step: int, module: LightningModule, datamodule: Any) -> RolloutBatch:
        """The batch that step ``step`` trains on (see the module docstring)."""
        engine = module.engine
        if engine.version != step and self._needed_as_version(step):
            while self.next_step < self.max_steps and self.version_for(self.next_step) == engine.version:
                self._generate(self.next_step, module, datamodule)
            engine.update_weights(module.policy, step)
            self.num_syncs += 1
        if self.eager and engine.version == step:  # the trainer holds theta_step right now
            while self.next_step < self.max_steps and self.version_for(self.next_step) == engine.version:
                self._generate(self.next_step, module, datamodule)
        if step not in self.queue:
            if step != self.next_step or self.version_for(step) != engine.version:
                raise RuntimeError(
                    f"WeightSync: step {step} needs version {self.version_for(step)} but the engine holds "
                    f"version {engine.version} (next_step={self.next_step}); the schedule state is inconsistent"
                )
            self._generate(step, module, datamodule)
        return self.queue.pop(step)

    def _generate(self, step: int, module: LightningModule, datamodule: Any) -> None:
        idx, examples = datamodule.prompts_for_step(step)
        self.queue[step] = collect_rollout(
            module.engine, module.tokenizer, datamodule.task, examples, idx,
            step=step, seed=module.rollout_seed(step), use_chat_template=module.use_chat_template,
        )
        self.next_step = step + 1
        self.max_queue_len = max(self.max_queue_len, len(self.queue))

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.max_steps = int(trainer.max_steps)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The step is the optimizer-step count, never the loader's value: the loader only paces.
        step = trainer.global_step
        start = time.perf_counter()
        rollout = self.rollout_for_step(step, pl_module, trainer.datamodule)
        pl_module.set_rollout(rollout, wait_seconds=time.perf_counter() - start)

    def state_dict(self) -> dict[str, Any]:
        return {
            "queue": {t: b.state_dict() for t, b in self.queue.items()},
            "next_step": self.next_step,
            "num_syncs": self.num_syncs,
            "config": (self.sync_interval, self.sync_offset, self.offline),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["config"]) != (self.sync_interval, self.sync_offset, self.offline):
            raise ValueError(
                f"WeightSync: checkpoint has (sync_interval, sync_offset, offline)={tuple(state['config'])}, "
                f"this run {(self.sync_interval, self.sync_offset, self.offline)}; accepted: the same settings"
            )
        self.queue = {int(t): RolloutBatch.from_state_dict(b) for t, b in state["queue"].items()}
        self.next_step = int(state["next_step"])
        self.num_syncs = int(state["num_syncs"])
