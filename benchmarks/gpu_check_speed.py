"""The throughput measurements of the GPU check (``benchmarks/gpu_check.py``).

- :func:`measure_ceilings`: the chip's two limits, measured in the same run: a bf16 matmul
  (random data, median of 10 after 3 warm-ups) and a device-to-device copy (bytes read plus
  bytes written over the time).
- :func:`rollout_throughput`: an engine's tokens/s at the paper's GSM8K shapes, sized to a time
  budget by a probe, and the fraction of the copy bandwidth its decoding steps achieve counting
  the bytes they must read (:func:`decode_bytes`).
- :func:`train_throughput`: one optimizer step of the real training path (``response_logprobs``
  with chunked log-probs, ``policy_loss``, clipping, fused AdamW) under bf16 autocast: response
  tokens/s, peak memory, and model FLOP/s (:func:`train_flops`) over the measured matmul rate.

The models are built from Qwen2.5-1.5B's sizes (:data:`QWEN25_1P5B`) and randomly initialised:
nothing is downloaded. A random model almost never samples EOS, so its responses run to
``max_new_tokens`` (the worst case for the engines); prompts are random ids of GSM8K-like lengths.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

# Qwen2.5-1.5B's sizes (its config.json), built with random weights.
QWEN25_1P5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                   tie_word_embeddings=True, max_position_embeddings=32768, bos_token_id=151643,
                   eos_token_id=151645)
SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                   max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Shapes:
    """The throughput shapes: the paper's GSM8K setting (``configs/gsm8k_qwen.yaml``)."""

    prompts: int = 96
    samples: int = 8
    max_new_tokens: int = 1024
    prompt_lens: tuple[int, int] = (96, 192)  # rollout prompts: lengths drawn in this range
    train_prompt_len: int = 160  # training: every prompt this long (exact FLOP counts)
    micro_batch: int = 1  # prompts per forward/backward (one prompt = its K sequences)
    probe_tokens: int = 17  # the rollout probe's max_new_tokens


SMOKE_SHAPES = Shapes(prompts=4, samples=2, max_new_tokens=8, prompt_lens=(5, 9), train_prompt_len=6, probe_tokens=3)


class OutOfTime(Exception):
    """A section's time budget ran out (raised by the GPU check's alarm); a measurement that
    catches it keeps the figures of its last finished run."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall time, the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median time of ``fn`` over ``repeats`` runs after ``warmup`` ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(timed(fn, device)[1])
    return statistics.median(times)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_ceilings(device: torch.device, n: int = 8192, copy_bytes: int = 2 * 2**30) -> dict[str, float]:
    """``matmul_flops``: 2 n^3 / the median time of a bf16 ``[n, n] x [n, n]`` product;
    ``bandwidth``: 2 ``copy_bytes`` / the median time of copying that many bytes (fp32)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    flops = 2 * n**3 / median_seconds(lambda: torch.mm(a, b, out=c), device)
    a = b = c = None  # free the matmul operands before the copy buffers
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * copy_bytes / median_seconds(lambda: dst.copy_(src), device)
    return {"matmul_flops": flops, "bandwidth": bandwidth, "n": n, "copy_bytes": copy_bytes}


def build_model(kind: str, shape: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """``qwen2``: a randomly initialised ``Qwen2ForCausalLM`` of ``shape``; ``llama``: a Llama of
    the same sizes (with q/k/v/o biases where Qwen2 has q/k/v ones), for the Llama-only fast
    engine and fused forward. fp32 (master weights), built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if kind == "qwen2":
        cfg, cls = Qwen2Config(**shape, use_sliding_window=False), Qwen2ForCausalLM
    elif kind == "llama":
        cfg, cls = LlamaConfig(**shape, attention_bias=True), LlamaForCausalLM
    else:
        raise ValueError(f"kind={kind!r} is not valid; accepted: 'qwen2', 'llama'")
    torch.manual_seed(0)
    with torch.device(device):
        return cls(cfg)


def random_prompts(vocab: int, lengths: Tensor, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Left-padded random prompts of ``lengths`` [B]: ids [B, P] (0 on padding), mask [B, P] bool."""
    P = int(lengths.max())
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 300 if vocab > 1000 else vocab, (len(lengths), P), generator=g)
    mask = torch.arange(P)[None] >= (P - lengths)[:, None]
    return ids.masked_fill(~mask, 0).to(device), mask.to(device)


