"""The Llama decoder as a short sequence of fused tensor ops: the pieces shared by two users,

- :class:`reclight.engines.fast.FastLlamaEngine` (sampling, no grad, its own fused weight copy);
- :func:`reclight.kernels.fused_forward.shared_prefix_hidden`, the trainer's fused training
  forward (``model.train_forward.impl: fused``), which runs on the policy's own parameters.

Both compute what Hugging Face's ``LlamaForCausalLM`` computes (RMSNorm normalising in fp32,
default RoPE, SwiGLU MLP, optional grouped-query attention and attention/MLP biases), tested
against it to 1e-5 in fp32 (``tests/rollout/test_engine_fast.py``,
``tests/kernels/test_fused_forward.py``).

Here: which configs the decoder supports (:func:`llama_problems`), its sizes
(:class:`LlamaDims`), the fused weight layout (:func:`fused_sources`: q|k|v and gate|up
concatenated), RMSNorm, RoPE, grouped-query helpers, and the element-wise chains between the
matmuls as named pieces (:func:`pointwise_ops`: norm + cast, residual add + the next norm, RoPE,
SwiGLU, scale + mask + softmax), eager or compiled by ``torch.compile``: on a CPU, after the
matmuls, a pass is bound by the memory traffic of these chains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

def llama_problems(config: Any) -> list[str]:
    """What in ``config`` this decoder does not implement ("field=value (accepted: ...)")."""
    arch = getattr(config, "model_type", None)
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
    problems = []
    if arch != "llama":
        problems.append(f"model_type={arch!r} (accepted: 'llama')")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters.rope_type={rope.get('rope_type')!r} (accepted: 'default')")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (accepted: 'silu')")
    return problems


class LlamaDims:
    """The sizes and constants of a Llama config that the decoder needs."""

    def __init__(self, config: Any) -> None:
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        rope = getattr(config, "rope_parameters", None) or {}
        self.theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))

    def inv_freq(self, device: torch.device) -> Tensor:  # [D/2] fp32
        d = self.head_dim
        return 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))


def fused_sources(weights: torch.nn.Module | Mapping[str, Tensor], num_layers: int | None = None
                  ) -> dict[str, list[Tensor]]:
    """Fused tensor name -> the policy tensors it is the concatenation of (along dim 0).

    ``weights``: a ``LlamaForCausalLM`` (its parameters, so autograd links are kept; with LoRA
    layers, its merged weights :func:`reclight.models.lora.effective_weights`) or a state
    dict with Hugging Face names (e.g. the full weights gathered from a sharded policy). Tied
    embeddings: ``lm_head.weight`` may be absent; the input embedding is used then."""
    if isinstance(weights, torch.nn.Module):
        num_layers = weights.config.num_hidden_layers
        from reclight.kernels.adapters import effective_weights, has_lora

        # LoRA (peft's layers): W + scaling * (B @ A) under the plain names, with autograd into
        # A and B (reclight/models/lora.py); reading the base weights would skip the adapter.
        weights = effective_weights(weights) if has_lora(weights) else dict(weights.named_parameters())
    elif num_layers is None:
        raise ValueError("fused_sources(state_dict) needs num_layers")
    embed = weights["model.embed_tokens.weight"]
    out: dict[str, list[Tensor]] = {"embed": [embed], "norm": [weights["model.norm.weight"]],
                                    "lm_head": [weights.get("lm_head.weight", embed)]}
    for i in range(num_layers):
        pre = f"model.layers.{i}."
        out[f"{i}.ln1"] = [weights[pre + "input_layernorm.weight"]]
        out[f"{i}.ln2"] = [weights[pre + "post_attention_layernorm.weight"]]
        for name, mods in ((f"{i}.{{}}qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                           (f"{i}.{{}}o", ("self_attn.o_proj",)), (f"{i}.{{}}gu", ("mlp.gate_proj", "mlp.up_proj")),
                           (f"{i}.{{}}down", ("mlp.down_proj",))):
            out[name.format("w")] = [weights[f"{pre}{m}.weight"] for m in mods]
            if f"{pre}{mods[0]}.bias" in weights:
                out[name.format("b")] = [weights[f"{pre}{m}.bias"] for m in mods]
    return out


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """As ``LlamaRMSNorm``: normalise in fp32, scale in ``x``'s dtype."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(pos: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [N, 1, L, D] for positions ``pos`` [N, L]."""
    freqs = pos[..., None].float() * inv_freq  # [N, L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x [N, H, L, D]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def repeat_kv(x: Tensor, num_heads: int) -> Tensor:  # [..., Hkv, S, D] -> [..., H, S, D]
    n = x.shape[-3]
    return x if n == num_heads else x.repeat_interleave(num_heads // n, dim=-3)


def additive_mask(visible: Tensor) -> Tensor:  # bool -> fp32 (0 visible, -inf hidden)
    return torch.zeros(visible.shape, dtype=torch.float32, device=visible.device).masked_fill_(~visible, float("-inf"))


def split_heads(qkv: Tensor, dims: LlamaDims) -> tuple[Tensor, Tensor, Tensor]:
    """[N, L, (H + 2 Hkv) * D] -> q, k, v [N, H, L, D] (k/v repeated for grouped-query attention)."""
    N, L = qkv.shape[:2]
    H, Hkv, D = dims.num_heads, dims.num_kv_heads, dims.head_dim
    heads = qkv.view(N, L, H + 2 * Hkv, D).transpose(1, 2)
    q, k, v = heads.split((H, Hkv, Hkv), dim=1)
    return q, repeat_kv(k, H), repeat_kv(v, H)


# -- the element-wise pieces of the training forward, eager or compiled ---------------------------
def _pw_norm(x: Tensor, w: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    return rms_norm(x, w, eps).to(dtype)


def _pw_add_norm(x: Tensor, o: Tensor, w: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    x = x + o
    return x, rms_norm(x, w, eps).to(dtype)


def _pw_swiglu(gu: Tensor) -> Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def _pw_rope(qkv: Tensor, cos: Tensor, sin: Tensor, n_qk: int, head_dim: int, dtype: torch.dtype) -> Tensor:
    qk, v = qkv.split((n_qk * head_dim, qkv.shape[-1] - n_qk * head_dim), dim=-1)
    qk = apply_rope(qk.unflatten(-1, (n_qk, head_dim)), cos, sin).flatten(-2)
    return torch.cat((qk.to(dtype), v.to(dtype)), dim=-1)


def _pw_softmax(s: Tensor, scale: float, bias: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.softmax(s * scale + bias, dim=-1).to(dtype)


def _pw_softmax2(s1: Tensor, s2: Tensor, scale: float, bias: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.softmax(torch.cat((s1, s2), dim=-1) * scale + bias, dim=-1).to(dtype)


_PW_EAGER: dict[str, Any] = {"norm": _pw_norm, "add_norm": _pw_add_norm, "swiglu": _pw_swiglu, "rope": _pw_rope,
                             "softmax": _pw_softmax, "softmax2": _pw_softmax2}
_PW_COMPILED: dict[str, Any] = {}


def pointwise_ops(compiled: bool = False) -> dict[str, Any]:
    """The element-wise chains of the decoder by name, eager or compiled (``torch.compile``,
    dynamic shapes, compiled once per process on first use). Each fuses what a kernel-per-op
    eager run does in several passes over memory: ``norm`` (RMSNorm + cast to the matmul dtype),
    ``add_norm`` (residual add + the next norm), ``rope`` (RoPE on the q|k columns of a fused
    q|k|v, cast), ``swiglu``, ``softmax``/``softmax2`` (scale + additive mask + fp32 softmax of
    one / two concatenated score blocks, cast)."""
    if not compiled:
        return _PW_EAGER
    if not _PW_COMPILED:
        # Not fullgraph: should a process exceed dynamo's recompile limit (it guards on dtypes,
        # ranks, grad and autocast state; a training run needs a handful of variants), the
        # chain falls back to eager with a warning instead of failing the run.
        _PW_COMPILED.update({n: torch.compile(f, dynamic=True) for n, f in _PW_EAGER.items()})
    return _PW_COMPILED


def attn_out_and_mlp(pw: dict[str, Any], x: Tensor, att: Tensor, w: dict[str, Tensor], i: int, eps: float,
                      mm_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(residual after the attention output projection, MLP output) of layer ``i``, for the
    token-major attention output ``att`` [..., H * D]; the MLP output is added to the residual by
    the next ``add_norm``."""
    x, h = pw["add_norm"](x, F.linear(att, w[f"{i}.wo"], w.get(f"{i}.bo")), w[f"{i}.ln2"], eps, mm_dtype)
    return x, F.linear(pw["swiglu"](F.linear(h, w[f"{i}.wgu"], w.get(f"{i}.bgu"))), w[f"{i}.wdown"], w.get(f"{i}.bdown"))
