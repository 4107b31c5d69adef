"""Response-token log-probabilities without materialising ``[tokens, vocab]`` logits.

For final hidden states ``h_i`` (after the final norm) at the positions that predict targets
``y_i``, an LM head ``W [V, H]`` (optional bias ``b [V]``) and a sampling temperature ``T``::

    z_i    = (W h_i + b) / T                        logits, [V]
    lse_i  = log sum_v exp(z_iv)
    logp_i = z_i[y_i] - lse_i                       what the policy loss needs
    ent_i  = lse_i - sum_v p_iv z_iv                entropy of p_i = softmax(z_i)

Gradients, with g_i = dL/dlogp_i and e_i = dL/dent_i::

    dL/dz_i = g_i (onehot(y_i) - p_i) - e_i p_i (log p_i + ent_i)
    dL/dh_i = W^T dL/dz_i / T,   dL/dW = sum_i dL/dz_i h_i^T / T,   dL/db = sum_i dL/dz_i / T

:func:`token_logprobs` evaluates this in chunks of ``chunk_size`` tokens inside one
``torch.autograd.Function``: the forward keeps only ``lse`` (and ``ent``) per token, and the
backward recomputes each chunk's logits. Peak extra memory is one or two ``[chunk_size, V]``
fp32 buffers instead of several ``[N, V]`` tensors. :func:`token_logprobs_naive` is the
textbook reference (full logits, ``log_softmax``, gather).

Departures from the textbook computation, listed up front:

- The temperature is folded into the small operands (``h / T`` and ``b / T``) instead of
  dividing the ``[N, V]`` logits. Mathematically identical; in fp32 the results differ from
  ``(W h + b) / T`` by rounding only (~1e-7 relative).
- Logits are always computed in fp32. bf16/fp16 hidden states and weights are upcast (the
  weight once per forward and once per backward, a transient fp32 copy of ``[V, H]``), and
  ``logp``/``entropy`` come back in fp32. Gradients come back in the inputs' dtypes, with
  ``dL/dW`` accumulated in fp32 across chunks before the final cast. (fp64 inputs stay fp64
  throughout, which is what ``gradcheck`` needs.)
- The backward costs one extra ``[N, V, H]`` matmul (the logits recomputation): that is the
  price of not storing logits. See docs/benchmarks.md for measured time and memory.
- The entropy is differentiable (its gradient is computed in the same backward pass), so it
  can be used as a bonus term, not only as a metric.

Imports only torch and the standard library; :func:`causal_lm_hidden_and_head` duck-types a
Hugging Face causal LM without importing transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "causal_lm_hidden_and_head",
    "causal_lm_token_logprobs",
    "token_logprobs",
    "token_logprobs_naive",
]


def _check_inputs(
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H]
    targets: Tensor,  # [N]
    bias: Tensor | None,  # [V]
    temperature: float,
) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H={hidden.shape[1]}], got shape {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ValueError(
            f"targets must be [N={hidden.shape[0]}], got shape {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor (int64), got {targets.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got shape {tuple(bias.shape)}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_logprobs_naive(
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H]
    targets: Tensor,  # [N] long
    *,
    bias: Tensor | None = None,  # [V]
    temperature: float = 1.0,
    chunk_size: int = 1024,  # ignored: kept so both functions share one signature
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:  # logp [N] fp32 (, entropy [N] fp32)
    """Reference: ``logp_i = log_softmax((W h_i + b) / T)[y_i]`` with full ``[N, V]`` logits.

    Logits are upcast to fp32 (as the chunked path does), so both paths can be compared in any
    input dtype. ``entropy_i = -sum_v p_iv log p_iv`` is differentiable. Memory: several
    ``[N, V]`` fp32 tensors live until the backward (logits, log-softmax and their grads).
    """
    del chunk_size
    _check_inputs(hidden, weight, targets, bias, temperature)
    acc = _acc_dtype(hidden, weight)
    logits = hidden.to(acc) @ weight.to(acc).t()  # [N, V]
    if bias is not None:
        logits = logits + bias.to(acc)
    if temperature != 1.0:  # as samplers do: no extra [N, V] pass at T = 1
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # [N, V]
    logp = logp_all.gather(1, targets.long().unsqueeze(1)).squeeze(1)  # [N]
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N]
    return logp, entropy


def _acc_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 ones (gradcheck)."""
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


def _chunk_logits(
    hidden_scaled: Tensor,  # [C, H] fp32, already divided by T
    weight32: Tensor,  # [V, H] fp32
    bias_scaled: Tensor | None,  # [V] fp32, already divided by T
    out: Tensor,  # [C, V] fp32 buffer, overwritten
) -> Tensor:  # [C, V] = out
    if bias_scaled is None:
        return torch.mm(hidden_scaled, weight32.t(), out=out)
    return torch.addmm(bias_scaled, hidden_scaled, weight32.t(), out=out)


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    if n == 0:
        return [(0, 0)]  # one empty chunk: empty outputs, zero gradients
    step = n if chunk_size <= 0 or chunk_size >= n else chunk_size
    return [(start, min(start + step, n)) for start in range(0, n, step)]


