"""The rollout queue: the one owner of rollout production.

:class:`RolloutQueue` owns the engine (whose one copy of the weights is the behaviour policy),
the ``behavior_version`` schedule, the batches generated ahead of their step, the rollout
seeds, and the checkpoint state of all of these. The trainer asks it for step t's batch and
hands it its current weights; nothing here reads the trainer.

The schedule. The batch of training step t must come from theta_v, v = behavior_version(t, k, d).
Trainer weights theta_s exist only at the start of step s, so at that moment:

1. if some step t >= s will need version s (``reclight.sync.version_needed``) and the engine
   does not hold it yet: first generate and queue every not-yet-generated batch that needs the
   engine's CURRENT version (the engine "runs ahead"), then push theta_s into the engine;
2. take step s's batch from the queue, or generate it now (then engine.version == v(s)).

Batches are generated in step order, so "not yet generated" is the suffix from ``next_step``.
The queue never holds more than d + k batches, and no model copy per pending step is ever
kept. Offline is d = total steps: the engine never syncs after step 0.

An engine that re-scores its samples with the trainer's model (``engine.scores_with_trainer``,
vLLM's ``recompute_logp_behav``) needs the trainer to hold the engine's weights while it
generates: the queue then generates EVERY batch of a version right at its sync ("eager"), with
the same versions and the same bound d + k (offline: all batches at step 0).

Where it runs: the trainer calls :meth:`RolloutQueue.batch_for_step` from
``RLModule.on_before_batch_transfer``, i.e. before ``training_step`` and therefore outside the
training precision's autocast: generating (and recording ``logp_behav``) under bf16 autocast
would change the behaviour log-probs the trainer's ratio is measured against.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from reclight.advantages import uniform_groups
from reclight.engines.base import RolloutEngine
from reclight.rollout.batch import RolloutBatch
from reclight.rollout.scoring import DEFAULT_MAX_ABS_REWARD, collect_rollout
from reclight.sync import SyncConfig, version_needed
from reclight.tasks.base import Example, Task

PromptsForStep = Callable[[int], tuple[Sequence[int], Sequence[Example]]]
"""step -> (indices into the train split, examples) of this rank's prompts."""


def keep_informative(batch: RolloutBatch, n: int) -> RolloutBatch:
    """The ``n`` groups of an oversampled batch that a step trains on: the informative ones
    (valid rewards not all equal) first, then the others, each in sampling order; the batch
    records how many of the sampled groups were informative (``data/informative_frac``).

    Followed: DAPO's dynamic sampling (AReaL's ``areal/utils/functional.py::dynamic_sampling``
    drops the uniform groups); reclight keeps the batch size fixed (``n`` groups) instead of
    sampling until enough groups are informative, so a step's cost is bounded."""
    informative = ~uniform_groups(batch.rewards, batch.reward_valid)  # [B]
    rows = torch.argsort((~informative).to(torch.int8), stable=True)[:n]
    state = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in batch.state_dict().items()}
    out = RolloutBatch.from_state_dict(state)
    out.sampled_groups, out.informative_groups = int(informative.numel()), int(informative.sum())
    return out.to(batch.rewards.device)


def rollout_seed(run_seed: int, step: int, rank: int = 0) -> int:
    """Sampling seed of step ``step``'s rollouts: a function of (run seed, step, rank) only
    (rank 0 of a single-process run adds nothing)."""
    return (run_seed * 1_000_003 + step + 7_919 * rank) % (2**63)


