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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, field: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r} is not valid; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(name_or_path: str, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a Hugging Face causal LM id or local folder.

    The tokenizer is set to left padding (generation) with a pad token (EOS when it has none).
    Set ``HF_HUB_OFFLINE=1`` to forbid any network access.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype))
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


def _length_buckets(mask: Tensor, max_buckets: int = 4, min_saving: float = 0.1) -> list[tuple[Tensor, int]]:
    """Split the rows of ``mask`` [N, T] into at most ``max_buckets`` groups of similar response
    length, as ``(row indices, longest response in the group)``; one group of all rows when
    bucketing would save less than ``min_saving`` of the response positions."""
    lengths = mask.sum(-1)
    N, T = mask.shape
    all_rows = torch.arange(N, device=mask.device)
    if N < 2 * max_buckets:
        return [(all_rows, T)]
    order = lengths.argsort()
    groups = [g for g in order.tensor_split(max_buckets) if len(g)]
    longest = [max(int(lengths[g].max()), 1) for g in groups]
    if sum(len(g) * n for g, n in zip(groups, longest)) > (1 - min_saving) * N * T:
        return [(all_rows, T)]
    return list(zip(groups, longest))


def response_logprobs(
    model: Any,
    prompt_ids: Tensor,  # [B, P] long, left-padded
    prompt_mask: Tensor,  # [B, P] bool
    response_ids: Tensor,  # [B, K, T] long, right-padded
    response_mask: Tensor,  # [B, K, T] bool, real response tokens
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:  # logp [B, K, T] fp32 (0 off-mask), entropy [B, K, T] | None
    """``logp[b, k, t] = log softmax(logits / temperature)[response_ids[b, k, t]]`` given the
    prompt and the earlier response tokens, with gradient when ``model`` has it.

    Only the ``response_mask`` positions go through the LM head. ``entropy`` is the entropy of
    the same tempered next-token distribution (differentiable; detach it for logging). When
    response lengths differ a lot, the B * K sequences run as up to 4 length buckets, each cut
    after its longest response (no compute on trailing padding; same values).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is not valid; accepted: temperature > 0")
    B, K, T = response_ids.shape
    P = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids.repeat_interleave(K, 0), response_ids.reshape(B * K, T)], dim=1)
    attn = torch.cat([prompt_mask.repeat_interleave(K, 0), response_mask.reshape(B * K, T)], dim=1).long()
    mask = response_mask.bool().reshape(B * K, T)
    hidden_rows, hidden_t, hidden_sel = [], [], []
    for rows, length in _length_buckets(mask):
        # A bucket's rows are cut after its longest response: causal attention means the
        # trailing padding never changes the earlier positions, so this only skips work.
        bucket_attn = attn[rows, : P + length]
        hidden, weight, bias = _hidden_and_head(model, ids[rows, : P + length], bucket_attn,
                                                position_ids_from_mask(bucket_attn))
        # hidden[:, j] predicts token j + 1: the response tokens P..P+T-1 come from P-1..P+T-2.
        r, t = mask[rows, :length].nonzero(as_tuple=True)
        hidden_sel.append(hidden[r, P - 1 + t])
        hidden_rows.append(rows[r])
        hidden_t.append(t)
    rows_all, t_all = torch.cat(hidden_rows), torch.cat(hidden_t)
    targets = response_ids.reshape(B * K, T)[rows_all, t_all]
    logp_flat, ent_flat = _token_logprobs(torch.cat(hidden_sel), weight, targets, bias, temperature, return_entropy)
    zeros = torch.zeros(B * K, T, dtype=torch.float32, device=logp_flat.device)
    logp = zeros.index_put((rows_all, t_all), logp_flat).reshape(B, K, T)
    entropy = None
    if ent_flat is not None:
        entropy = zeros.index_put((rows_all, t_all), ent_flat).reshape(B, K, T)
    return logp, entropy
