"""The exactness checks of the GPU check (``benchmarks/gpu_check.py``), on any device.

Each function runs one of the CPU suite's exactness comparisons on ``device`` with fresh seeded
inputs and returns its figures (errors, tolerance ratios); the caller judges them: the GPU check
turns them into table rows, ``tests/gpu/test_gpu_exactness.py`` asserts them on CUDA. Tolerances
(stated where each figure is returned) are those of the CPU tests: ``tests/kernels/
test_logprobs.py``, ``tests/kernels/test_fused_forward.py``, ``tests/rollout/test_engine_fast.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

PROMPTS = ["1+2=", "123+45=", "9=", "77+8="]  # different lengths -> left padding
LM_HEAD_NAMES = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")


def tol_ratio(got: Tensor, ref: Tensor, rtol: float, atol: float) -> float:
    """max |got - ref| / (atol + rtol |ref|): <= 1 is ``assert_close(got, ref, rtol, atol)``
    passing; inf when ``got`` has a NaN or inf."""
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return math.inf
    return float(((got - ref).abs() / (atol + rtol * ref.abs())).max()) if got.numel() else 0.0


def rel_err(got: Tensor, ref: Tensor) -> float:
    """||got - ref|| / ||ref|| (inf when ``got`` is not finite)."""
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


# -- chunked log-probs ----------------------------------------------------------------------------
def _lm_head_inputs(device: torch.device, n: int, h: int, v: int, seed: int) -> list[Tensor]:
    """hidden [n, h], weight [v, h], bias [v], targets [n], dL/dlogp [n], dL/dent [n], scaled like
    a real LM head (logits of order 1-5)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen) * 2.0
    weight = torch.randn(v, h, generator=gen) * h**-0.5
    bias = torch.randn(v, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    g_logp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    return [t.to(device) for t in (hidden, weight, bias, targets, g_logp, g_ent)]


def _lm_head_values_and_grads(fn: Callable, hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor,
                              g_logp: Tensor, g_ent: Tensor, **kw: Any) -> list[Tensor]:
    """logp, entropy and dL/d(hidden, weight, bias) for L = sum_i g_i logp_i + e_i ent_i."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, ent = fn(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True, **kw)
    loss = (logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()
    return [logp.detach(), ent.detach(), *torch.autograd.grad(loss, leaves)]


def chunked_logprobs_fp32(device: torch.device, n: int = 1500, h: int = 896, v: int = 151936, chunk: int = 512,
                          seed: int = 0) -> dict[str, dict[str, float]]:
    """fp32 chunked log-probs (temperature 0.7, ``n`` not a multiple of ``chunk``; by default
    Qwen2.5-0.5B's LM head) against the fp32 naive path and against float64 arithmetic on the
    same fp32 inputs: the tolerance ratio (rtol = atol = 1e-5; pass <= 1) of each of
    :data:`LM_HEAD_NAMES`, under ``chunked_vs_naive``, ``chunked_vs_float64`` and
    ``naive_vs_float64``. At a real vocabulary the fp32 naive path is the less exact of the two
    (measured on a CPU at V = 151,936: ratios up to ~3 against float64 where the chunked path
    stays under 0.6), so there the chunked path is judged against float64; the CPU suite's
    shapes (V = 211) judge it against the naive path."""
    from reclight.kernels.logprobs import token_logprobs, token_logprobs_naive

    inputs = _lm_head_inputs(device, n, h, v, seed)
    got = _lm_head_values_and_grads(token_logprobs, *inputs, chunk_size=chunk, temperature=0.7)
    naive = _lm_head_values_and_grads(token_logprobs_naive, *inputs, temperature=0.7)
    hidden, weight, bias, targets, g_logp, g_ent = inputs
    ref = _lm_head_values_and_grads(token_logprobs_naive, hidden.double(), weight.double(), bias.double(), targets,
                                    g_logp.double(), g_ent.double(), temperature=0.7)

    def ratios(a: list[Tensor], b: list[Tensor]) -> dict[str, float]:
        return {name: tol_ratio(x, y, 1e-5, 1e-5) for name, x, y in zip(LM_HEAD_NAMES, a, b)}

    return {"chunked_vs_naive": ratios(got, naive), "chunked_vs_float64": ratios(got, ref),
            "naive_vs_float64": ratios(naive, ref)}


def chunked_logprobs_bf16(device: torch.device, n: int = 1500, h: int = 896, v: int = 151936, chunk: int = 512,
                          seed: int = 1) -> dict[str, float]:
    """Chunked log-probs of bf16 hidden/weight/bias against float64 arithmetic on the SAME bf16
    values, by relative error: logp and entropy are computed in fp32 (limit 1e-5; expect ~1e-7),
    the gradients come back in bf16 (limit 1e-2; one rounding, expect ~2e-3).
    ``grad_dtype_bf16`` is 1.0 when all three gradients are bf16."""
    from reclight.kernels.logprobs import token_logprobs, token_logprobs_naive

    hidden, weight, bias, targets, g_logp, g_ent = _lm_head_inputs(device, n, h, v, seed)
    hb, wb, bb = (t.bfloat16() for t in (hidden, weight, bias))
    got = _lm_head_values_and_grads(token_logprobs, hb, wb, bb, targets, g_logp, g_ent, chunk_size=chunk)
    ref = _lm_head_values_and_grads(token_logprobs_naive, hb.double(), wb.double(), bb.double(), targets,
                                    g_logp.double(), g_ent.double())
    out = {name: rel_err(a, b) for name, a, b in zip(LM_HEAD_NAMES, got, ref)}
    out["grad_dtype_bf16"] = float(all(g.dtype == torch.bfloat16 for g in got[2:]))
    return out


# -- the training forward -------------------------------------------------------------------------
def small_llama(device: torch.device, **overrides: Any) -> tuple[torch.nn.Module, Any]:
    """A seeded 2-layer Llama (hidden 32 unless overridden) on the character tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from reclight.models.tiny import build_tokenizer

    tok = build_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
              tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kw)).to(device), tok


