"""Prompt and response must fit the model's positions: checked at set-up, per example.

A causal LM has ``max_position_embeddings`` positions for the prompt AND the response. Past
them a learned-position model (GPT-2) fails with an ``IndexError`` in its embedding, and a RoPE
model (Llama) silently runs on positions it was never trained on. So, before anything runs:

- :func:`check_response_budget`: ``sampling.max_new_tokens`` and the evaluation's
  ``monitor.eval_max_new_tokens`` must each leave at least one position for the prompt (for the
  embedded tiny model this is checked when the config is built; for a model folder, once its
  config is loaded). ``max_new_tokens: 100000`` on a 64-position model fails here, at once,
  instead of generating for minutes;
- :func:`fit_examples`: every prompt of a split (rendered as the trainer renders it, chat
  template included) is measured in tokens once, when the split is first used, and one longer
  than ``positions - max(max_new_tokens, eval_max_new_tokens)`` is dropped or cut from the left,
  as ``data.long_prompts`` says. Doing it per example at set-up, not per batch, keeps every
  batch at ``prompts_per_step`` prompts (a dropped prompt never reaches a batch) and measures
  each prompt once. The counts are logged at step 0 (``prompts/dropped``,
  ``prompts/truncated``) and printed. A split left empty is an error naming the budget.

``truncate_left`` keeps the END of the prompt (the task's instruction follows the question in
every shipped template) and cuts its beginning at a token boundary, on the original text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info

from reclight.checks import invalid
from reclight.models.tokens import render_prompts, uses_chat_template
from reclight.tasks.base import Example, Task
from reclight.tasks.jsonl import DataError

LongPrompts = Literal["drop", "truncate_left"]
LONG_PROMPTS = ("drop", "truncate_left")


def max_positions(config: Any) -> int | None:
    """The model's number of positions (``max_position_embeddings``, which GPT-2's config maps
    to ``n_positions``), or None when its config states none."""
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_response_budget(positions: int, max_new_tokens: int, eval_max_new_tokens: int, model: str) -> None:
    """Each response cap must leave the prompt at least one of the model's ``positions``."""
    for field, value in (("model.sampling.max_new_tokens", max_new_tokens),
                         ("model.monitor.eval_max_new_tokens", eval_max_new_tokens)):
        if value >= positions:
            raise invalid(field, value, f"at most {positions - 1} with {model}: it has {positions} positions "
                          f"(max_position_embeddings) for the prompt and the response together")


def _lengths(tokenizer: Any, prompts: Sequence[str], use_chat_template: bool | None) -> list[int]:
    chat = uses_chat_template(tokenizer, use_chat_template)
    ids = tokenizer(render_prompts(tokenizer, prompts, chat), add_special_tokens=not chat)["input_ids"]
    return [len(x) for x in ids]


def _truncate_left(tokenizer: Any, example: Example, budget: int, use_chat_template: bool | None) -> Example:
    """``example`` with its prompt's beginning cut so that the rendered prompt has at most
    ``budget`` tokens (cut at a token boundary of the raw prompt, on the original text)."""
    text = example.prompt
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
    ids, offsets = enc["input_ids"], enc.get("offset_mapping")
    keep = len(ids) - (_lengths(tokenizer, [text], use_chat_template)[0] - budget)
    while keep > 0:
        cut = text[offsets[len(ids) - keep][0]:] if offsets else tokenizer.decode(ids[-keep:])
        over = _lengths(tokenizer, [cut], use_chat_template)[0] - budget
        if over <= 0:
            return replace(example, prompt=cut)
        keep -= over  # a token merge at the cut (BPE) or a chat template made it longer than counted
    raise DataError(f"data.long_prompts=truncate_left: example {example.uid!r} cannot be cut to {budget} prompt tokens "
                    "(its rendering alone, e.g. the chat template, takes more); accepted: a model with more positions "
                    "or smaller model.sampling.max_new_tokens / model.monitor.eval_max_new_tokens")


def fit_examples(examples: Sequence[Example], split: str, tokenizer: Any, *, budget: int, policy: LongPrompts,
                 use_chat_template: bool | None, why: str) -> tuple[list[Example], int]:
    """``(examples that fit, how many were dropped or truncated)``: prompts longer than
    ``budget`` tokens are dropped or cut from the left (``policy``). ``why`` says where the
    budget comes from, for the messages."""
    lengths = _lengths(tokenizer, [e.prompt for e in examples], use_chat_template)
    long = [i for i, n in enumerate(lengths) if n > budget]
    if not long:
        return list(examples), 0
    if policy == "drop":
        drop = set(long)
        kept = [e for i, e in enumerate(examples) if i not in drop]
        if not kept:
            raise DataError(
                f"data.long_prompts=drop: all {len(examples)} {split} prompts are longer than {budget} tokens ({why}; "
                f"the shortest has {min(lengths)}); accepted: a model with more positions, smaller "
                "max_new_tokens, shorter prompts, or data.long_prompts: truncate_left"
            )
    else:
        kept = list(examples)
        for i in long:
            kept[i] = _truncate_left(tokenizer, examples[i], budget, use_chat_template)
    done = "dropped" if policy == "drop" else "cut from the left"
    rank_zero_info(f"data.long_prompts={policy}: {len(long)} of {len(examples)} {split} prompts are longer than "
                   f"{budget} tokens ({why}; the longest has {max(lengths)}): {done}")
    return kept, len(long)


class ContextTask(Task):
    """A view of ``task`` whose ``examples(split)`` are the fitted ones (``examples_of``); the
    rewards, ``correct`` and stop strings are the task's. Handed to code that reads a task's
    splits itself (the supervised warm-up)."""

    def __init__(self, task: Task, examples_of: Callable[[str], Sequence[Example]]) -> None:
        self.task = task
        self.name = task.name
        self._examples_of = examples_of

    def examples(self, split: str) -> Sequence[Example]:
        return self._examples_of(split)

    def reward(self, response: str, example: Example) -> float:
        return self.task.reward(response, example)

    def correct(self, response: str, example: Example) -> bool:
        return self.task.correct(response, example)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.task.stop_strings
