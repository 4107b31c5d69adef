"""The training forward: log-probs (and entropies) of response tokens under the policy.

Shapes: ``B`` prompts, ``K`` samples per prompt, ``P`` prompt tokens (left-padded), ``T``
response tokens (right-padded). A rollout's token sequence is ``prompt[b] + response[b, k]``.

Position ids are computed from the attention mask, so a left-padded prompt gets the same
positions as the same prompt alone: the per-sample ``logp`` does not depend on what else is in
the batch (tested). Only the ``response_mask`` positions go through the LM head, through the
chunked kernel of :mod:`reclight.kernels.logprobs` (never the whole ``[tokens, vocab]`` logits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reclight.kernels.logprobs import causal_lm_hidden_and_head, token_logprobs
from reclight.kernels.masks import position_ids_from_mask

TRAIN_FORWARDS = ("hf", "fused")


def response_logprobs(
    model: Any,
    prompt_ids: Tensor,  # [B, P] long, left-padded
    prompt_mask: Tensor,  # [B, P] bool
    response_ids: Tensor,  # [B, K, T] long, right-padded
    response_mask: Tensor,  # [B, K, T] bool, real response tokens
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "hf",
    compile_pointwise: bool = False,
    checkpointing: bool = False,
) -> tuple[Tensor, Tensor | None]:  # logp [B, K, T] fp32 (0 off-mask), entropy [B, K, T] | None
    """``logp[b, k, t] = log softmax(logits / temperature)[response_ids[b, k, t]]`` given the
    prompt and the earlier response tokens, with gradient when ``model`` has it.

    ``entropy`` is the entropy of the same tempered next-token distribution (differentiable;
    detach it for logging).

    ``impl``: ``"hf"`` runs the model's own forward on the ``B * K`` sequences ``prompt +
    response``; ``"fused"`` (Llama only) runs
    :func:`reclight.kernels.fused_forward.shared_prefix_hidden`: each prompt once for its K
    samples, attention written out, with its element-wise chains compiled when
    ``compile_pointwise``. Same values up to float rounding.

    ``checkpointing`` (fused only; the HF forward follows the model's own
    ``gradient_checkpointing_enable``): each decoder layer recomputed in the backward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is not valid; accepted: temperature > 0")
    if impl not in TRAIN_FORWARDS:
        raise ValueError(f"impl={impl!r} is not valid; accepted: {', '.join(map(repr, TRAIN_FORWARDS))}")
    B, K, T = response_ids.shape
    P = prompt_ids.shape[1]
    if impl == "fused":
        from reclight.kernels.fused_forward import shared_prefix_hidden

        hidden = shared_prefix_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                      compile_pointwise=compile_pointwise, checkpointing=checkpointing)
        head = model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
    else:
        ids = torch.cat([prompt_ids.repeat_interleave(K, 0), response_ids.reshape(B * K, T)], dim=1)
        attn = torch.cat([prompt_mask.repeat_interleave(K, 0), response_mask.reshape(B * K, T)], dim=1).long()
        hidden, weight, bias = causal_lm_hidden_and_head(model, ids, attn, position_ids=position_ids_from_mask(attn))
        # hidden[:, j] predicts token j + 1: the response tokens P..P+T-1 come from P-1..P+T-2.
        hidden = hidden[:, P - 1 : P + T - 1].reshape(B, K, T, -1)
    mask = response_mask.bool()
    out = token_logprobs(hidden[mask], weight, response_ids[mask], bias=bias, temperature=temperature,
                         return_entropy=return_entropy)
    logp_flat, ent_flat = out if return_entropy else (out, None)
    logp = torch.zeros(B, K, T, dtype=torch.float32, device=hidden.device).masked_scatter(mask, logp_flat)
    entropy = None
    if ent_flat is not None:
        entropy = torch.zeros(B, K, T, dtype=torch.float32, device=hidden.device).masked_scatter(mask, ent_flat)
    return logp, entropy


def enable_checkpointing(model: Any) -> None:
    """The HF forward's gradient checkpointing (``model.train_forward.checkpointing``),
    non-reentrant: transformers 5 names it ``activation_checkpointing_enable`` (the older name
    warns there), transformers 4 ``gradient_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model: Any) -> bool:
    """Whether any module of ``model`` runs under HF's gradient checkpointing."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def resolve_forward_impl(impl: str, compile: bool, model_config: Any, sharded: bool,
                         other_problems: list[str] | None = None) -> tuple[str, str | None]:
    """``(impl, note)``: ``model.train_forward.impl`` for this policy, ``fused`` or ``hf`` (``auto``:
    fused where it applies, with a note saying which and why). An explicit ``fused`` that cannot
    apply, or ``compile`` with an ``auto`` that resolves to ``hf``, is an error naming why.
    ``other_problems``: settings of the run that rule the fused forward out (LoRA dropout)."""
    from reclight.checks import invalid
    from reclight.kernels.llama import llama_problems

    problems = llama_problems(model_config)
    if sharded:  # FSDP: the fused forward reads the full parameters outside the wrapped modules' forward
        problems.insert(0, "a sharded policy (FSDP)")
    problems += other_problems or []
    if impl == "fused" and problems:
        raise invalid("model.train_forward.impl", "fused", "'hf' or 'auto' here: the fused forward does not "
                      "support " + "; ".join(problems))
    if impl != "auto":
        return impl, None
    impl = "hf" if problems else "fused"
    if impl == "hf" and compile:
        raise invalid("model.train_forward.compile", True, "false here: model.train_forward.impl auto is "
                      "'hf' for this policy (" + "; ".join(problems) + "), and only the fused forward compiles")
    return impl, f"model.train_forward.impl auto: {impl}" + (f" ({'; '.join(problems)})" if problems else "")