def decode_bytes(weight_bytes: float, kv_slot_bytes: float, prompt_len: int, lengths: Tensor) -> float:
    """Bytes the decoding steps must read: step t (1..T-1) reads every weight once and, for each
    sequence still running (response length > t), the ``prompt_len + t`` KV slots written so far
    (``kv_slot_bytes`` per slot: keys and values of every layer)."""
    T = int(lengths.max())
    t = torch.arange(1, T, dtype=torch.float64)
    live = (lengths.flatten()[None].double() > t[:, None]).sum(1)
    return float((T - 1) * weight_bytes + (live * (prompt_len + t)).sum() * kv_slot_bytes)


def _context_work(engine: str, P: int, T: int) -> float:
    """The KV slots the decoding steps of a ``T``-token rollout read, summed over steps: HF's
    cache holds P + t slots at step t (1..T-1); the fast engine attends over all P + T slots of
    its preallocated cache at every step."""
    if engine == "hf":
        return (T - 1) * P + T * (T - 1) / 2
    return (T - 1) * (P + T)


def decode_model(engine: str, P: int, runs: list[tuple[int, float]]) -> tuple[float, float]:
    """``(a, b)`` of decode time(T) = a (T - 1) + b :func:`_context_work`, from runs
    ``(T, decode seconds)``: the exact fit of the last two runs when both coefficients come out
    >= 0; otherwise (one run, or a fit that noise bent negative) all of the last run's time on
    ``b``, the pessimistic extrapolation (every step's cost grows with the context)."""
    T1, y1 = runs[-1]
    pessimistic = (0.0, y1 / max(_context_work(engine, P, T1), 1e-9))
    if len(runs) == 1:
        return pessimistic
    T0, y0 = runs[-2]
    n0, n1, c0, c1 = T0 - 1, T1 - 1, _context_work(engine, P, T0), _context_work(engine, P, T1)
    det = n0 * c1 - n1 * c0
    if not det:
        return pessimistic
    a, b = (y0 * c1 - y1 * c0) / det, (n0 * y1 - n1 * y0) / det
    return (a, b) if a >= 0 and b >= 0 else pessimistic


