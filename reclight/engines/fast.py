"""A lean sampling engine for Llama-architecture models (implements ``RolloutEngine``).

For the small models reclight trains on a CPU, Hugging Face ``generate`` spends most of each
decoding step in Python (modules, mask builders, cache objects, logits processors), not in
matrix products. This engine keeps the same weights in a few fused tensors and runs the decoder
as a short sequence of tensor ops on a preallocated KV cache. It samples from exactly the same
distribution as ``HFGenerateEngine`` (tested: its ``logp_behav`` equals the trainer's ``logp``
of the same tokens).

Departures from ``HFGenerateEngine`` / HF ``generate``, listed up front:

- Only the Llama block (RMSNorm, default RoPE, SwiGLU MLP, optional grouped-query attention,
  optional attention/MLP biases) with ``top_p == 1`` and no stop strings; anything else raises
  at construction, naming the field (use ``engine: hf`` then).
- Each prompt is prefilled ONCE and its KV cache shared by its K samples (HF prefills all
  B * K copies).
- Sampling is by inverse CDF (one uniform per row located in the running sum of
  ``softmax(logits / T)``, an exact sample up to fp32 rounding of that sum) from a
  ``torch.Generator`` seeded by ``seed``: reproducible, but not the same samples as HF.
- q/k/v and gate/up projections are fused (one matmul each); the weights may be held in bf16
  (``dtype``) while the trainer keeps fp32 master weights. The logits and the recorded
  ``logp_behav`` are always computed in fp32.
- Decoding stops when every sequence has emitted EOS (like HF); before that, finished sequences
  are dropped from the batch (cache rows gathered) once at most ``compact_below`` (3/4) of the
  batch is still running, so short responses stop costing compute.
- With ``micro_batch_size`` a rollout's prompts are decoded in pieces of that many, each from
  its own generator (:func:`piece_seed`), optionally side by side on ``threads`` threads
  (:mod:`reclight.kernels.threads`); the samples depend on the pieces, never on the threads.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reclight.checks import invalid
from reclight.engines.base import Generation, SamplingConfig
from reclight.engines.stop import check_stop
from reclight.kernels.llama import (
    LlamaDims,
    additive_mask,
    attn_out_and_mlp,
    fused_sources,
    llama_problems,
    pointwise_ops,
    repeat_kv,
    rope_tables,
)
from reclight.kernels.masks import position_ids_from_mask, prefill_visible, response_mask_from_ids
from reclight.kernels.threads import MicroBatchThreads, usable_threads
from reclight.models.fsdp import full_weights
from reclight.models.loading import resolve_dtype
from reclight.models.tokens import eos_ids, pad_id


def _check_supported(config: Any, sampling: SamplingConfig, stop_strings: tuple[str, ...]) -> None:
    problems = llama_problems(config)
    if sampling.top_p != 1.0:
        problems.append(f"sampling.top_p={sampling.top_p!r} (accepted: 1.0)")
    if stop_strings:
        problems.append(f"stop_strings={stop_strings!r} (accepted: none)")
    if problems:
        raise ValueError("engine='fast' does not support " + "; ".join(problems) + "; use engine='hf'")


def piece_seed(seed: int, index: int) -> int:
    """The generator seed of piece ``index`` of a rollout seeded ``seed``: 63 bits of
    SHA-256 of the pair, so pieces and rollouts draw unrelated streams."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little") >> 1


def min_cache_slots(head_dim: int) -> int:
    """The fewest KV-cache slots a CPU decoding step should attend over. A step's two attention
    products per row and head, ``q [1, D] @ k^T [D, S]`` and ``p [1, S] @ v [S, D]``, are
    ``S * D`` multiply-adds each; below 400 torch's CPU ``bmm`` takes a plain element loop
    instead of the BLAS (ATen, LinearAlgebra.cpp, ``bmm_out_or_baddbmm_``): at the main job's
    decoding shapes (1024 rows x heads, S = 11, D = 32) the pair took 908 us against 168 us at
    S = 13 on a 2-core AVX2 CPU, one thread (``benchmarks/decode_attention.py``). Slots past the
    rollout's are never written and stay masked (-inf): probability 0, so they change nothing but
    float rounding."""
    return -(-400 // head_dim)


def inverse_cdf_sample(logp: Tensor, u: Tensor) -> Tensor:  # logp [n, V] fp32, u [n, 1] in [0, 1) -> [n] long
    """The token of each row whose running sum of ``softmax(logp)`` first EXCEEDS ``u * total``
    (``u`` is scaled in place). Tokens of probability 0 are never drawn; exact up to the fp32
    rounding of the running sum."""
    cdf = logp.exp().cumsum_(-1)
    return torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True).squeeze(1).clamp_(max=logp.shape[-1] - 1)


