"""The supervised warm-up that gives RL a partially competent start.

RL from a random model on a sparse 0/1 reward learns nothing (no sample is ever right), so the
embedded default first trains on gold answers (cross-entropy on the answer tokens and EOS)
until greedy accuracy on held-out prompts reaches ``target_accuracy``. Stopping on accuracy,
not on a step count, matters: a fixed count landed anywhere between 20% and 70% depending on
the seed, and RL from about 25% collapsed in the feasibility probe.

Where it checks: the task's ``check`` split (:mod:`reclight.tasks.base`), held out of the
training pool and disjoint from ``val``. Stopping at the first check that reaches the target is
a selection on the check set: it picks a moment when accuracy on those problems is high, by
progress or by an upward fluctuation. Checking on ``val`` (as before) made that selection on the
very problems every ``val/acc`` scores, biasing the RL-start figure upward. Not ``test``: it
stays untouched for a final figure, and in MATH-500 ``val`` is a subset of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from reclight.checks import check_float, check_int
from reclight.updates import fused_adamw_supported, micro_batches
from reclight.models.forward import response_logprobs
from reclight.models.tokens import eos_ids, pad_id, render_prompts, uses_chat_template
from reclight.tasks.base import Task
from reclight.trainer.evaluation import greedy_eval
from reclight.kernels.threads import MicroBatchThreads


@dataclass(frozen=True)
class WarmupConfig:
    """Supervised warm-up on gold answers, run once at the start of ``fit``."""

    target_accuracy: float = 0.4
    """Stop as soon as greedy accuracy on the check set reaches this (in [0, 1])."""
    max_steps: int = 3000
    """Give up (and start RL anyway) after this many steps."""
    batch_size: int = 128
    """Examples per supervised step."""
    micro_batch_size: int | None = None
    """Examples per forward/backward within a step (null: the whole batch); each piece's loss is
    its share of the step's (the step's answer-token count), so the gradient is the batch's up to
    float rounding. With ``model.train_forward.threads`` > 1 the pieces run side by side."""
    lr: float = 2e-3
    """AdamW learning rate of the warm-up (its own optimizer, discarded afterwards)."""
    check_every: int = 10
    """Steps between accuracy checks (accuracy can jump from 20% to 70% within 50 steps once
    the model "gets" the task, so check often to stop near the target)."""
    check_size: int = 200
    """Check on the first this-many examples of the task's ``check`` split (all of them when it
    has fewer), greedy; the check split is disjoint from ``val`` (see the module docstring)."""

    def __post_init__(self) -> None:
        check_float("model.warmup.target_accuracy", self.target_accuracy, ge=0, le=1, accepted="[0, 1]")
        for name in ("max_steps", "batch_size", "check_every", "check_size"):
            check_int(f"model.warmup.{name}", getattr(self, name), minimum=1)
        check_int("model.warmup.micro_batch_size", self.micro_batch_size, minimum=1, allow_none=True)
        check_float("model.warmup.lr", self.lr, gt=0)


def _pad(rows: list[list[int]], pad: int, left: bool) -> tuple[Tensor, Tensor]:  # [N, T] ids, mask
    """Padded to the longest row, on the left or the right; one tensor built from Python lists,
    not two indexed tensor writes per row (128 rows a step in the main job's warm-up)."""
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r if left else r + [pad] * (T - len(r)) for r in rows], dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])[:, None]
    cols = torch.arange(T)
    return ids, (cols >= T - lengths) if left else (cols < lengths)


class _EncodedExamples:
    """The training examples tokenized once (one batched tokenizer call each for the prompts and
    the answers), each step's batch padded from the stored ids: prompts left-padded, the same
    tensors as :func:`reclight.models.tokens.encode_prompts` on that batch (tested); answers as
    their tokens then one EOS (the first id when the tokenizer has several), right-padded with
    the pad id (the first EOS id when there is none), ``mask`` on answer and EOS tokens. Tokenizing
    2 x batch_size strings per step was 7% of the warm-up's time."""

    def __init__(self, tokenizer: Any, examples: Sequence[Any], use_chat_template: bool | None) -> None:
        chat = uses_chat_template(tokenizer, use_chat_template)
        prompts = render_prompts(tokenizer, [e.prompt for e in examples], chat)
        self.prompts = tokenizer(prompts, add_special_tokens=not chat)["input_ids"]
        eos = eos_ids(tokenizer)[0]
        self.answers = [a + [eos] for a in tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]]
        self.prompt_pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad_id(tokenizer)
        self.answer_pad = pad_id(tokenizer)

    def batch(self, idx: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # prompt ids, mask, answer ids, mask
        pid, pmask = _pad([self.prompts[i] for i in idx], self.prompt_pad, left=True)
        aid, amask = _pad([self.answers[i] for i in idx], self.answer_pad, left=False)
        return pid, pmask, aid, amask


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
    threads: MicroBatchThreads | None = None,
    eval_pieces: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on gold answers of the train split until the greedy accuracy
    on the first ``check_size`` examples of the ``check`` split reaches ``target_accuracy``
    (checked every ``check_every`` steps) or ``max_steps`` is spent. Returns the final figures.
    ``threads`` runs the micro-batches of a step (``cfg.micro_batch_size``); None: in turn.
    ``eval_pieces``: the checks' ``micro_batch_size`` and ``threads`` (:func:`greedy_eval`)."""
    train = task.examples("train")
    encoded = _EncodedExamples(tokenizer, train, use_chat_template)
    check = list(task.examples("check"))[: cfg.check_size]
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's fused AdamW kernel where it has one for these tensors (as the RL optimizer): 5-6x
    # faster than the per-tensor loop on this model, the same update up to float rounding.
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=fused_adamw_supported(params))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, acc, step, loss = time.perf_counter(), 0.0, 0, torch.tensor(float("nan"))
    device = next(model.parameters()).device
    threads = threads or MicroBatchThreads(1)

    def check_accuracy() -> float:
        return greedy_eval(model, tokenizer, task, check, max_new_tokens=max_new_tokens,
                           use_chat_template=use_chat_template, **(eval_pieces or {}))[0].float().mean().item()

    while step < cfg.max_steps:
        if step % cfg.check_every == 0:
            acc = check_accuracy()
            if log is not None:  # no loss before the first batch (it would read "nan")
                log({"warmup/acc": acc, **({"warmup/loss": loss.item()} if step else {})}, step)
            if acc >= cfg.target_accuracy:
                break
        idx = torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()
        pid, pmask, aid, amask = (x.to(device) for x in encoded.batch(idx))
        tokens = amask.sum()

        def piece_loss(rows: slice) -> tuple[Tensor, Tensor]:
            logp, _ = response_logprobs(model, pid[rows], pmask[rows], aid[rows, None], amask[rows, None])
            piece = -logp.sum() / tokens  # its share of the batch's mean answer-token loss
            return piece, piece.detach()

        opt.zero_grad(set_to_none=True)
        loss = sum(threads.backward(piece_loss, micro_batches(slice(0, len(idx)), cfg.micro_batch_size), params))
        opt.step()
        step += 1
    else:  # ran out of steps: one last check so the reported accuracy is current
        acc = check_accuracy()
    opt.zero_grad(set_to_none=True)
    return {"warmup/steps": float(step), "warmup/acc": acc, "warmup/seconds": time.perf_counter() - start}