class RolloutQueue:
    """Rollout production for one run (see the module docstring).

    Args:
        engine: the rollout engine, holding theta_0 as version 0.
        prompts: ``step -> (indices, examples)`` of this rank's prompts.
        task: scores the responses.
        tokenizer: encodes prompts, decodes responses.
        sync: the off-policy schedule.
        total_steps: the run's number of training steps (the schedule needs it).
        seed: the run seed (rollout seeds are ``rollout_seed(seed, step, rank)``).
        rank: data-parallel rank.
        use_chat_template: how prompts are rendered (None: the tokenizer's template if any).
        keep_groups: oversampling (DAPO's dynamic sampling): ``prompts(step)`` gives more prompts
            than a step trains on; keep this many groups, the informative ones (rewards not all
            equal) first, each set in sampling order (None: keep all).
        max_abs_reward: rewards of larger magnitude fail their sample (``model.guards.max_abs_reward``).
    """

    def __init__(
        self,
        engine: RolloutEngine,
        prompts: PromptsForStep,
        task: Task,
        tokenizer: Any,
        *,
        sync: SyncConfig,
        total_steps: int,
        seed: int,
        rank: int = 0,
        use_chat_template: bool | None = None,
        keep_groups: int | None = None,
        max_abs_reward: float = DEFAULT_MAX_ABS_REWARD,
    ) -> None:
        self.engine = engine
        self.prompts = prompts
        self.task = task
        self.tokenizer = tokenizer
        self.sync = sync
        self.total_steps = int(total_steps)
        self.seed = int(seed)
        self.rank = int(rank)
        self.use_chat_template = use_chat_template
        self.keep_groups = keep_groups
        self.max_abs_reward = max_abs_reward
        self.eager = bool(getattr(engine, "scores_with_trainer", False))
        self.queue: dict[int, RolloutBatch] = {}
        self.next_step = 0  # first step whose batch has not been generated
        self.num_syncs = 0
        self.max_queue_len = 0
        self.last_wait_s = 0.0

    # -- the schedule -------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        return self.sync.offset(self.total_steps)

    def version_for(self, step: int) -> int:
        return self.sync.version_for(step, self.total_steps)

    def seed_for(self, step: int) -> int:
        return rollout_seed(self.seed, step, self.rank)

    def batch_for_step(self, step: int, policy: torch.nn.Module) -> RolloutBatch:
        """The batch that step ``step`` trains on; ``policy`` holds theta_step (see module doc)."""
        start = time.perf_counter()
        engine = self.engine
        if engine.version != step and version_needed(step, self.sync.sync_interval, self.offset, self.total_steps):
            self._generate_current_version()
            engine.update_weights(policy, step)
            self.num_syncs += 1
        if self.eager and engine.version == step:  # the trainer holds theta_step right now
            self._generate_current_version()
        if step not in self.queue:
            if step != self.next_step or self.version_for(step) != engine.version:
                raise RuntimeError(
                    f"RolloutQueue: step {step} needs version {self.version_for(step)} but the engine holds "
                    f"version {engine.version} (next_step={self.next_step}); the schedule state is inconsistent"
                )
            self._generate(step)
        self.last_wait_s = time.perf_counter() - start
        return self.queue.pop(step)

    def _generate_current_version(self) -> None:
        """Queue every not-yet-generated batch that needs the engine's current version."""
        while self.next_step < self.total_steps and self.version_for(self.next_step) == self.engine.version:
            self._generate(self.next_step)

    def _generate(self, step: int) -> None:
        idx, examples = self.prompts(step)
        batch = collect_rollout(
            self.engine, self.tokenizer, self.task, examples, idx, step=step, seed=self.seed_for(step),
            use_chat_template=self.use_chat_template, max_abs_reward=self.max_abs_reward,
        )
        self.queue[step] = batch if self.keep_groups is None else keep_informative(batch, self.keep_groups)
        self.next_step = step + 1
        self.max_queue_len = max(self.max_queue_len, len(self.queue))

    # -- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The engine (weights and version), the queued batches, the next step to generate and the
        sync count. Prompt order and sampling noise are functions of (seed, step): no state."""
        return {
            "engine": self.engine.state_dict(),
            "queue": {t: b.state_dict() for t, b in self.queue.items()},
            "next_step": self.next_step,
            "num_syncs": self.num_syncs,
            "config": (self.sync.sync_interval, self.sync.sync_offset, self.sync.offline),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = tuple(state["config"])
        if saved != (self.sync.sync_interval, self.sync.sync_offset, self.sync.offline):
            raise ValueError(
                f"model.sync: the checkpoint has (sync_interval, sync_offset, offline)={saved}, this run "
                f"{(self.sync.sync_interval, self.sync.sync_offset, self.sync.offline)}; accepted: the same settings "
                "(a resumed run must follow the schedule it was started with)"
            )
        self.engine.load_state_dict(state["engine"])
        self.queue = {int(t): RolloutBatch.from_state_dict(b) for t, b in state["queue"].items()}
        self.next_step = int(state["next_step"])
        self.num_syncs = int(state["num_syncs"])
