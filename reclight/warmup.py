"""Greedy evaluation and the supervised warm-up that gives RL a partially competent start.

RL from a random model on a sparse 0/1 reward learns nothing (no sample is ever right), so the
embedded default first trains on gold answers (cross-entropy on the answer tokens and EOS)
until greedy accuracy on held-out prompts reaches ``target_accuracy``. Stopping on accuracy,
not on a step count, matters: a fixed count landed anywhere between 20% and 70% depending on
the seed, and RL from about 25% collapsed in the feasibility probe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from reclight.engine_hf import hf_generate
from reclight.policy import encode_prompts, response_logprobs
from reclight.rollout import score
from reclight.tasks.base import Example, Task


@dataclass(frozen=True)
class WarmupConfig:
    """Supervised warm-up on gold answers, run once at the start of ``fit``."""

    target_accuracy: float = 0.4
    """Stop as soon as greedy accuracy on the check set reaches this (in [0, 1])."""
    max_steps: int = 3000
    """Give up (and start RL anyway) after this many steps."""
    batch_size: int = 128
    """Examples per supervised step."""
    lr: float = 2e-3
    """AdamW learning rate of the warm-up (its own optimizer, discarded afterwards)."""
    check_every: int = 10
    """Steps between accuracy checks (accuracy can jump from 20% to 70% within 50 steps once
    the model "gets" the task, so check often to stop near the target)."""
    check_size: int = 200
    """Check on the LAST this-many val examples (greedy)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise ValueError(f"WarmupConfig.target_accuracy={self.target_accuracy!r} is not valid; accepted: [0, 1]")
        for name in ("max_steps", "batch_size", "check_every", "check_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"WarmupConfig.{name}={v!r} is not valid; accepted: an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"WarmupConfig.lr={self.lr!r} is not valid; accepted: lr > 0")


@torch.no_grad()
def greedy_eval(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    use_chat_template: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # correct [N] bool, rewards [N], lengths [N]
    """Greedy responses for ``examples`` and their scores."""
    was_training = model.training
    model.eval()
    ids, mask = encode_prompts(tokenizer, [e.prompt for e in examples], use_chat_template)
    resp, rmask, _ = hf_generate(
        model, tokenizer, ids, mask, num_samples=1, max_new_tokens=max_new_tokens,
        do_sample=False, record_logp=False, stop_strings=task.stop_strings,
    )
    model.train(was_training)
    rewards, _, correct, _ = score(task, tokenizer, resp.cpu(), rmask.cpu(), examples)
    return correct[:, 0], rewards[:, 0], rmask[:, 0].sum(-1).float().cpu()


def _answer_tokens(tokenizer: Any, answers: Sequence[str]) -> tuple[Tensor, Tensor]:  # [N, T] ids, mask
    eos = tokenizer.eos_token_id
    rows = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


def supervised_warmup(
    model: Any,
    tokenizer: Any,
    task: Task,
    cfg: WarmupConfig,
    *,
    seed: int,
    max_new_tokens: int,
    use_chat_template: bool | None = None,
    log: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on gold answers of the train split until the greedy accuracy
    on the last ``check_size`` val examples reaches ``target_accuracy`` (checked every
    ``check_every`` steps) or ``max_steps`` is spent. Returns the final figures."""
    train = task.examples("train")
    check = list(task.examples("val"))[-cfg.check_size :]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, acc, step, loss = time.perf_counter(), 0.0, 0, torch.tensor(float("nan"))
    device = next(model.parameters()).device
    while step < cfg.max_steps:
        if step % cfg.check_every == 0:
            acc = greedy_eval(model, tokenizer, task, check, max_new_tokens=max_new_tokens,
                              use_chat_template=use_chat_template)[0].float().mean().item()
            if log is not None:  # no loss before the first batch (it would read "nan")
                log({"warmup/acc": acc, **({"warmup/loss": loss.item()} if step else {})}, step)
            if acc >= cfg.target_accuracy:
                break
        idx = torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()
        batch = [train[i] for i in idx]
        pid, pmask = encode_prompts(tokenizer, [e.prompt for e in batch], use_chat_template)
        aid, amask = _answer_tokens(tokenizer, [e.answer for e in batch])
        logp, _ = response_logprobs(model, pid.to(device), pmask.to(device), aid[:, None].to(device),
                                    amask[:, None].to(device))
        loss = -logp.sum() / amask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    else:  # ran out of steps: one last check so the reported accuracy is current
        acc = greedy_eval(model, tokenizer, task, check, max_new_tokens=max_new_tokens,
                          use_chat_template=use_chat_template)[0].float().mean().item()
    opt.zero_grad(set_to_none=True)
    return {"warmup/steps": float(step), "warmup/acc": acc, "warmup/seconds": time.perf_counter() - start}