def rollout_tokens(model: tuple[float, float], engine: str, P: int, budget: float, full: int, least: int) -> int:
    """The largest ``max_new_tokens <= full`` (in steps of full / 64, at least ``least``) whose
    decode time under ``model`` (:func:`decode_model`) fits ``budget`` seconds."""
    a, b = model
    T = full
    while T > least and a * (T - 1) + b * _context_work(engine, P, T) > budget:
        T = max(least, T - max(1, full // 64))
    return T


def rollout_throughput(policy: torch.nn.Module, engine_name: str, shapes: Shapes, device: torch.device,
                       time_left: Callable[[], float], bandwidth: float | None) -> dict[str, float]:
    """Rollouts of ``shapes.prompts`` x ``shapes.samples`` with a bf16 ``engine_name`` engine built
    by ``reclight.engines.build_engine``, sized to ``time_left()``: a warm-up, a prefill-only
    rollout (1 token), a probe of ``probe_tokens``, a run sized pessimistically from the probe
    to 30% of the time left, then (when the full ``max_new_tokens`` was not reached) a run sized
    from the two to 75% of what is left. The figures are the last finished run's (an
    :class:`OutOfTime` during the last run keeps the previous one's): ``tokens_per_s`` over the
    whole rollout and ``bandwidth_frac``, :func:`decode_bytes` over (rollout - prefill) time over
    ``bandwidth``."""
    from reclight.engines import build_engine
    from reclight.engines.base import SamplingConfig
    from reclight.engines.config import EngineConfig

    s, cfg = shapes, policy.config
    tok = SimpleNamespace(eos_token_id=cfg.eos_token_id, pad_token_id=0)
    eng = build_engine(EngineConfig(name=engine_name, dtype="bfloat16"), policy, tok,
                       SamplingConfig(num_samples=s.samples, max_new_tokens=2, temperature=1.0))
    lengths = torch.randint(s.prompt_lens[0], s.prompt_lens[1] + 1, (s.prompts,),
                            generator=torch.Generator().manual_seed(1))
    ids, mask = random_prompts(cfg.vocab_size, lengths, device)
    P = ids.shape[1]
    weight_bytes = sum(p.numel() for p in policy.parameters()) * 2  # the bf16 copy; a tied matrix once
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache_dtype = getattr(eng, "cache_dtype", torch.bfloat16)  # the fast engine's; HF's cache is the weights' bf16
    kv_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * D * cache_dtype.itemsize

    def rollout(T: int) -> tuple[Any, float]:
        eng.sampling = SamplingConfig(num_samples=s.samples, max_new_tokens=T, temperature=1.0)
        return timed(lambda: eng.generate(ids, mask, seed=T), device)

    rollout(2)  # warm-up at the full batch: kernels, handles, the engine's cache buffers
    _, prefill = rollout(1)
    runs: list[tuple[int, float]] = []  # (max_new_tokens, decode seconds)
    result: dict[str, float] = {}
    note = ""
    for fraction in (None, 0.3, 0.75):  # the probe, a pessimistically sized run, a run sized from both
        if fraction is None:
            T = s.probe_tokens
        else:
            last = runs[-1][0]
            if last >= s.max_new_tokens:
                break
            T = rollout_tokens(decode_model(engine_name, P, runs), engine_name, P, fraction * time_left() - prefill,
                               s.max_new_tokens, s.probe_tokens)
            if T <= 1.2 * last:
                break  # would add little
        try:
            gen, seconds = rollout(T)
        except OutOfTime:
            if not result:
                raise
            note = f"a {T}-token run overran the budget; figures of the {result['max_new_tokens']}-token run"
            break
        resp_len = gen.response_mask.sum(-1).cpu()  # [B, K]
        runs.append((T, max(seconds - prefill, 1e-6)))
        nbytes, decode_s = decode_bytes(weight_bytes, kv_slot, P, resp_len), seconds - prefill
        result = dict(prompts=s.prompts, samples=s.samples, max_new_tokens=T, full_max_new_tokens=s.max_new_tokens,
                      prompt_len=P, tokens=int(resp_len.sum()), seconds=seconds, prefill_seconds=prefill,
                      tokens_per_s=int(resp_len.sum()) / seconds, decode_bytes=nbytes,
                      decode_bytes_per_s=nbytes / decode_s if decode_s > 0 else math.nan,
                      ended_early_frac=float((resp_len < gen.response_ids.shape[-1]).float().mean()))
        del gen
    a, b = decode_model(engine_name, P, runs)
    T = s.max_new_tokens
    result.update(runs=runs, note=note,
                  full_rollout_estimate_s=prefill + a * (T - 1) + b * _context_work(engine_name, P, T))
    result["bandwidth_frac"] = result["decode_bytes_per_s"] / bandwidth if bandwidth else math.nan
    eng = None  # the engine's weights and KV cache, freed before the next section
    free_memory()
    return result


def train_flops(cfg: Any, n_seqs: int, prompt_len: int, resp_len: int) -> float:
    """Model FLOPs of one forward + backward (3x the forward) over ``n_seqs`` sequences of
    ``prompt_len + resp_len`` tokens: the decoder's matmuls at every position, attention's two
    products causal (position j attends j + 1 keys), the LM head at the response tokens only."""
    L, h, V, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or h // H
    per_token = 2 * L * (h * (H + 2 * Hkv) * D + H * D * h + 3 * h * I)
    S = prompt_len + resp_len
    attention = 2 * 2 * L * H * D * S * (S + 1) / 2
    return 3.0 * n_seqs * (S * per_token + attention + 2 * h * V * resp_len)


def train_throughput(policy: torch.nn.Module, impl: str, shapes: Shapes, device: torch.device,
                     time_left: Callable[[], float], matmul_flops: float | None) -> dict[str, float]:
    """One optimizer step as the trainer takes it under ``bf16-mixed``: micro-batches of
    ``shapes.micro_batch`` prompts through ``response_logprobs(impl=impl)`` (chunked log-probs)
    and ``policy_loss`` (REC-OneSide-NoIS, full-batch token counts), one backward each, gradient
    clipping to 1.0, fused AdamW. Responses are ``max_new_tokens`` long and all real (halved, up
    to 3 times, while the warm-up micro-batch runs out of memory). After a warm-up micro-batch and
    a timed one, the step takes as many prompts (<= ``shapes.prompts``) as should fit 75% of
    ``time_left()``; a step that overruns (:class:`OutOfTime`) or runs out of memory leaves the
    timed micro-batch's figures, with a ``note``. Returns ``tokens_per_s`` (response tokens), ``flops_frac``
    (:func:`train_flops` per second over ``matmul_flops``) and ``peak_gib`` (CUDA)."""
    from reclight.algorithms import get_algorithm
    from reclight.losses import policy_loss
    from reclight.models.forward import response_logprobs

    s, cfg = shapes, policy.config
    policy.train()
    B, K, P, T, mb = s.prompts, s.samples, s.train_prompt_len, s.max_new_tokens, s.micro_batch
    g = torch.Generator().manual_seed(2)
    prompt_ids = torch.randint(3, cfg.vocab_size, (B, P), generator=g).to(device)
    prompt_mask = torch.ones(B, P, dtype=torch.bool, device=device)
    resp = torch.randint(3, cfg.vocab_size, (B, K, T), generator=g).to(device)
    rmask = torch.ones(B, K, T, dtype=torch.bool, device=device)
    logp_behav = torch.full((B, K, T), -math.log(cfg.vocab_size), device=device)  # a random model's, about
    adv = torch.randn(B, K, generator=g).to(device)
    algo = get_algorithm("rec_oneside_nois")
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=device.type in ("cpu", "cuda"))

    def counts(n: int) -> dict[str, Tensor]:
        return {"num_tokens": rmask[:n].sum().float(), "num_seqs": rmask[:n].any(-1).sum().float()}

    def backward(rows: slice, cnt: dict[str, Tensor]) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):  # what precision bf16-mixed does
            logp, _ = response_logprobs(policy, prompt_ids[rows], prompt_mask[rows], resp[rows], rmask[rows],
                                        return_entropy=True, impl=impl)
            loss, _ = policy_loss(logp, logp_behav[rows], adv[rows], rmask[rows], algo, **cnt)
        loss.backward()

    def step(n: int) -> None:
        opt.zero_grad(set_to_none=True)
        cnt = counts(n)
        for start in range(0, n, mb):
            backward(slice(start, min(start + mb, n)), cnt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    note = ""
    for attempt in range(4):  # out of memory at this response length: halve it (the largest part that fits)
        try:
            backward(slice(0, mb), counts(mb))  # warm-up
            break
        except torch.OutOfMemoryError:
            if attempt == 3:
                raise
            policy.zero_grad(set_to_none=True)
            free_memory()
            T //= 2
            resp, rmask, logp_behav = (t[..., :T].contiguous() for t in (resp, rmask, logp_behav))
            note = f"out of memory at {s.max_new_tokens} response tokens per micro-batch; measured at {T}"
    _, t_mb = timed(lambda: backward(slice(0, mb), counts(mb)), device)
    opt.zero_grad(set_to_none=True)
    n = max(mb, min(B, int((0.75 * time_left() - 1.0) / t_mb) * mb))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        _, seconds = timed(lambda: step(n), device)
    except (OutOfTime, torch.OutOfMemoryError) as e:  # keep the timed micro-batch's figures
        what = "overran the budget" if isinstance(e, OutOfTime) else "ran out of memory"
        note = (note + "; " if note else "") + f"the {n}-prompt step {what}: figures of one timed micro-batch " \
            "(forward + backward only)"
        n, seconds = mb, t_mb
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    flops = train_flops(cfg, n * K, P, T)
    out = dict(prompts=n, full_prompts=B, samples=K, prompt_len=P, resp_len=T, micro_batch_prompts=mb,
               seconds=seconds, micro_batch_seconds=t_mb, tokens_per_s=n * K * T / seconds, model_flops=flops,
               flops_per_s=flops / seconds, peak_gib=peak, full_step_estimate_s=seconds * B / n, note=note)
    out["flops_frac"] = out["flops_per_s"] / matmul_flops if matmul_flops else math.nan
    opt = None  # the AdamW state
    policy.zero_grad(set_to_none=True)
    free_memory()
    return out