def prompt_batch(tok: Any, device: torch.device, K: int = 3, T: int = 6, seed: int = 0) -> tuple[Tensor, ...]:
    """Left-padded :data:`PROMPTS` and right-padded random responses with prefix masks (one
    full-length and one single-token response): ids [B, P], mask [B, P], resp [B, K, T], rmask."""
    from reclight.models.tokens import encode_prompts

    ids, mask = encode_prompts(tok, PROMPTS)
    g = torch.Generator().manual_seed(seed)
    B = ids.shape[0]
    resp = torch.randint(3, len(tok), (B, K, T), generator=g)
    lengths = torch.randint(1, T + 1, (B, K), generator=g)
    lengths[0, 0], lengths[1, 1] = T, 1
    rmask = torch.arange(T) < lengths[..., None]
    resp = resp.masked_fill(~rmask, tok.pad_token_id)
    return tuple(t.to(device) for t in (ids, mask, resp, rmask))


def forward_logp_and_grads(model: torch.nn.Module, batch: tuple[Tensor, ...], impl: str, compile_pointwise: bool,
                           temperature: float) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``response_logprobs``' logp and entropy, and every parameter's gradient of
    sum a * logp + 0.3 * entropy (random a: tokens weighted differently, so mix-ups show)."""
    from reclight.models.forward import response_logprobs

    model.zero_grad(set_to_none=True)
    logp, ent = response_logprobs(model, *batch, temperature=temperature, return_entropy=True, impl=impl,
                                  compile_pointwise=compile_pointwise)
    a = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1)).to(logp.device)
    (a * logp).sum().add((0.3 * ent).sum()).backward()
    return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def fused_forward_fp32(device: torch.device, compile_pointwise: bool = False, **overrides: Any) -> dict[str, float]:
    """Fused (or compiled fused) vs HF's forward in fp32, GQA + biases unless ``overrides``:
    ``logp_max_abs``, ``entropy_max_abs`` (limit 1e-5 each), ``grad_tol_ratio`` (the worst
    parameter's, rtol 1e-4 / atol 1e-5; pass <= 1) and ``grad_min_max_abs`` (the smallest
    max |gradient| over parameters: > 0 means every parameter's gradient was compared)."""
    overrides = overrides or dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    model, tok = small_llama(device, **overrides)
    batch = prompt_batch(tok, device)
    hf = forward_logp_and_grads(model, batch, "hf", False, 0.8)
    fused = forward_logp_and_grads(model, batch, "fused", compile_pointwise, 0.8)
    return {"logp_max_abs": float((fused[0] - hf[0]).abs().max()),
            "entropy_max_abs": float((fused[1] - hf[1]).abs().max()),
            "grad_tol_ratio": max(tol_ratio(fused[2][n], g, 1e-4, 1e-5) for n, g in hf[2].items()),
            "grad_min_max_abs": min(float(g.abs().max()) for g in hf[2].values())}


def fused_forward_bf16(device: torch.device) -> dict[str, float]:
    """Under bf16 autocast, eager HF attention, hidden 64, K = 4, T = 12: ``logp_max_abs``
    (|logp_fused - logp_hf|, limit 3e-2) and the gradients' relative error against the fp32
    gradients, ``grad_rel_err_hf`` (visible and small: in (1e-4, 0.05)) and
    ``grad_rel_err_fused`` (at most 1.5x HF's)."""
    model, tok = small_llama(device, hidden_size=64, intermediate_size=96, num_attention_heads=4)
    model.set_attn_implementation("eager")
    batch = prompt_batch(tok, device, K=4, T=12)
    ref = forward_logp_and_grads(model, batch, "hf", False, 1.0)[2]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        hf = forward_logp_and_grads(model, batch, "hf", False, 1.0)
        fused = forward_logp_and_grads(model, batch, "fused", False, 1.0)

    def grads_rel_err(g: dict[str, Tensor]) -> float:
        num = sum(float((g[n].double() - ref[n].double()).norm()) ** 2 for n in ref)
        return (num / sum(float(r.double().norm()) ** 2 for r in ref.values())) ** 0.5

    return {"logp_max_abs": float((fused[0] - hf[0]).abs().max()), "grad_rel_err_hf": grads_rel_err(hf[2]),
            "grad_rel_err_fused": grads_rel_err(fused[2])}


# -- the engines ----------------------------------------------------------------------------------
def engine_logp_error(device: torch.device, engine: str = "fast", compile_decode: bool = False,
                      dtype: str | None = None) -> dict[str, float]:
    """An engine's ``logp_behav`` vs the trainer's fp32 logp of the same tokens (temperature 0.7,
    GQA + biases): ``max_abs``, ``mean_abs`` over the response tokens of two rollouts with
    different prompt lengths, and their count ``tokens``. 30 of the 104 token ids count as EOS,
    so responses end at many steps and the fast engine compacts its batch several times. Limits
    in fp32: fast 1e-5, HF 1e-4 (its prefill runs HF's attention kernel on B * K rows)."""
    from reclight.engines import build_engine
    from reclight.engines.base import SamplingConfig
    from reclight.engines.config import EngineConfig, FastEngineOptions
    from reclight.models.forward import response_logprobs
    from reclight.models.tokens import encode_prompts

    model, tok = small_llama(device, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    many_eos = SimpleNamespace(eos_token_id=list(range(10, 40)), pad_token_id=tok.pad_token_id)
    options = {"fast": FastEngineOptions(compile_decode=compile_decode)} if engine == "fast" else {}
    eng = build_engine(EngineConfig(name=engine, dtype=dtype, **options), model, many_eos,
                       SamplingConfig(num_samples=4, max_new_tokens=8, temperature=0.7))
    diffs = []
    for seed, prompts in ((0, PROMPTS), (1, ["5=", "12+3="])):
        ids, mask = (t.to(device) for t in encode_prompts(tok, prompts))
        gen = eng.generate(ids, mask, seed=seed)
        with torch.no_grad():
            logp, _ = response_logprobs(model, ids, mask, gen.response_ids.to(device), gen.response_mask.to(device),
                                        temperature=0.7)
        diffs.append((logp.cpu() - gen.logp_behav.cpu())[gen.response_mask.cpu()].abs())
    d = torch.cat(diffs)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "tokens": float(d.numel())}