class FastLlamaEngine:
    """Sampling engine with its own fused copy of a Llama policy's weights.

    Args:
        policy: the trainer's ``LlamaForCausalLM`` (weights are copied, not shared).
        tokenizer: its tokenizer (left padding; ``eos_token_id`` and ``pad_token_id`` used).
        sampling: K, temperature, max_new_tokens (``top_p`` must be 1).
        dtype: the engine copy's dtype (``None`` keeps the policy's).
        stop_strings: must be empty (see the module docstring).
        compile_decode: run each decoding step (the decoder on one token per row and the
            log-softmax) through ``torch.compile`` with dynamic shapes: one C++ kernel per fused
            element-wise chain and no Python between the ops. ~22% faster rollouts on a 2-core
            CPU at the benchmark's shapes; the first rollout compiles (seconds to tens of seconds)
            and it needs a C++ compiler (CPU) or Triton (GPU). Same distribution: the recorded
            ``logp_behav`` is as close to the trainer's as the eager engine's (tested).
        greedy: take each row's most likely token instead of sampling (the greedy evaluation,
            :func:`reclight.trainer.evaluation.greedy_eval`; K must be 1).
    """

    def __init__(self, policy: torch.nn.Module, tokenizer: Any, sampling: SamplingConfig,
                 dtype: str | None = None, stop_strings: tuple[str, ...] = (), compile_decode: bool = False,
                 greedy: bool = False, micro_batch_size: int | None = None, threads: int = 1) -> None:
        cfg = policy.config
        _check_supported(cfg, sampling, tuple(stop_strings))
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.eos_ids, self.pad_id = eos_ids(tokenizer), pad_id(tokenizer)
        self.dims = dims = LlamaDims(cfg)
        self.num_layers, self.num_heads, self.num_kv_heads = dims.num_layers, dims.num_heads, dims.num_kv_heads
        self.head_dim, self.eps = dims.head_dim, dims.eps
        first = next(policy.parameters())
        self.dtype = resolve_dtype(dtype, "engine_dtype") if dtype is not None else first.dtype
        self.device = first.device
        self.inv_freq = dims.inv_freq(self.device)
        # The KV cache and attention stay fp32 even with bf16 weights: CPU bf16 batched matmuls
        # of attention's tiny shapes are several times slower than fp32 ones (measured).
        self.cache_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        from reclight.models.lora import AdapterForm

        self._lora = AdapterForm()  # LoRA: merged weights in, adapter-form state out
        self.weights = self._allocate(policy)
        self.compact_below = 0.75
        # a short rollout's cache padded out of torch's slow small-bmm path (CPU; min_cache_slots)
        self.min_slots = min_cache_slots(self.head_dim) if self.device.type == "cpu" else 0
        self.compile_decode = bool(compile_decode)
        self.greedy = bool(greedy)
        self._compiled_step: Any = None
        self._local = threading.local()  # each thread's flat KV buffers (see _cache)
        if threads > 1 and (self.device.type != "cpu" or compile_decode):
            raise invalid("model.engine.fast.threads", threads, "1, or > 1 only on the CPU with eager decoding "
                          f"(this engine runs on {self.device.type}, compile_decode={bool(compile_decode)})")
        self.micro_batch_size, self.threads = micro_batch_size, threads
        self._pieces = MicroBatchThreads(usable_threads(threads))
        self.version = 0
        self.scores_with_trainer = False
        self.update_weights(policy, 0)

    # -- weights ---------------------------------------------------------------------------------
    def _sources(self, policy: torch.nn.Module | Mapping[str, Tensor]) -> dict[str, list[Tensor]]:
        """Engine tensor name -> the policy tensors it is the concatenation of (along dim 0)."""
        return fused_sources(policy, self.num_layers)

    def _allocate(self, policy: torch.nn.Module) -> dict[str, Tensor]:
        return {name: torch.empty((sum(t.shape[0] for t in ts), *ts[0].shape[1:]), dtype=self.dtype, device=self.device)
                for name, ts in self._sources(policy).items()}

    @torch.no_grad()
    def update_weights(self, policy: torch.nn.Module | Mapping[str, Tensor], version: int) -> None:
        """Copy ``policy``'s weights (a module, or its full state dict with HF names) into the
        fused tensors, in place (casts dtype, allocates nothing)."""
        if isinstance(policy, torch.nn.Module):
            policy = self._lora.source(policy)  # LoRA: the merged weights, the adapter recorded
        if isinstance(policy, torch.nn.Module):
            policy = full_weights(policy)  # the module itself unless it is sharded
        for name, srcs in self._sources(policy).items():
            dst, row = self.weights[name], 0
            for src in srcs:
                dst[row : row + src.shape[0]].copy_(src)
                row += src.shape[0]
        self.version = int(version)

    def state_dict(self) -> dict[str, Any]:
        """The fused weights and their version; with LoRA the adapter they were merged from
        instead (re-merged with the frozen base on load: bitwise the same weights)."""
        return self._lora.state({"version": self.version, "weights": dict(self.weights)})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        merged = self._lora.restore(state)
        if merged is not None:
            self.update_weights(merged, int(state["version"]))
            return
        for name, t in state["weights"].items():
            self.weights[name].copy_(t)
        self.version = int(state["version"])

    # -- the decoder -----------------------------------------------------------------------------
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """Attention written out (q [N, H, L, D], k/v [N, Hkv, S, D], additive fp32 ``bias``
        [N, 1, L, S], -inf where masked): for one query token, CPU ``scaled_dot_product_attention``
        costs several times these ops. Softmax in fp32, as HF's eager attention, then cast to the
        cache's dtype: with a bf16 cache (GPU) the fp32 bias makes the scores fp32, and a matmul
        of fp32 probabilities with bf16 values is refused."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # grouped-query attention
        scores = torch.matmul(q.to(k.dtype), k.transpose(-1, -2)) * self.head_dim**-0.5 + bias
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v).to(q.dtype)

    def _forward(self, ids: Tensor, cos: Tensor, sin: Tensor, keys: list[Tensor], values: list[Tensor],
                 start: int, bias: Tensor) -> Tensor:
        """Run ``ids`` [N, L] with RoPE tables ``cos``/``sin`` [N, L, 1, D] (their positions), writing
        their keys/values into the cache [N, Hkv, S, D] at ``start``; every query attends over all
        S slots it is given (a decoding step gets views of the slots written so far: no copies)
        with the additive ``bias`` [N, 1, L, S] (-inf on padding, on not-yet-written slots and, in
        the prefill, on the future). Returns the last position's hidden [N, h]."""
        w, dims, pw, dt = self.weights, self.dims, pointwise_ops(), self.dtype
        N, L = ids.shape
        H, Hkv = dims.num_heads, dims.num_kv_heads
        x, dx = F.embedding(ids, w["embed"]), None  # [N, L, h]; dx: the last MLP output, not yet added
        end = start + L
        for i in range(self.num_layers):
            ln1 = w[f"{i}.ln1"]
            x, h = (x, pw["norm"](x, ln1, self.eps, dt)) if dx is None else pw["add_norm"](x, dx, ln1, self.eps, dt)
            # q|k|v token-major with RoPE applied to q and k in one op, then head-major views.
            qkv = pw["rope"](F.linear(h, w[f"{i}.wqkv"], w.get(f"{i}.bqkv")), cos, sin, H + Hkv, self.head_dim, dt)
            q, k, v = qkv.view(N, L, H + 2 * Hkv, self.head_dim).transpose(1, 2).split((H, Hkv, Hkv), dim=1)
            keys[i][:, :, start:end] = k
            values[i][:, :, start:end] = v
            att = self._attend(q, keys[i], values[i], bias)  # [N, H, L, D]
            x, dx = attn_out_and_mlp(pw, x, att.transpose(1, 2).flatten(2), w, i, self.eps, dt)
        return pw["add_norm"](x[:, -1], dx[:, -1], w["norm"], self.eps, dt)[1]

    def _logprobs(self, hidden: Tensor) -> Tensor:  # [N, h] -> [N, V] fp32
        logits = F.linear(hidden, self.weights["lm_head"]).float()
        return torch.log_softmax(logits / self.sampling.temperature, dim=-1)

    def _decode_step(self, tok: Tensor, cos: Tensor, sin: Tensor, keys: list[Tensor], values: list[Tensor],
                     start: int, bias: Tensor) -> Tensor:  # tok [n, 1] -> next-token log-probs [n, V]
        return self._logprobs(self._forward(tok, cos, sin, keys, values, start, bias))

    def _decoder(self) -> Any:
        if not self.compile_decode:
            return self._decode_step
        if self._compiled_step is None:
            # Automatic dynamic shapes: the first rollout compiles with its shapes; the batch size
            # (compaction), the cache slot and the prompt length become symbolic after they first
            # change (3 recompiles, seconds each), the sizes of the model stay static. Fully dynamic
            # (dynamic=True) compiles once but ran 12% faster than eager instead of 23%.
            self._compiled_step = torch.compile(self._decode_step, dynamic=None)
        return self._compiled_step

    def _cache(self, shape: tuple[int, ...]) -> tuple[list[Tensor], list[Tensor]]:
        """The decoding KV cache: contiguous views of flat buffers kept between rollouts and grown
        to the largest shape seen (a fresh multi-MB allocation per rollout costs page faults and
        a zero fill; the prompt length, hence the shape, changes from batch to batch). Stale
        slots are harmless: they hold finite values from an earlier rollout and are masked (-inf)
        until written."""
        numel = math.prod(shape)
        kv = getattr(self._local, "kv", None)  # per thread: pieces decoding side by side own their caches
        if kv is None or kv[0][0].numel() < numel:
            # Zeros, not empty: a masked slot gets probability 0, and 0 * garbage could be NaN.
            kv = self._local.kv = tuple([torch.zeros(numel, dtype=self.cache_dtype, device=self.device)
                                         for _ in range(self.num_layers)] for _ in range(2))
        return tuple([b[:numel].view(shape) for b in bufs] for bufs in kv)  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate(self, prompt_ids: Tensor, prompt_mask: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        s = self.sampling
        B, P = prompt_ids.shape
        K, T = s.num_samples, s.max_new_tokens
        N, S = B * K, max(P + T, self.min_slots)
        dev = self.device
        ids, pmask = prompt_ids.to(dev), prompt_mask.to(dev).bool()
        gen = torch.Generator(device=dev).manual_seed(seed)
        cdt = self.cache_dtype
        keys, values = self._cache((N, self.num_kv_heads, S, self.head_dim))
        # RoPE tables of every position a rollout can reach, looked up per step.
        cos_tab, sin_tab = (t[0, 0] for t in rope_tables(torch.arange(S, device=dev)[None], self.inv_freq, self.dtype))
        # Prefill the B prompts once (a cache of P slots), then share it with the K samples of each.
        pos = position_ids_from_mask(pmask)  # [B, P]
        pre_shape = (B, self.num_kv_heads, P, self.head_dim)
        pre_k = [torch.zeros(pre_shape, dtype=cdt, device=dev) for _ in range(self.num_layers)]
        pre_v = [torch.zeros(pre_shape, dtype=cdt, device=dev) for _ in range(self.num_layers)]
        hidden = self._forward(ids, cos_tab[pos][:, :, None], sin_tab[pos][:, :, None], pre_k, pre_v, 0,
                               additive_mask(prefill_visible(pmask)[:, None]))
        for i in range(self.num_layers):
            keys[i][:, :, :P] = pre_k[i].repeat_interleave(K, 0)
            values[i][:, :, :P] = pre_v[i].repeat_interleave(K, 0)
        logp_next = self._logprobs(hidden).repeat_interleave(K, 0)  # [N, V]
        vocab = logp_next.shape[-1]
        # The additive mask of a new token's query over the cache, updated in place: the prompt's
        # real tokens, then each response slot once it is written.
        bias = torch.full((N, 1, 1, S), float("-inf"), dtype=torch.float32, device=dev)
        bias[:, 0, 0, :P].masked_fill_(pmask.repeat_interleave(K, 0), 0.0)
        next_pos = pos[:, -1:].repeat_interleave(K, 0) + 1  # [N, 1]
        eos = torch.tensor(self.eos_ids, device=dev)
        out_ids = torch.full((N, T), self.pad_id, dtype=torch.long, device=dev)
        out_logp = torch.zeros(N, T, dtype=torch.float32, device=dev)
        rows = torch.arange(N, device=dev)  # the output row of each sequence still in the batch
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        steps = 0
        decode = self._decoder()
        for t in range(T):
            check_stop("FastLlamaEngine.generate")  # a SIGTERM is honoured within one token (reclight.engines.stop)
            tok = logp_next.argmax(-1) if self.greedy else self._sample(logp_next, gen, vocab)  # [n]
            tok = torch.where(done, self.pad_id, tok)
            out_ids[rows, t] = tok
            out_logp[rows, t] = torch.where(done, 0.0, logp_next.gather(-1, tok[:, None]).squeeze(-1))
            done = done | torch.isin(tok, eos)
            steps = t + 1
            n_live = int((~done).sum())
            if t == T - 1 or n_live == 0:
                break
            if n_live <= self.compact_below * len(rows):  # drop finished sequences from the batch
                keep = (~done).nonzero().squeeze(1)
                rows, tok, done, next_pos, bias = rows[keep], tok[keep], done[keep], next_pos[keep], bias[keep]
                keys = [k[keep] for k in keys]
                values = [v[keep] for v in values]
            bias[..., P + t] = 0.0
            # Attend over the slots written so far (and this step's) only, not the whole cache: the
            # later slots are masked, so they change nothing but rounding and would cost a step at
            # the start of a long rollout as much as one at its end. Views, no copies; at least
            # min_slots of them (CPU, min_cache_slots).
            end = max(P + t + 1, self.min_slots)
            logp_next = decode(tok[:, None], cos_tab[next_pos][:, :, None], sin_tab[next_pos][:, :, None],
                               [k[:, :, :end] for k in keys], [v[:, :, :end] for v in values], P + t,
                               bias[..., :end])
            next_pos = next_pos + 1
        ids_out, logp_out = out_ids[:, :steps], out_logp[:, :steps]
        mask = response_mask_from_ids(ids_out, self.eos_ids)  # up to the first EOS (a sampled pad is real)
        return ids_out.reshape(B, K, steps), mask.reshape(B, K, steps), logp_out.masked_fill(~mask, 0.0).reshape(B, K, steps)

    def close(self) -> None:
        self._pieces.close()

    def __getstate__(self) -> dict[str, Any]:  # sent to a rollout worker: the KV caches stay behind
        return {**self.__dict__, "_local": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()  # each thread's caches, rebuilt on first use

    @staticmethod
    def _sample(logp: Tensor, gen: torch.Generator, vocab: int) -> Tensor:  # [n, V] fp32 -> [n] long
        """One token per row from ``softmax(logp)`` by inverse-CDF sampling: one uniform per row
        (``U * total``, located in the running sum of the probabilities). Exact up to the fp32
        rounding of the running sum; tokens of probability 0 are never drawn (``right=True``:
        the first index whose running sum EXCEEDS the draw). One uniform per row instead of
        Gumbel-max's one per vocabulary entry: the random draws were 3% of a rollout. ``vocab``
        is ``logp``'s width (kept for callers)."""
        u = torch.rand(logp.shape[0], 1, generator=gen, device=logp.device, dtype=logp.dtype)
        return inverse_cdf_sample(logp, u)

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, *, seed: int) -> Generation:  # [B, P] each
        B, size = prompt_ids.shape[0], self.micro_batch_size
        if size is None or size >= B:
            ids, mask, logp = self._generate(prompt_ids, prompt_mask, seed)
        else:  # pieces of `size` prompts, each from its own generator (engine config), side by side
            pieces = [(i, slice(s, min(s + size, B))) for i, s in enumerate(range(0, B, size))]
            outs = self._pieces.map(lambda p: self._generate(prompt_ids[p[1]], prompt_mask[p[1]],
                                                             piece_seed(seed, p[0])), pieces)
            T = max(o[0].shape[-1] for o in outs)  # each piece stops when its own rows are done
            pad = lambda x, value: F.pad(x, (0, T - x.shape[-1]), value=value)  # noqa: E731
            ids = torch.cat([pad(o[0], self.pad_id) for o in outs])
            mask = torch.cat([pad(o[1], False) for o in outs])
            logp = torch.cat([pad(o[2], 0.0) for o in outs])
        ids, mask, logp = ids.clone(), mask.clone(), logp.clone()  # leave inference mode: usable in autograd
        version = torch.full(ids.shape[:2], self.version, dtype=torch.long, device=ids.device)
        return Generation(response_ids=ids, response_mask=mask, logp_behav=logp, version=version)
