"""Which rollout queue a run gets, and its engine: one place for the choice.

``model.clock.enabled`` false: the synchronous queue of the paper's off-policy settings
(:class:`~reclight.rollout.queue.RolloutQueue`, docs/algorithms.md section 4) on the engine
``model.engine`` resolves to. True: the asynchronous schedule on a simulated clock
(:class:`~reclight.rollout.async_queue.AsyncRolloutQueue`, section 7), which needs the fast
engine: it swaps weights between decoding steps and batches groups continuously, which neither
HF ``generate`` nor vLLM's offline ``generate`` can do.
"""

from __future__ import annotations

from typing import Any

import torch

from reclight.checks import invalid
from reclight.clock import ClockConfig
from reclight.engines import build_engine, resolve_engine_config
from reclight.engines.base import SamplingConfig
from reclight.engines.config import EngineConfig
from reclight.rollout.async_queue import AsyncRolloutQueue
from reclight.rollout.queue import RolloutQueue
from reclight.sync import SyncConfig


def build_rollouts(
    engine_cfg: EngineConfig,
    policy: torch.nn.Module,
    tokenizer: Any,
    sampling: SamplingConfig,
    prompts: Any,
    *,
    sync: SyncConfig,
    clock: ClockConfig,
    total_steps: int,
    seed: int,
    rank: int,
    use_chat_template: bool | None,
    max_abs_reward: float,
    model_path: str | None,
    precision: str,
) -> tuple[RolloutQueue | AsyncRolloutQueue, dict[str, Any], list[str]]:
    """``(queue, resolved engine {name, dtype}, notes)`` for a run; ``prompts`` is its
    :class:`~reclight.trainer.prompts.PromptSource` (``task``, ``for_step``, ``index_at``, ...);
    the notes say what ``auto`` and null defaults resolved to, for the run's first lines."""
    stop = tuple(prompts.task.stop_strings)
    cfg, notes = resolve_engine_config(engine_cfg, policy, sampling, stop, precision)
    if clock.enabled and cfg.name != "fast":
        chosen = f" (auto chose {cfg.name}: {notes[0].split('(', 1)[-1].rstrip(')')})" if engine_cfg.name == "auto" else ""
        raise invalid("model.engine.name", engine_cfg.name, "fast, or auto where it resolves to fast, with "
                      "model.clock.enabled true: the asynchronous schedule swaps weights between decoding steps, "
                      "which only the fast engine's step-wise generator can" + chosen)
    engine = build_engine(cfg, policy, tokenizer, sampling, stop_strings=stop, model_path=model_path, seed=seed)
    if clock.enabled:
        queue: RolloutQueue | AsyncRolloutQueue = AsyncRolloutQueue(
            engine, prompts.train, prompts.order, prompts.epoch_size, prompts.task, tokenizer, clock=clock,
            groups_per_step=prompts.groups_per_rank, seed=seed, rank=rank, use_chat_template=use_chat_template,
            max_abs_reward=max_abs_reward)
    else:
        queue = RolloutQueue(
            engine, prompts.for_step, prompts.task, tokenizer, sync=sync, total_steps=total_steps, seed=seed,
            rank=rank, use_chat_template=use_chat_template,
            keep_groups=prompts.groups_per_rank if prompts.oversampled else None, max_abs_reward=max_abs_reward)
    return queue, {"name": cfg.name, "dtype": cfg.dtype}, notes
