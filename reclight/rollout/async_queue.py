"""Rollouts for the asynchronous schedule on a simulated clock (docs/algorithms.md section 7).

:class:`AsyncRolloutQueue` is the rollout queue of a run with ``model.clock.enabled``: it owns the
clock (:class:`reclight.clock.AsyncClock`), the continuous-batching generator the clock drives
(:class:`reclight.engines.continuous.ContinuousEngine` on the fast engine's weights), the prompt
stream in admission order, the scored groups waiting to be trained, and the checkpoint state of
all of these. The trainer asks it for step s's batch and hands it theta_s, as it does the
synchronous :class:`~reclight.rollout.queue.RolloutQueue`; nothing here reads the trainer.

One step (:meth:`AsyncRolloutQueue.batch_for_step`): the clock publishes version s, runs
generator events (swap, retire, admit, decode) until the first B completed groups pass the
staleness rule, charges the training step's cost and runs the events that start before the
step ends; every weight swap in that window copies theta_s, the weights the trainer holds. The B
groups become one :class:`~reclight.rollout.batch.RolloutBatch`: prompts left-padded as the
synchronous path pads them, responses right-padded to the longest, ``logp_behav`` of each token
from the weights that sampled it, ``token_version`` [B, K, T] the version of each token and
``version`` [B, K] that of each sample's oldest token (its staleness is the group's).

Departures from the synchronous queue, listed up front:

- Prompts come from the prompt source's stream by admission index (``PromptSource.index_at``),
  not by step; group n samples with its own generator seeded by (run seed, n, rank), so its
  tokens do not depend on what else is in flight. ``requeue`` puts a dropped prompt back after
  the current epoch (:class:`reclight.clock.PromptStream`).
- A group is scored when its last sample ends (rewards of every completed group are known, so
  the trained groups can be compared with all completed ones: ``async/trained_reward_mean`` vs
  ``async/completed_reward_mean``, the completion-order selection bias).
- A stop request (SIGTERM) is honoured at the end of the step, not within a token: the clock,
  the KV cache and the queued groups advance together and are not transactional
  (:func:`reclight.engines.stop.deferred`). One step's generation bounds the delay.
- Data parallel: one clock per rank, each over its own share of the stream (``PromptSource``
  splits every step's prompts into contiguous blocks per rank) and its own slots, each rank
  training B / world groups per step. The ranks' clocks tick independently (a rank's training
  cost is charged on its own tokens); every rank trains exactly one batch per step, so the
  ranks stay in step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from reclight.clock import AsyncClock, ClockConfig, GroupRecord, PromptStream, synchronous_clock
from reclight.engines.continuous import ContinuousEngine, GroupOutput
from reclight.engines.fast import FastLlamaEngine
from reclight.engines.stop import check_stop, deferred
from reclight.models.tokens import encode_prompts, pad_id
from reclight.rollout.batch import RolloutBatch
from reclight.rollout.queue import rollout_seed
from reclight.rollout.scoring import DEFAULT_MAX_ABS_REWARD, score
from reclight.tasks.base import Example, Task


@dataclass
class _Scored:
    """A completed group: its engine output and its rewards."""

    index: int  # into the train split
    output: GroupOutput
    rewards: Tensor  # [K]
    valid: Tensor  # [K] bool
    correct: Tensor  # [K] bool

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "output": self.output.to_dict(), "rewards": self.rewards,
                "valid": self.valid, "correct": self.correct}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "_Scored":
        return cls(index=int(state["index"]), output=GroupOutput(**state["output"]), rewards=state["rewards"],
                   valid=state["valid"], correct=state["correct"])


class _Generator:
    """The clock's :class:`~reclight.clock.GroupGenerator` over the continuous engine: prompts by
    train-split index, scoring as groups complete, weights from the trainer's policy of the step."""

    def __init__(self, queue: "AsyncRolloutQueue") -> None:
        self.q = queue

    def admit(self, n: int, prompt: int) -> int:
        q = self.q
        ids, mask = encode_prompts(q.tokenizer, [q.examples[prompt].prompt], q.use_chat_template)
        ids = ids[0][mask[0]]
        q.admitted[n] = prompt
        return q.batcher.admit(n, ids)

    def decode(self) -> dict[int, list[bool]]:
        q = self.q
        ended = q.batcher.decode()
        for n, flags in ended.items():
            if all(flags):
                q.score(n)
        return ended

    def swap(self, version: int, recompute_kv: bool) -> int:
        return self.q.batcher.swap(self.q.policy, version, recompute_kv)

    def release(self, n: int, trained: bool) -> None:
        if not trained:  # discarded by the staleness rule: its data is not needed any more
            self.q.scored.pop(n, None)


