"""Greedy evaluation: the held-out accuracy the trainer reports (``val/*``, ``test/*``) and
the supervised warm-up stops on.

It decodes with :class:`reclight.engines.fast.FastLlamaEngine` (``greedy``) where that engine
applies (a Llama model on the CPU, not sharded, a task without stop strings; elsewhere its fused
weight copy would cost accelerator memory), else with Hugging Face ``generate``: the same argmax
tokens up to float rounding of the logits (tested equal on the test models), without HF's
per-token Python overhead, which made a 200-problem check of the main job's model ~140 ms
(docs/benchmarks.md). The engine is kept per model between evaluations (its fused weight copy
refreshed each time). With ``micro_batch_size`` the prompts are decoded in pieces of that many,
side by side on ``threads`` threads (the engine's pieces, :mod:`reclight.kernels.threads`): the
tokens depend on the pieces up to float rounding, never on the threads."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from reclight.engines.fast import FastLlamaEngine
from reclight.engines.hf import hf_generate
from reclight.kernels.llama import llama_problems
from reclight.models.fsdp import is_sharded
from reclight.kernels.masks import response_mask_from_ids
from reclight.models.tokens import encode_prompts, eos_ids, pad_id
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
    micro_batch_size: int | None = None,
    threads: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:  # correct [N] bool, rewards [N], lengths [N]
    """Greedy responses for ``examples`` and their scores; ``micro_batch_size`` / ``threads``:
    the fast engine's pieces (module docstring; ignored by HF ``generate``)."""
    was_training = model.training
    model.eval()
    ids, mask = encode_prompts(tokenizer, [e.prompt for e in examples], use_chat_template)
    engine = _fast_greedy(model, tokenizer, task, max_new_tokens, micro_batch_size, threads)
    if engine is not None:
        resp = engine.generate(ids, mask, seed=0).response_ids  # greedy: the seed draws nothing
        # HF's mask convention: a response that ends in pad tokens without an EOS loses them (the
        # engine's own mask keeps a sampled pad, as the trainer must; here only HF parity matters)
        rmask = response_mask_from_ids(resp, eos_ids(tokenizer), pad_id(tokenizer))
    else:
        resp, rmask, _, _ = hf_generate(
            model, tokenizer, ids, mask, num_samples=1, max_new_tokens=max_new_tokens,
            do_sample=False, record_logp=False, stop_strings=task.stop_strings,
        )
    model.train(was_training)
    rewards, _, correct, _ = score(task, tokenizer, resp.cpu(), rmask.cpu(), examples, max_abs_reward=max_abs_reward)
    return correct[:, 0], rewards[:, 0], rmask[:, 0].sum(-1).float().cpu()


class _Greedy(NamedTuple):
    """The fields of a sampling config the engine reads, for one greedy response per prompt
    (:class:`~reclight.engines.base.SamplingConfig` requires K >= 2, the group size of a rollout)."""

    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0


_ENGINES: "weakref.WeakKeyDictionary[Any, FastLlamaEngine]" = weakref.WeakKeyDictionary()


def _fast_greedy(model: Any, tokenizer: Any, task: Task, max_new_tokens: int, micro_batch_size: int | None = None,
                 threads: int = 1) -> FastLlamaEngine | None:
    """The model's greedy fast engine holding its current weights, or None where the engine does
    not apply (module docstring)."""
    if (task.stop_strings or is_sharded(model) or llama_problems(getattr(model, "config", None))
            or next(model.parameters()).device.type != "cpu"):
        return None
    sampling = _Greedy(max_new_tokens=max_new_tokens)
    engine = _ENGINES.get(model)
    if engine is None or engine.tokenizer is not tokenizer or (engine.micro_batch_size, engine.threads) != (
            micro_batch_size, threads):
        if engine is not None:
            engine.close()
        engine = _ENGINES[model] = FastLlamaEngine(model, tokenizer, sampling, greedy=True,
                                                   micro_batch_size=micro_batch_size, threads=threads)
    else:
        engine.sampling = sampling
        engine.update_weights(model, 0)
    return engine
