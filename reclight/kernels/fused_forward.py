"""The fused Llama training forward (``model.train_forward.impl: fused``): the hidden states
that predict each response token, with autograd through the policy's own parameters.

Built from the decoder pieces of :mod:`reclight.kernels.llama` (shared with the fast engine);
tested against Hugging Face's ``LlamaForCausalLM`` to 1e-5 in fp32 (log-probs, entropies and
every parameter gradient; ``tests/kernels/test_fused_forward.py``).

Why a second training forward at all: on a CPU at reclight's model sizes, HF's forward spends its
time in places that are not the model's arithmetic. Measured on the RL-step benchmark's model
(3.4M parameters, 64 sequences of 62 tokens, bf16 autocast, one thread): the backward of
``scaled_dot_product_attention`` alone was 38% of the training pass. This forward differs in
three ways, each exact up to float rounding:

- **Shared prompt prefix.** The K samples of a prompt share its tokens. The prompt is run once
  (``B`` rows, not ``B * K``) and its keys/values, with their gradient, are attended to by all K
  responses through a broadcast matmul; the gradients of the K samples add up in the shared
  prefix as they would in K copies.
- **Attention written out** (two matmuls and a softmax, scores and softmax in fp32 as HF's eager
  attention), and q/k/v and gate/up as one matmul each (the weights are concatenated every call,
  so autograd splits their gradients back).
- **Only what the loss needs.** The last response token predicts nothing, so it is not run.

The element-wise chains between the matmuls (norm + cast, residual add + the next norm, RoPE,
SwiGLU, scale + mask + softmax + cast) are named pieces (:func:`pointwise_ops`) so that
``train_forward.compile: true`` can hand exactly these to ``torch.compile`` (one fused loop each,
forward and backward) while the matmuls stay library calls: on a CPU, after the matmuls, the
training pass is bound by the memory passes of these chains.

Contract: ``response_mask`` must be a prefix mask per sample (real tokens, then padding), which
is what every reclight engine produces; it raises otherwise, because a gap in the mask would be
attended differently from HF's path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reclight.kernels.llama import (
    LlamaDims,
    additive_mask,
    attn_out_and_mlp,
    fused_sources,
    pointwise_ops,
    rope_tables,
    split_heads,
)
from reclight.kernels.masks import position_ids_from_mask, prefill_visible


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on ``device_type`` (None: autocast is off)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _concat_params(policy: torch.nn.Module) -> dict[str, Tensor]:
    """The fused weights of the policy's own parameters (``torch.cat`` keeps the autograd link).

    Under autocast the matmul weights are cast here, once per forward: autocast caches the casts
    of leaf parameters only, so a concatenated weight would be cast again by every call using it."""
    cast = _autocast_dtype(next(policy.parameters()).device.type)
    out = {}
    for name, ts in fused_sources(policy).items():
        t = ts[0] if len(ts) == 1 else torch.cat(ts, dim=0)
        if cast is not None and name.split(".")[-1] in _MATMUL_WEIGHTS:
            t = t.to(cast)
        out[name] = t
    return out


_MATMUL_WEIGHTS = ("wqkv", "wo", "wgu", "wdown", "bqkv", "bo", "bgu", "bdown")


def _to_head_major(rows: Tensor, bi: Tensor, ki: Tensor, ti: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Token rows [M, G * D] -> zeros [B, G, K, T1, D] holding row m at (bi, :, ki, ti), written
    in one pass into the permuted view."""
    out = rows.new_zeros(shape)
    out.permute(0, 2, 3, 1, 4)[bi, ki, ti] = rows.view(rows.shape[0], shape[1], shape[4])
    return out


def _from_head_major(hm: Tensor, bi: Tensor, ki: Tensor, ti: Tensor) -> Tensor:
    """The inverse gather: [B, G, K, T1, D] -> token rows [M, G * D], one pass."""
    return hm.permute(0, 2, 3, 1, 4)[bi, ki, ti].reshape(bi.shape[0], -1)


