"""Scoring responses with a task's reward function, and collecting one step's rollout batch.

A reward function that raises or returns a non-finite value marks the sample invalid (reward
0, excluded from the baseline and the loss, counted in ``reward/failed``) instead of stopping
the run; the first failure of each kind is logged once per process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from reclight.engines.base import RolloutEngine
from reclight.models.tokens import encode_prompts
from reclight.rollout.batch import RolloutBatch
from reclight.tasks.base import Example, Task

_REPORTED_FAILURES: set[tuple[str, str]] = set()


def _log_reward_failure(task: Task, example: Example, what: str, response: str) -> None:
    """Log the first reward failure of each kind (task class, exception type or NaN/inf) once
    per process, so a long run shows the cause without one line per sample."""
    key = (type(task).__name__, what.split("(")[0] if what.startswith("raised") else what)
    if key in _REPORTED_FAILURES:
        return
    _REPORTED_FAILURES.add(key)
    logging.getLogger(__name__).warning(
        "reward function of %s %s for example %r (response %r); such samples get no gradient and are counted "
        "in reward/failed (this message is shown once per kind of failure)",
        type(task).__name__, what, getattr(example, "uid", None), response[:80],
    )


def score(
    task: Task, tokenizer: Any, response_ids: Tensor, response_mask: Tensor, examples: Sequence[Example]
) -> tuple[Tensor, Tensor, Tensor, int]:  # rewards [B, K], valid [B, K], correct [B, K], n_failed
    """Decode each response (real tokens only, special tokens dropped) and score it."""
    B, K, _ = response_ids.shape
    rewards = torch.zeros(B, K)
    valid = torch.ones(B, K, dtype=torch.bool)
    correct = torch.zeros(B, K, dtype=torch.bool)
    lengths = response_mask.sum(-1).tolist()
    flat = [ids[:n] for row, lrow in zip(response_ids.tolist(), lengths) for ids, n in zip(row, lrow)]
    texts = tokenizer.batch_decode(flat, skip_special_tokens=True)
    default_correct = type(task).correct is Task.correct
    for i, text in enumerate(texts):
        b, k = divmod(i, K)
        try:
            r = float(task.reward(text, examples[b]))
            ok = math.isfinite(r)
            if not ok:
                _log_reward_failure(task, examples[b], f"returned {r}", text)
            # Task.correct's default re-runs reward(); skip that second (maybe slow) call.
            c = ok and (r >= 1.0 if default_correct else bool(task.correct(text, examples[b])))
        except Exception as e:  # noqa: BLE001 - a broken sample must not kill a long run
            ok, r, c = False, 0.0, False
            _log_reward_failure(task, examples[b], f"raised {e!r}", text)
        valid[b, k] = ok
        rewards[b, k] = r if ok else 0.0
        correct[b, k] = c
    return rewards, valid, correct, int((~valid).sum())


def collect_rollout(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    example_index: Sequence[int],
    *,
    step: int,
    seed: int,
    use_chat_template: bool | None = None,
) -> RolloutBatch:
    """Generate K responses for each of ``examples`` with ``engine`` and score them (failed
    rewards are the ``~reward_valid`` entries)."""
    start = time.perf_counter()
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], use_chat_template)
    gen = engine.generate(prompt_ids, prompt_mask, seed=seed)
    rewards, valid, correct, _ = score(task, tokenizer, gen.response_ids.cpu(), gen.response_mask.cpu(), examples)
    device = gen.response_ids.device
    return RolloutBatch(
        step=step,
        example_index=torch.tensor(list(example_index), dtype=torch.long),
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        response_ids=gen.response_ids,
        response_mask=gen.response_mask,
        logp_behav=gen.logp_behav,
        version=gen.version,
        rewards=rewards.to(device),
        reward_valid=valid.to(device),
        correct=correct.to(device),
        gen_seconds=time.perf_counter() - start,
    )
