"""The policy: loading a causal LM, rendering prompts, and the log-probs of response tokens.

Shapes: ``B`` prompts, ``K`` samples per prompt, ``P`` prompt tokens (left-padded), ``T``
response tokens (right-padded). A rollout's token sequence is ``prompt[b] + response[b, k]``.

Position ids are computed from the attention mask (``cumsum - 1``), so a left-padded prompt
gets the same positions as the same prompt alone: the per-sample ``logp`` does not depend on
what else is in the batch (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:  # the chunked, recompute-in-backward kernel (never materialises [N, V] logits)
    from reclight.logprobs import causal_lm_hidden_and_head, token_logprobs
except ImportError:  # pragma: no cover - only before reclight/logprobs.py exists
    causal_lm_hidden_and_head = None
    token_logprobs = None

TRAIN_FORWARDS = ("hf", "fused", "fused_compiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, field: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r} is not valid; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flex_attention")


def load_causal_lm(name_or_path: str, dtype: str = "float32",
                   attn_implementation: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a Hugging Face causal LM id or local folder.

    ``attn_implementation`` picks the HF attention kernel (None: the transformers default).

    The tokenizer is set to left padding (generation) with a pad token (EOS when it has none).
    Set ``HF_HUB_OFFLINE=1`` to forbid any network access.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype), **kw)
    return model, tokenizer


def render_prompts(tokenizer: Any, prompts: Sequence[str], use_chat_template: bool | None = None) -> list[str]:
    """The text fed to the model: one user turn through the chat template (with the
    generation prompt) when the tokenizer has one and ``use_chat_template`` is not False;
    the raw prompt otherwise."""
    use = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
    if not use:
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], use_chat_template: bool | None = None
) -> tuple[Tensor, Tensor]:  # prompt_ids [B, P] long, prompt_mask [B, P] bool (left-padded)
    chat = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
    enc = tokenizer(
        render_prompts(tokenizer, prompts, chat), padding=True, padding_side="left", return_tensors="pt",
        add_special_tokens=not chat,  # the template already holds BOS-like tokens
    )
    return enc["input_ids"], enc["attention_mask"].bool()


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:  # [N, L] -> [N, L] long
    """Positions counted over real tokens only (0 for left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _hidden_and_head(model: Any, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor):
    if causal_lm_hidden_and_head is not None:
        return causal_lm_hidden_and_head(model, input_ids, attention_mask, position_ids=position_ids)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, output_hidden_states=True)
    head = model.get_output_embeddings()
    return out.hidden_states[-1], head.weight, getattr(head, "bias", None)


def _token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature: float, return_entropy: bool
) -> tuple[Tensor, Tensor | None]:  # logp [N] fp32, entropy [N] fp32 | None
    """The one place that turns hidden states into token log-probs (switch kernels here)."""
    if token_logprobs is not None:
        out = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=return_entropy)
        return out if return_entropy else (out, None)
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1) if return_entropy else None
    return logp, entropy


def response_logprobs(
    model: Any,
    prompt_ids: Tensor,  # [B, P] long, left-padded
    prompt_mask: Tensor,  # [B, P] bool
    response_ids: Tensor,  # [B, K, T] long, right-padded
    response_mask: Tensor,  # [B, K, T] bool, real response tokens
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    forward: str = "hf",
) -> tuple[Tensor, Tensor | None]:  # logp [B, K, T] fp32 (0 off-mask), entropy [B, K, T] | None
    """``logp[b, k, t] = log softmax(logits / temperature)[response_ids[b, k, t]]`` given the
    prompt and the earlier response tokens, with gradient when ``model`` has it.

    Only the ``response_mask`` positions go through the LM head. ``entropy`` is the entropy of
    the same tempered next-token distribution (differentiable; detach it for logging).

    ``forward``: ``"hf"`` runs the model's own forward on the ``B * K`` sequences ``prompt +
    response``; ``"fused"`` (Llama only) runs :func:`reclight.fused_llama.shared_prefix_hidden`:
    each prompt once for its K samples, attention written out; ``"fused_compiled"`` the same with
    its element-wise chains compiled by ``torch.compile``. Same values up to float rounding.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is not valid; accepted: temperature > 0")
    if forward not in TRAIN_FORWARDS:
        raise ValueError(f"forward={forward!r} is not valid; accepted: {', '.join(map(repr, TRAIN_FORWARDS))}")
    B, K, T = response_ids.shape
    P = prompt_ids.shape[1]
    if forward in ("fused", "fused_compiled"):
        from reclight.fused_llama import shared_prefix_hidden

        hidden = shared_prefix_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                      compile_pointwise=forward == "fused_compiled")
        head = model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
    else:
        ids = torch.cat([prompt_ids.repeat_interleave(K, 0), response_ids.reshape(B * K, T)], dim=1)
        attn = torch.cat([prompt_mask.repeat_interleave(K, 0), response_mask.reshape(B * K, T)], dim=1).long()
        hidden, weight, bias = _hidden_and_head(model, ids, attn, position_ids_from_mask(attn))
        # hidden[:, j] predicts token j + 1: the response tokens P..P+T-1 come from P-1..P+T-2.
        hidden = hidden[:, P - 1 : P + T - 1].reshape(B, K, T, -1)
    mask = response_mask.bool()
    logp_flat, ent_flat = _token_logprobs(hidden[mask], weight, response_ids[mask], bias, temperature, return_entropy)
    logp = torch.zeros(B, K, T, dtype=torch.float32, device=hidden.device).masked_scatter(mask, logp_flat)
    entropy = None
    if ent_flat is not None:
        entropy = torch.zeros(B, K, T, dtype=torch.float32, device=hidden.device).masked_scatter(mask, ent_flat)
    return logp, entropy