class AsyncRolloutQueue:
    """Rollout production of a run on the simulated clock (see the module docstring).

    Args:
        engine: the fast engine (its fused weights are the generator's; version 0 = theta_0).
        examples: the train split (prompts by index).
        order: ``position -> train index`` of this rank's prompt stream (admission order).
        epoch_size: positions of the stream per pass over the train split.
        task: scores the responses.
        tokenizer: encodes prompts, decodes responses.
        clock: the schedule (``model.clock``).
        groups_per_step: B, groups (prompts) a step trains on, on this rank.
        seed: the run seed (group n samples with ``group_seed(seed, n, rank)``).
        rank: data-parallel rank.
        use_chat_template: how prompts are rendered.
        max_abs_reward: rewards of larger magnitude fail their sample.
    """

    def __init__(
        self,
        engine: FastLlamaEngine,
        examples: Sequence[Example],
        order: Callable[[int], int],
        epoch_size: int,
        task: Task,
        tokenizer: Any,
        *,
        clock: ClockConfig,
        groups_per_step: int,
        seed: int,
        rank: int = 0,
        use_chat_template: bool | None = None,
        max_abs_reward: float = DEFAULT_MAX_ABS_REWARD,
    ) -> None:
        if not isinstance(engine, FastLlamaEngine):
            raise ValueError(f"model.clock.enabled=true needs the fast engine; got {type(engine).__name__} "
                             "(accepted: model.engine.name fast or auto on a Llama model)")
        self.engine, self.examples, self.task, self.tokenizer = engine, examples, task, tokenizer
        self.cfg, self.seed, self.rank = clock, int(seed), int(rank)
        self.use_chat_template, self.max_abs_reward = use_chat_template, max_abs_reward
        self.K = engine.sampling.num_samples
        self.batcher = ContinuousEngine(engine, clock.max_inflight, seed=self.seed, rank=self.rank)
        self.stream = PromptStream(order, epoch_size)
        self.clock = AsyncClock(clock, groups_per_step, self.K, self.stream, _Generator(self))
        self.admitted: dict[int, int] = {}  # admission index n -> train index, until the group completes
        self.scored: dict[int, _Scored] = {}  # completed groups not yet trained or discarded
        self.completed = {"groups": 0, "samples": 0, "reward_sum": 0.0, "length_sum": 0.0, "sync_clock": 0.0}
        # theta_s during batch_for_step (the weights a swap takes): the module, or its parameters by name
        self.policy: torch.nn.Module | Mapping[str, Tensor] | None = None
        self.last_wait_s = 0.0

    @property
    def version(self) -> int:
        return self.engine.version

    def seed_for(self, step: int) -> int:
        """RED-Drop's seed of step ``step`` (as in the synchronous queue)."""
        return rollout_seed(self.seed, step, self.rank)

    def score(self, n: int) -> None:
        """Score group n, whose samples all ended (its data is kept until trained or discarded)."""
        out = self.batcher.output(n)
        self.batcher.release(n)
        index = self.admitted.pop(n)
        rewards, valid, correct, _ = score(self.task, self.tokenizer, out.response_ids[None].cpu(),
                                           out.response_mask[None].cpu(), [self.examples[index]],
                                           max_abs_reward=self.max_abs_reward)
        self.scored[n] = _Scored(index, out, rewards[0], valid[0], correct[0])
        c = self.completed
        c["groups"] += 1
        c["samples"] += int(valid[0].sum())
        c["reward_sum"] += float((rewards[0] * valid[0]).sum())
        c["length_sum"] += float(out.response_mask.sum())

    # -- one step ---------------------------------------------------------------------------------
    def batch_for_step(self, step: int, policy: torch.nn.Module | Mapping[str, Tensor],
                       on_batch: Callable[[RolloutBatch], None] | None = None) -> RolloutBatch:
        """The batch that step ``step`` trains on; ``policy`` holds theta_step (a module, or its
        parameters by Hugging Face name). ``on_batch(batch)`` is called as soon as the batch is
        formed, before the clock runs the training window's events (its ``metrics`` are filled
        after them): a rollout worker sends it to the trainer there (reclight/rollout/workers.py)."""
        check_stop("the asynchronous rollout of the next step")  # the last consistent point (module doc)
        start = time.perf_counter()
        formed: dict[str, Any] = {}

        def take(records: list[GroupRecord]) -> None:  # the same data whether or not a worker waits for it
            formed["groups"] = [self.scored.pop(rec.n) for rec in records]
            formed["batch"] = self._assemble(step, records, formed["groups"])
            if on_batch is not None:
                on_batch(formed["batch"])

        self.policy = policy
        try:
            with deferred():
                plan = self.clock.step(step, on_batch=take)
        finally:
            self.policy = None
        groups, batch = formed["groups"], formed["batch"]
        # the synchronous loop's clock for the same batches and costs: the emulated speedup
        self.completed["sync_clock"] = self.completed.get("sync_clock", 0.0) + synchronous_clock(self.cfg.costs,
                                                                                              [plan.groups])
        batch.metrics = {**plan.metrics, **self._selection(groups),
                         "async/sync_clock": self.completed["sync_clock"],
                         "async/speedup": self.completed["sync_clock"] / plan.train_end}
        batch.gen_seconds = self.last_wait_s = time.perf_counter() - start
        return batch

    # -- the real clock (a free rollout worker: model.rollout.mode free) ---------------------------
    def free_batch(self, step: int, policy: Mapping[str, Tensor]) -> RolloutBatch:
        """Step ``step``'s batch under the real clock (:meth:`AsyncClock.form`): version ``step``
        is published now, as ``policy`` (theta_step by Hugging Face name, kept for the swaps of
        :meth:`window_event` until the next call). Its ``metrics`` cover the interval since the
        previous batch (the clock's counters, the selection bias; no simulated times)."""
        check_stop("the asynchronous rollout of the next step")
        start = time.perf_counter()
        self.policy = policy
        with deferred():
            plan = self.clock.form(step)
            groups = [self.scored.pop(rec.n) for rec in plan.groups]
        batch = self._assemble(step, plan.groups, groups)
        batch.metrics = {**plan.metrics, **self._selection(groups)}
        batch.gen_seconds = self.last_wait_s = time.perf_counter() - start
        return batch

    def window_event(self) -> bool:
        """One generator event while the trainer trains (free mode); False: nothing to do until the
        next publish. Reads the weights of the last :meth:`free_batch`."""
        with deferred():
            return self.clock.event()

    def _selection(self, groups: list[_Scored]) -> dict[str, float]:
        """Reward of the trained samples vs every completed one so far (the selection bias)."""
        valid = torch.stack([g.valid for g in groups])
        rewards = torch.stack([g.rewards for g in groups])
        c = self.completed
        return {"async/trained_reward_mean": float((rewards * valid).sum() / valid.sum().clamp(min=1)),
                "async/completed_reward_mean": c["reward_sum"] / max(c["samples"], 1),
                "async/completed_len_mean_all": c["length_sum"] / max(c["groups"] * self.K, 1)}

    def _assemble(self, step: int, records: list[GroupRecord], groups: list[_Scored]) -> RolloutBatch:
        K = self.K
        T = max(g.output.response_ids.shape[1] for g in groups)
        device = groups[0].output.response_ids.device

        def pad(t: Tensor, value: Any) -> Tensor:  # [K, T_n] -> [K, T]
            return torch.nn.functional.pad(t, (0, T - t.shape[-1]), value=value)

        ids = torch.stack([pad(g.output.response_ids, pad_id(self.tokenizer)) for g in groups])
        mask = torch.stack([pad(g.output.response_mask, False) for g in groups])
        logp = torch.stack([pad(g.output.logp_behav, 0.0) for g in groups])
        tok_version = torch.stack([pad(g.output.token_version.to(device), int(g.output.token_version[-1]))
                                   .expand(K, T) for g in groups])  # [B, K, T]
        oldest = torch.stack([g.output.token_version[:1].to(device).expand(K) for g in groups])  # [B, K]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [self.examples[g.index].prompt for g in groups],
                                                 self.use_chat_template)
        return RolloutBatch(
            step=step,
            example_index=torch.tensor([g.index for g in groups], dtype=torch.long),
            prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
            response_ids=ids, response_mask=mask, logp_behav=logp.masked_fill(~mask, 0.0),
            version=oldest.clone(), token_version=tok_version.clone(),
            rewards=torch.stack([g.rewards for g in groups]).to(device),
            reward_valid=torch.stack([g.valid for g in groups]).to(device),
            correct=torch.stack([g.correct for g in groups]).to(device),
        )

    # -- checkpoint state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue bitwise: the engine (weights, version), the clock (times, slots,
        completed groups, the stream), the generator's in-flight sequences and their KV cache, the
        scored groups waiting to be trained, the running completion statistics."""
        return {
            "async": True,
            "config": _config_key(self.cfg),
            "engine": self.engine.state_dict(),
            "clock": self.clock.state_dict(),
            "batcher": self.batcher.state_dict(),
            "admitted": dict(self.admitted),
            "scored": {n: g.state_dict() for n, g in self.scored.items()},
            "completed": dict(self.completed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("async"):
            raise ValueError("model.clock.enabled=true: the checkpoint's rollouts follow the synchronous schedule "
                             "(model.sync); accepted: resume it with model.clock.enabled false")
        if tuple(state["config"]) != _config_key(self.cfg):
            raise ValueError(f"model.clock: the checkpoint has {tuple(state['config'])}, this run "
                             f"{_config_key(self.cfg)}; accepted: the same settings (a resumed run follows the "
                             "schedule it was started with)")
        self.engine.load_state_dict(state["engine"])
        self.clock.load_state_dict(state["clock"])
        self.batcher.load_state_dict(state["batcher"])
        self.admitted = {int(n): int(i) for n, i in state["admitted"].items()}
        self.scored = {int(n): _Scored.from_state_dict(g) for n, g in state["scored"].items()}
        self.completed = dict(state["completed"])


def _config_key(cfg: ClockConfig) -> tuple:
    """The clock settings a resumed run must keep (all of them: they decide every event)."""
    import dataclasses

    return tuple(str(v) for v in dataclasses.astuple(cfg))
