"""Scoring responses with a task's reward function, and collecting one step's rollout batch.

A reward function that raises, returns something that is not a number (a string such as
``"1.0"``, None, a tensor: only ``int``/``float``/``bool`` and NumPy scalars are numbers here),
or returns a non-finite or absurd value (``|reward| > max_abs_reward``, the guard
``model.guards.max_abs_reward``, default :data:`DEFAULT_MAX_ABS_REWARD`) marks the sample
invalid (reward 0, excluded from the baseline and the loss, counted in ``reward/failed``)
instead of stopping the run or poisoning the loss; the first failure of each kind is logged
once per process.
"""

from __future__ import annotations

import logging
import math
import numbers
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

DEFAULT_MAX_ABS_REWARD = 1e6
"""Rewards beyond this magnitude are refused (failed samples): 1e38 is finite, but an advantage
of that size overflows the loss to inf (fp32 and bf16 both end at 3.4e38) and any large one
swamps the gradient; real rewards are O(1), seldom O(100). The default of
``model.guards.max_abs_reward`` and of every function that takes ``max_abs_reward``."""


def _check_reward(value: object, max_abs_reward: float) -> tuple[float | None, str, str]:
    """``(reward, "", "")`` for an acceptable reward, ``(None, kind, why)`` otherwise: ``kind``
    groups failures for the once-per-kind log line, ``why`` names the value and what is accepted."""
    if not isinstance(value, numbers.Real):  # bool is Real (True -> 1.0); "1.0", None, tensors are not
        return None, type(value).__name__, (f"returned {type(value).__name__} {str(value)[:40]!r} (accepted: a "
                                            "number or a bool; convert it in the reward function)")
    r = float(value)
    if not math.isfinite(r):
        return None, str(r), f"returned {r}"
    if abs(r) > max_abs_reward:
        return None, "magnitude", (f"returned {r:.3g}, of magnitude beyond model.guards.max_abs_reward="
                                   f"{max_abs_reward:g} (rescale the reward, or raise the bound)")
    return r, "", ""


def _log_reward_failure(task: Task, example: Example, kind: str, what: str, response: str) -> None:
    """Log the first reward failure of each kind (task class, and the exception type, NaN/inf,
    the returned type or "magnitude") once per process, so a long run shows the cause without
    one line per sample."""
    key = (type(task).__name__, kind)
    if key in _REPORTED_FAILURES:
        return
    _REPORTED_FAILURES.add(key)
    logging.getLogger(__name__).warning(
        "reward function of %s %s for example %r (response %r); such samples get no gradient and are counted "
        "in reward/failed (this message is shown once per kind of failure)",
        type(task).__name__, what, getattr(example, "uid", None), response[:80],
    )


def score(
    task: Task, tokenizer: Any, response_ids: Tensor, response_mask: Tensor, examples: Sequence[Example],
    max_abs_reward: float = DEFAULT_MAX_ABS_REWARD,
) -> tuple[Tensor, Tensor, Tensor, int]:  # rewards [B, K], valid [B, K], correct [B, K], n_failed
    """Decode each response (real tokens only, special tokens dropped) and score it (a reward
    that is not a finite number of magnitude <= ``max_abs_reward`` fails the sample)."""
    B, K, _ = response_ids.shape
    # Python lists, one tensor each at the end, not three indexed tensor writes per sample (each
    # a trip through torch's dispatcher: 256 samples a step in the main job).
    rewards, valid, correct = [0.0] * (B * K), [True] * (B * K), [False] * (B * K)
    lengths = response_mask.sum(-1).tolist()
    flat = [ids[:n] for row, lrow in zip(response_ids.tolist(), lengths) for ids, n in zip(row, lrow)]
    texts = tokenizer.batch_decode(flat, skip_special_tokens=True)
    default_correct = type(task).correct is Task.correct
    for i, text in enumerate(texts):
        b, k = divmod(i, K)
        try:
            r, kind, why = _check_reward(task.reward(text, examples[b]), max_abs_reward)
            ok = r is not None
            if not ok:
                _log_reward_failure(task, examples[b], kind, why, text)
            # Task.correct's default re-runs reward(); skip that second (maybe slow) call.
            c = ok and (r >= 1.0 if default_correct else bool(task.correct(text, examples[b])))
        except Exception as e:  # noqa: BLE001 - a broken sample must not kill a long run
            ok, r, c = False, 0.0, False
            _log_reward_failure(task, examples[b], type(e).__name__, f"raised {e!r}", text)
        valid[i], rewards[i], correct[i] = ok, float(r) if ok else 0.0, bool(c)
    return (torch.tensor(rewards, dtype=torch.float32).view(B, K), torch.tensor(valid, dtype=torch.bool).view(B, K),
            torch.tensor(correct, dtype=torch.bool).view(B, K), valid.count(False))


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
    max_abs_reward: float = DEFAULT_MAX_ABS_REWARD,
) -> RolloutBatch:
    """Generate K responses for each of ``examples`` with ``engine`` and score them (failed
    rewards are the ``~reward_valid`` entries)."""
    start = time.perf_counter()
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], use_chat_template)
    gen = engine.generate(prompt_ids, prompt_mask, seed=seed)
    rewards, valid, correct, _ = score(task, tokenizer, gen.response_ids.cpu(), gen.response_mask.cpu(), examples,
                                       max_abs_reward=max_abs_reward)
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
        logp_kept_mass=gen.logp_kept_mass,
        rewards=rewards.to(device),
        reward_valid=valid.to(device),
        correct=correct.to(device),
        gen_seconds=time.perf_counter() - start,
    )