class _ToHeadMajor(torch.autograd.Function):
    """Packed token rows [M, G * D] -> zero-padded head-major [B, G, K, T1, D]; the backward
    gathers them back (indices are unique). Replaces index_copy into a padded token-major buffer
    + a permuting copy (and their backwards): 5% of the training pass at the benchmark's shapes."""

    @staticmethod
    def forward(ctx: Any, packed: Tensor, bi: Tensor, ki: Tensor, ti: Tensor,  # type: ignore[override]
                shape: tuple[int, int, int, int, int]) -> Tensor:
        ctx.save_for_backward(bi, ki, ti)
        return _to_head_major(packed, bi, ki, ti, shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return _from_head_major(grad, *ctx.saved_tensors), None, None, None, None


class _FromHeadMajor(torch.autograd.Function):
    """Head-major [B, H, K, T1, D] -> the packed token rows [M, H * D]; the backward scatters
    into zeros (indices are unique: no accumulation)."""

    @staticmethod
    def forward(ctx: Any, hm: Tensor, bi: Tensor, ki: Tensor, ti: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(bi, ki, ti)
        ctx.shape = hm.shape
        return _from_head_major(hm, bi, ki, ti)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return _to_head_major(grad, *ctx.saved_tensors, ctx.shape), None, None, None


def shared_prefix_hidden(
    policy: torch.nn.Module,  # LlamaForCausalLM
    prompt_ids: Tensor,  # [B, P] long, left-padded
    prompt_mask: Tensor,  # [B, P] bool
    response_ids: Tensor,  # [B, K, T] long, right-padded
    response_mask: Tensor,  # [B, K, T] bool, a prefix mask per sample
    compile_pointwise: bool = False,
    checkpointing: bool = False,
) -> Tensor:  # [B, K, T, h]
    """``hidden[b, k, t]``: the final-norm hidden state that predicts ``response_ids[b, k, t]``
    (what ``causal_lm_hidden_and_head`` gives at position ``P - 1 + t`` of ``prompt + response``),
    with autograd through the policy's parameters; 0 where ``response_mask`` is False. See the
    module docstring.

    Two streams run layer by layer: the prompt stream ``[B, P]`` and the response stream, whose
    per-token ops (norms, projections, MLP) see only the ``M`` positions whose output is used
    (packed ``[M, h]``); attention scatters them into ``[B * K, T - 1]`` and back.
    ``compile_pointwise``: run the element-wise chains compiled (:func:`pointwise_ops`).
    ``checkpointing``: each layer under non-reentrant ``torch.utils.checkpoint`` (only its input
    rows are kept for the backward, the layer runs again there); same gradients up to rounding.
    """
    B, K, T = response_ids.shape
    P = prompt_ids.shape[1]
    if T == 0:
        raise ValueError("response_ids has no tokens (T=0)")
    rmask = response_mask.bool()
    if (rmask[..., 1:] & ~rmask[..., :-1]).any():
        raise ValueError("response_mask must be a prefix mask per sample (real tokens, then padding); "
                         "got a real token after a padding one; use train_forward='hf' for such masks")
    dims = LlamaDims(policy.config)
    H, D, eps = dims.num_heads, dims.head_dim, dims.eps
    dev = prompt_ids.device
    w = _concat_params(policy)
    dtype = w["embed"].dtype
    pmask = prompt_mask.bool()
    N, T1 = B * K, T - 1  # the last response token predicts nothing: not run
    inv_freq = dims.inv_freq(dev)
    pos_p = position_ids_from_mask(pmask)  # [B, P]
    # The element-wise chains see 2-D token rows (prompt [B * P, h], response [M, h]): one
    # compiled variant per chain serves both streams.
    cos_p, sin_p = (t.transpose(1, 2).reshape(B * P, 1, -1) for t in rope_tables(pos_p, inv_freq, dtype))
    bias_pp = additive_mask(prefill_visible(pmask))[:, None]  # [B, 1, P, P]
    xp = F.embedding(prompt_ids.reshape(B * P), w["embed"])  # [B * P, h]
    # Response position t (token t) feeds hidden[:, :, t + 1], used iff token t + 1 is real.
    idx = rmask[..., 1:].reshape(N * T1).nonzero().squeeze(1)  # [M]
    M = idx.numel()
    Hkv, Htot = dims.num_kv_heads, dims.num_heads + 2 * dims.num_kv_heads
    if M:
        bi, ki, ti = idx // (K * T1), idx // T1 % K, idx % T1  # (prompt, sample, position) of each
        pos_r = pmask.long().sum(-1)[bi] + ti  # [M]: positions continue after the prompt
        cos_r, sin_r = (t[:, 0] for t in rope_tables(pos_r[:, None], inv_freq, dtype))  # [M, 1, D]
        # Scores of the response queries [B, H, K, T1, P + T1]: the prompt's real tokens, then
        # causal over the sample's own tokens (unused positions come after every used one).
        bias_r = additive_mask(torch.cat((
            pmask[:, None, None, None, :].expand(B, 1, 1, T1, P),
            torch.ones(T1, T1, dtype=torch.bool, device=dev).tril().expand(B, 1, 1, T1, T1)), dim=-1))
        xr = F.embedding(response_ids[bi, ki, ti], w["embed"])  # [M, h]
    scale = D**-0.5
    pw = pointwise_ops(compile_pointwise)
    mm_dtype = _autocast_dtype(prompt_ids.device.type) or dtype
    n_qk = dims.num_heads + dims.num_kv_heads
    BP = B * P
    # One residual stream of token rows, the prompts' B * P then the M packed response positions:
    # norms, projections, RoPE and MLP run once per layer on both; only attention tells them apart.
    x = torch.cat((xp, xr)) if M else xp  # [R, h]
    cos, sin = (torch.cat((cos_p, cos_r)), torch.cat((sin_p, sin_r))) if M else (cos_p, sin_p)
    dx = None  # the MLP output of the previous layer, added to the residual with the next norm

    def layer(i: int, x: Tensor, dx: Tensor | None) -> tuple[Tensor, Tensor]:
        ln1 = w[f"{i}.ln1"]
        x, h = (x, pw["norm"](x, ln1, eps, mm_dtype)) if dx is None else pw["add_norm"](x, dx, ln1, eps, mm_dtype)
        qkv = pw["rope"](F.linear(h, w[f"{i}.wqkv"], w.get(f"{i}.bqkv")), cos, sin, n_qk, D, mm_dtype)  # [R, C]
        qkv_p, packed = qkv.split((BP, M)) if M else (qkv, None)
        qp, kp, vp = split_heads(qkv_p.view(B, P, -1), dims)
        probs_p = pw["softmax"](torch.matmul(qp, kp.transpose(-1, -2)), scale, bias_pp, vp.dtype)  # [B, H, P, P]
        att = torch.matmul(probs_p, vp).transpose(1, 2).reshape(BP, H * D)
        if M:
            # Head-major [B, heads, K, T1, D]: the K samples of a prompt are one batch of a matmul
            # against the prompt's keys, so the prompt's keys and values are never copied K times.
            heads = _ToHeadMajor.apply(packed, bi, ki, ti, (B, Htot, K, T1, D))
            qr, kr, vr = heads.split((H, Hkv, Hkv), dim=1)
            if Hkv != H:  # grouped-query attention
                kr, vr = kr.repeat_interleave(H // Hkv, dim=1), vr.repeat_interleave(H // Hkv, dim=1)
            s_prompt = torch.matmul(qr.reshape(B, H, K * T1, D), kp.transpose(-1, -2)).view(B, H, K, T1, P)
            s_self = torch.matmul(qr, kr.transpose(-1, -2))  # [B, H, K, T1, T1]
            probs = pw["softmax2"](s_prompt, s_self, scale, bias_r, vr.dtype)
            p_prompt, p_self = probs.split((P, T1), dim=-1)
            att_r = (torch.matmul(p_prompt.reshape(B, H, K * T1, P), vp).view(B, H, K, T1, D)
                     + torch.matmul(p_self, vr))
            att = torch.cat((att, _FromHeadMajor.apply(att_r, bi, ki, ti)))
        return attn_out_and_mlp(pw, x, att, w, i, eps, mm_dtype)

    for i in range(dims.num_layers):
        if checkpointing:
            from torch.utils.checkpoint import checkpoint

            x, dx = checkpoint(layer, i, x, dx, use_reentrant=False)
        else:
            x, dx = layer(i, x, dx)
    hidden = pw["add_norm"](x, dx, w["norm"], eps, dtype)[1]  # [R, h]
    hidden_p, hidden_r = hidden.split((BP, M)) if M else (hidden, None)
    first = hidden_p.view(B, P, -1)[:, -1]  # [B, h]: predicts response token 0
    first = first[:, None, None].expand(B, K, 1, first.shape[-1])
    if T1 == 0:
        return first
    rest = first.new_zeros(N * T1, first.shape[-1])
    if M:
        rest = rest.index_copy(0, idx, hidden_r)
    return torch.cat((first, rest.view(B, K, T1, -1)), dim=2)
