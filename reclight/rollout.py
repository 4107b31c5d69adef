"""Rollouts: the batch format, the engine protocol, the prompt sampler and rollout collection.

A rollout batch holds B prompts x K sampled responses with everything the loss needs:
``response_ids``/``response_mask``/``logp_behav`` ``[B, K, T]``, ``rewards``/``reward_valid``
``[B, K]`` and the policy ``version`` ``[B, K]`` that generated each sample.

``logp_behav`` is ``log softmax(logits / temperature)`` of the engine's own weights at the
sampled token, recorded while sampling. It does NOT reflect top-p truncation (the trainer's
``logp`` does not either, so on-policy ratios stay exactly 1); with ``top_p < 1`` the true
behaviour distribution differs from it on the truncated tail.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from reclight.tasks.base import Example, Task


@dataclass(frozen=True)
class SamplingConfig:
    """How the behaviour policy samples (the trainer's ``logp`` uses the same temperature)."""

    num_samples: int = 8
    """K: responses per prompt (>= 2, the group-relative baseline needs a group)."""
    temperature: float = 1.0
    """Softmax temperature of sampling and of the trainer's ``logp``."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; not reflected in ``logp_behav`` (see module doc)."""
    max_new_tokens: int = 8
    """Longest response, in tokens; longer responses are cut (and usually scored wrong)."""

    def __post_init__(self) -> None:
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 2:
            raise ValueError(
                f"SamplingConfig.num_samples={self.num_samples!r} is not valid; accepted: an integer >= 2 (K, the "
                "group size: every preset is group-relative, its baseline is the mean reward of the other samples)"
            )
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"SamplingConfig.temperature={self.temperature!r} is not valid; accepted: a number > 0")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"SamplingConfig.top_p={self.top_p!r} is not valid; accepted: 0 < top_p <= 1")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens!r} is not valid; accepted: an integer >= 1")


@dataclass
class Generation:
    """What an engine returns for B prompts x K samples."""

    response_ids: Tensor  # [B, K, T] long, right-padded
    response_mask: Tensor  # [B, K, T] bool, real tokens (up to and including EOS)
    logp_behav: Tensor  # [B, K, T] fp32, 0 off-mask
    version: Tensor  # [B, K] long, policy version of the weights that sampled each response


@dataclass
class RolloutBatch:
    """One training step's data. ``step`` is the 0-indexed step it was generated for."""

    step: int
    example_index: Tensor  # [B] long, index into the task's train split
    prompt_ids: Tensor  # [B, P] long, left-padded
    prompt_mask: Tensor  # [B, P] bool
    response_ids: Tensor  # [B, K, T] long
    response_mask: Tensor  # [B, K, T] bool
    logp_behav: Tensor  # [B, K, T] fp32
    version: Tensor  # [B, K] long
    rewards: Tensor  # [B, K] fp32 (0 where invalid)
    reward_valid: Tensor  # [B, K] bool: the reward function returned a finite number
    correct: Tensor  # [B, K] bool
    gen_seconds: float = 0.0  # wall time of generation + scoring (for throughput)

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return RolloutBatch(**{
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v) for f in fields(self)
        })

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (CPU), for checkpointing a queued rollout."""
        return {f.name: (v.cpu() if isinstance(v := getattr(self, f.name), Tensor) else v) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "RolloutBatch":
        return cls(**state)


@runtime_checkable
class RolloutEngine(Protocol):
    """Something that samples responses with its own copy of the weights (the behaviour
    policy) and accepts new weights from the trainer.

    ``version`` is the trainer step whose weights the engine holds (0 = the initial policy).
    ``state_dict`` must hold everything to restore the engine exactly (weights and version).
    """

    version: int

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, *, seed: int
    ) -> Generation:  # prompt_ids/prompt_mask [B, P]
        """K samples per prompt (K and the sampling settings are the engine's). ``seed``
        fixes the sampling randomness, so a rollout is a function of (weights, prompts, seed)."""
        ...

    def update_weights(self, policy: torch.nn.Module, version: int) -> None:
        """Copy ``policy``'s current weights into the engine and set ``version``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PromptSampler:
    """Which prompts step ``t`` uses: a deterministic function of ``(seed, t)``.

    Epoch e is a ``random.Random((seed, e))`` permutation of the train split, cut into
    ``n // batch_size`` batches (the remainder is dropped). Because ``indices(t)`` needs no
    state, the rollout queue can generate future steps early and a resumed run continues at
    exactly the same data position (position = step).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1 or batch_size > num_examples:
            raise ValueError(
                f"prompts_per_step={batch_size} is not valid; accepted: 1 <= prompts_per_step <= "
                f"{num_examples} (the size of the train split)"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = num_examples // batch_size
        self._perm: tuple[int, list[int]] | None = None

    def indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            perm = list(range(self.num_examples))
            random.Random(f"{self.seed}/{epoch}").shuffle(perm)
            self._perm = (epoch, perm)
        return self._perm[1][pos * self.batch_size : (pos + 1) * self.batch_size]


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
    """Decode each response (real tokens only, special tokens dropped) and score it.

    A reward function that raises or returns a non-finite value marks the sample invalid
    (reward 0, excluded from the baseline and the loss) instead of stopping the run.
    """
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
    import time

    from reclight.policy import encode_prompts

    start = time.perf_counter()
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples], use_chat_template)
    gen = engine.generate(prompt_ids, prompt_mask, seed=seed)
    rewards, valid, correct, _ = score(task, tokenizer, gen.response_ids.cpu(), gen.response_mask.cpu(), examples)
    device = gen.response_ids.device
    batch = RolloutBatch(
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
    return batch