class _ChunkedLogprobs(torch.autograd.Function):
    """Chunked ``logp`` (and entropy); see the module docstring for the equations."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V, H]
        bias: Tensor | None,  # [V]
        targets: Tensor,  # [N] long
        temperature: float,
        chunk_size: int,
        return_entropy: bool,
    ) -> tuple[Tensor, Tensor]:  # logp [N] fp32, entropy [N] fp32 (empty if not requested)
        n, vocab = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / temperature
        acc = _acc_dtype(hidden, weight)
        weight32 = weight.to(acc)
        bias_scaled = None if bias is None else bias.to(acc) * inv_t
        logp = hidden.new_empty(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        entropy = hidden.new_empty(n if return_entropy else 0, dtype=acc)
        spans = _chunks(n, chunk_size)
        # One buffer reused by every chunk: large CPU allocations are fresh mmaps, and
        # first-touching a new one per chunk costs page faults comparable to the softmax.
        buf = hidden.new_empty(spans[0][1] - spans[0][0], vocab, dtype=acc)
        for start, end in spans:
            z = _chunk_logits(hidden[start:end].to(acc) * inv_t, weight32, bias_scaled,
                              buf[: end - start])  # [C, V]
            z_target = z.gather(1, targets[start:end].long().unsqueeze(1)).squeeze(1)  # [C]
            z_max = z.amax(dim=1)  # [C]
            # In place from here on: z - max -> exp -> e (the logits are not needed again).
            e = z.sub_(z_max.unsqueeze(1)).exp_()  # [C, V]
            sum_e = e.sum(dim=1)  # [C]
            lse_c = z_max + sum_e.log()
            lse[start:end] = lse_c
            logp[start:end] = z_target - lse_c
            if return_entropy:
                # ent = lse - sum p z = log S - sum e (z - max) / S, and z - max = log e
                # (xlogy gives 0 * log 0 = 0 for underflowed terms, the right limit).
                sum_e_log_e = e.xlogy_(e).sum(dim=1)
                entropy[start:end] = sum_e.log() - sum_e_log_e / sum_e
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.return_entropy = return_entropy
        # Unused outputs then arrive as None in backward, not as [N] zeros to multiply through.
        ctx.set_materialize_grads(False)
        if not return_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any,
        grad_logp: Tensor | None,  # [N]
        grad_entropy: Tensor | None,  # [N] (or [0])
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / ctx.temperature
        if not ctx.return_entropy:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        acc = lse.dtype
        grad_logp = lse.new_zeros(n) if grad_logp is None else grad_logp.to(acc)

        weight32 = weight.to(acc)
        bias_scaled = None if bias is None else bias.to(acc) * inv_t
        grad_hidden = hidden.new_empty(hidden.shape, dtype=acc) if need_h else None
        grad_weight = weight.new_zeros(weight.shape, dtype=acc) if need_w else None
        grad_bias = weight.new_zeros(vocab, dtype=acc) if need_b else None

        spans = _chunks(n, ctx.chunk_size)
        buf = hidden.new_empty(spans[0][1] - spans[0][0], vocab, dtype=acc)
        buf2 = torch.empty_like(buf) if grad_entropy is not None else None
        for start, end in spans:
            c = end - start
            h_scaled = hidden[start:end].to(acc) * inv_t  # [C, H]
            z = _chunk_logits(h_scaled, weight32, bias_scaled, buf[:c])  # [C, V]
            log_p = z.sub_(lse[start:end].unsqueeze(1))  # [C, V], in place
            g = grad_logp[start:end].unsqueeze(1)  # [C, 1]
            if grad_entropy is None:
                # dz = g (onehot - p), built in place: p -> -g p -> += g at the target.
                dz = log_p.exp_().mul_(-g)
            else:
                # dz = g onehot - p (g + e (log p + ent)), with e = dL/dent.
                e = grad_entropy[start:end].to(acc).unsqueeze(1)
                p = torch.exp(log_p, out=buf2[:c])
                dz = log_p.mul_(e).add_(g + e * entropy[start:end].unsqueeze(1)).mul_(p).neg_()
            dz.scatter_add_(1, targets[start:end].long().unsqueeze(1), g)
            # dL/dh = dz W / T; dL/dW += dz^T h / T (1/T already in h_scaled); dL/db += sum dz / T
            if grad_hidden is not None:
                torch.mm(dz, weight32, out=grad_hidden[start:end]).mul_(inv_t)
            if grad_weight is not None:
                grad_weight.addmm_(dz.t(), h_scaled)
            if grad_bias is not None:
                grad_bias.add_(dz.sum(dim=0), alpha=inv_t)

        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def token_logprobs(
    hidden: Tensor,  # [N, H] final hidden states at the positions that predict targets
    weight: Tensor,  # [V, H] LM head weight (may be tied to the input embeddings)
    targets: Tensor,  # [N] long, token ids whose log-prob we want
    *,
    bias: Tensor | None = None,  # [V] optional LM-head bias
    temperature: float = 1.0,  # logits are divided by this (as in sampling)
    chunk_size: int = 1024,  # tokens per chunk; <= 0 or >= N means one chunk
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:  # logp [N] fp32 (, entropy [N] fp32)
    """Exact ``logp_i = log softmax((W h_i + b) / T)[y_i]``, chunked over tokens.

    Never materialises ``[N, V]``: each chunk's logits are computed, reduced to
    ``lse_i`` (and ``ent_i = lse_i - sum_v p_iv z_iv``), and dropped; the backward recomputes
    them. Same values and gradients as :func:`token_logprobs_naive` up to fp32 rounding.

    Returns fp32 ``logp`` ``[N]``, and with ``return_entropy=True`` also the fp32 entropy
    ``[N]`` of the tempered distribution, which is differentiable (wrt hidden, weight, bias).
    Gradients flow to ``hidden``, ``weight`` and ``bias`` when they require grad, in their own
    dtypes. Works on any device torch supports (CPU, CUDA).
    """
    _check_inputs(hidden, weight, targets, bias, temperature)
    logp, entropy = _ChunkedLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), int(chunk_size), bool(return_entropy)
    )
    return (logp, entropy) if return_entropy else logp


def causal_lm_hidden_and_head(
    model: Any,  # a Hugging Face *ForCausalLM (LlamaForCausalLM, Qwen2ForCausalLM, ...)
    input_ids: Tensor,  # [B, L] long
    attention_mask: Tensor | None = None,  # [B, L], 1 = real token
    *,
    position_ids: Tensor | None = None,  # [B, L]; pass it for left-padded batches
) -> tuple[Tensor, Tensor, Tensor | None]:  # hidden [B, L, H], weight [V, H], bias [V] | None
    """Run a causal LM's backbone only and return its final hidden states and LM head.

    ``hidden[b, t]`` is the post-final-norm state that predicts ``input_ids[b, t + 1]``, so
    ``model(...).logits == hidden @ weight.T (+ bias)``. The full ``[B, L, V]`` logits are
    never computed. The backbone is ``model.get_decoder()`` (in transformers 5.x this is
    ``model.model``, e.g. ``LlamaModel`` / ``Qwen2Model``, for Llama and Qwen2); if a model has
    no separate backbone, it falls back to ``model(..., output_hidden_states=True)``, which does
    compute the full logits. Tied embeddings: ``weight`` is the shared parameter itself, so
    gradients reach it once through each use.
    """
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(
            f"model.get_output_embeddings() returned {type(head).__name__}; expected a Linear "
            "LM head with .weight (a *ForCausalLM model)"
        )
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else None
    # An FSDP2-sharded model (torch's FSDPModule) unshards its own parameters (embeddings, final
    # norm, LM head) only inside ITS forward: run the whole model, keeping one position's logits
    # (``logits_to_keep=1``); the LM head weight stays unsharded until the backward.
    fsdp_root = _is_fsdp_module(model)
    if backbone is not None and backbone is not model and not fsdp_root:
        out = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=True,
            **({"logits_to_keep": 1} if fsdp_root else {}),
        )
        hidden = out.hidden_states[-1]
    return hidden, head.weight, getattr(head, "bias", None)


def _is_fsdp_module(model: Any) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule)


def causal_lm_token_logprobs(
    model: Any,  # a Hugging Face *ForCausalLM
    input_ids: Tensor,  # [B, L] long
    attention_mask: Tensor | None = None,  # [B, L]
    *,
    target_mask: Tensor | None = None,  # [B, L - 1] bool: which next-token log-probs to compute
    position_ids: Tensor | None = None,  # [B, L]
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:  # logp [B, L - 1] fp32 (, entropy [B, L - 1])
    """``logp[b, t] = log p(input_ids[b, t + 1] | input_ids[b, : t + 1])``, chunked.

    Only positions with ``target_mask`` True are computed (e.g. response tokens); the others
    hold 0 in ``logp`` and ``entropy``. Without ``target_mask`` all ``L - 1`` positions are
    computed.
    """
    hidden, weight, bias = causal_lm_hidden_and_head(
        model, input_ids, attention_mask, position_ids=position_ids
    )
    hidden = hidden[:, :-1]  # [B, L - 1, H]
    targets = input_ids[:, 1:]  # [B, L - 1]
    if target_mask is None:
        target_mask = torch.ones_like(targets, dtype=torch.bool)
    if target_mask.shape != targets.shape:
        raise ValueError(
            f"target_mask must be [B, L - 1] = {tuple(targets.shape)}, got {tuple(target_mask.shape)}"
        )
    target_mask = target_mask.bool()
    out = token_logprobs(
        hidden[target_mask], weight, targets[target_mask], bias=bias,
        temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy,
    )
    logp_flat, entropy_flat = out if return_entropy else (out, None)
    zeros = logp_flat.new_zeros(targets.shape)
    if entropy_flat is None:
        return zeros.masked_scatter(target_mask, logp_flat)
    return zeros.masked_scatter(target_mask, logp_flat), zeros.masked_scatter(target_mask, entropy_flat)
