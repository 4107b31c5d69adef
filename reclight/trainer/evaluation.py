"""Greedy evaluation: the held-out accuracy the trainer reports (``val/*``, ``test/*``) and
the supervised warm-up stops on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from reclight.engines.hf import hf_generate
from reclight.models.tokens import encode_prompts
from reclight.rollout.scoring import DEFAULT_MAX_ABS_REWARD, score
from reclight.tasks.base import Example, Task


@torch.no_grad()
def greedy_eval(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    use_chat_template: bool | None = None,
    max_abs_reward: float = DEFAULT_MAX_ABS_REWARD,
) -> tuple[Tensor, Tensor, Tensor]:  # correct [N] bool, rewards [N], lengths [N]
    """Greedy responses for ``examples`` and their scores."""
    was_training = model.training
    model.eval()
    ids, mask = encode_prompts(tokenizer, [e.prompt for e in examples], use_chat_template)
    resp, rmask, _, _ = hf_generate(
        model, tokenizer, ids, mask, num_samples=1, max_new_tokens=max_new_tokens,
        do_sample=False, record_logp=False, stop_strings=task.stop_strings,
    )
    model.train(was_training)
    rewards, _, correct, _ = score(task, tokenizer, resp.cpu(), rmask.cpu(), examples, max_abs_reward=max_abs_reward)
    return correct[:, 0], rewards[:, 0], rmask[:, 0].sum(-1).float().cpu()
