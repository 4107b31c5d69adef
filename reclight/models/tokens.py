"""Tokenizer conventions, written once: end and pad ids, and how prompts are rendered and encoded.

Shapes: ``B`` prompts, ``P`` prompt tokens (left-padded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


def eos_ids(tokenizer: Any) -> list[int]:
    """The token ids that end a response: ``tokenizer.eos_token_id`` as a list (some
    tokenizers and generation configs hold several)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has eos_token_id=None; accepted: a tokenizer with "
                         "an end-of-sequence token (responses must be able to end)")
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def pad_id(tokenizer: Any) -> int:
    """The id that pads responses: ``pad_token_id``, or the first EOS id when there is none
    (always a single int, never a list)."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else eos_ids(tokenizer)[0]


def uses_chat_template(tokenizer: Any, use_chat_template: bool | None) -> bool:
    """None: use the tokenizer's chat template when it has one."""
    return bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else bool(use_chat_template)


def render_prompts(tokenizer: Any, prompts: Sequence[str], use_chat_template: bool | None = None) -> list[str]:
    """The text fed to the model: one user turn through the chat template (with the
    generation prompt) when the tokenizer has one and ``use_chat_template`` is not False;
    the raw prompt otherwise."""
    if not uses_chat_template(tokenizer, use_chat_template):
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], use_chat_template: bool | None = None
) -> tuple[Tensor, Tensor]:  # prompt_ids [B, P] long, prompt_mask [B, P] bool (left-padded)
    chat = uses_chat_template(tokenizer, use_chat_template)
    enc = tokenizer(
        render_prompts(tokenizer, prompts, chat), padding=True, padding_side="left", return_tensors="pt",
        add_special_tokens=not chat,  # the template already holds BOS-like tokens
    )
    return enc["input_ids"], enc["attention_mask"].bool()
