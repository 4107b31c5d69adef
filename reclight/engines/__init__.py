"""Rollout engines: each holds its own copy of the weights (the behaviour policy).

- :class:`~reclight.engines.hf.HFGenerateEngine` (``hf``, default): Hugging Face ``generate``;
- :class:`~reclight.engines.fast.FastLlamaEngine` (``fast``): a lean Llama sampling loop;
- :class:`~reclight.engines.vllm.VLLMEngine` (``vllm``): GPU, behind the ``vllm`` extra.

They share :class:`~reclight.engines.base.RolloutEngine`; :func:`build_engine` makes the one an
:class:`~reclight.engines.config.EngineConfig` names.
"""

from __future__ import annotations

from typing import Any

import torch

from reclight.engines.base import Generation, RolloutEngine, SamplingConfig
from reclight.engines.config import EngineConfig

__all__ = ["EngineConfig", "Generation", "RolloutEngine", "SamplingConfig", "build_engine", "resolve_engine_config",
           "resolve_engine_name"]


def resolve_engine_name(cfg: EngineConfig, policy: torch.nn.Module, sampling: SamplingConfig,
                        stop_strings: tuple[str, ...] = ()) -> tuple[str, str]:
    """``(name, why)``: the engine ``cfg.name`` selects; ``auto`` is ``fast`` when the fast engine
    supports the model and the sampling (``why`` is then empty), else ``hf`` with ``why`` naming
    what the fast engine does not support."""
    if cfg.name != "auto":
        return cfg.name, ""
    from reclight.kernels.llama import llama_problems

    problems = llama_problems(getattr(policy, "config", None))
    if sampling.top_p != 1.0:
        problems.append(f"sampling.top_p={sampling.top_p!r}")
    if stop_strings:
        problems.append(f"the task's stop strings {stop_strings!r}")
    return ("hf", "; ".join(problems)) if problems else ("fast", "")


def resolve_engine_config(cfg: EngineConfig, policy: torch.nn.Module, sampling: SamplingConfig,
                          stop_strings: tuple[str, ...], precision: str) -> tuple[EngineConfig, list[str]]:
    """``model.engine`` with its defaults resolved for a run, and the lines that say what was
    chosen and why: ``name: auto`` (:func:`resolve_engine_name`) and ``dtype: null`` (bf16 under a
    bf16 trainer ``precision``, else the policy's own dtype; vLLM chooses its own)."""
    import dataclasses

    name, why = resolve_engine_name(cfg, policy, sampling, stop_strings)
    notes = []
    if cfg.name == "auto":
        notes.append(f"model.engine.name auto: {name}" + (f" (the fast engine does not support {why})" if why else ""))
    dtype = cfg.dtype
    if dtype is None and name != "vllm" and precision.startswith("bf16"):
        dtype = "bfloat16"
    if cfg.dtype is None:
        shown = dtype or str(next(policy.parameters()).dtype).removeprefix("torch.")
        notes.append(f"model.engine.dtype null: {shown} (follows trainer.precision {precision}"
                     + ("" if name != "vllm" else "; vLLM chooses its own") + ")")
    return dataclasses.replace(cfg, name=name, dtype=dtype), notes


def build_engine(
    cfg: EngineConfig,
    policy: torch.nn.Module,
    tokenizer: Any,
    sampling: SamplingConfig,
    *,
    stop_strings: tuple[str, ...] = (),
    model_path: str | None = None,
    seed: int = 0,
) -> RolloutEngine:
    """The engine ``cfg`` names (``auto``: :func:`resolve_engine_name`), holding ``policy``'s current weights as version 0.

    ``hf``/``fast`` copy ``policy`` (gathered first when it is sharded: FSDP2); ``vllm`` loads
    its own copy from ``model_path`` and then receives ``policy``'s weights.
    """
    name, _ = resolve_engine_name(cfg, policy, sampling, stop_strings)
    if name == "vllm":
        from reclight.engines.vllm import VLLMEngine

        o = cfg.vllm
        engine = VLLMEngine(model_path, tokenizer, sampling, dtype=cfg.dtype or "bfloat16", seed=seed,
                            gpu_memory_utilization=o.gpu_memory_utilization, max_model_len=o.max_model_len,
                            enforce_eager=o.enforce_eager, recompute_logp_behav=o.recompute_logp_behav)
        engine.update_weights(policy, 0)
        return engine
    from reclight.models.fsdp import is_sharded, unsharded_copy

    source = unsharded_copy(policy) if is_sharded(policy) else policy
    if name == "fast":
        from reclight.engines.fast import FastLlamaEngine

        return FastLlamaEngine(source, tokenizer, sampling, cfg.dtype, stop_strings,
                               compile_decode=cfg.fast.compile_decode, micro_batch_size=cfg.fast.micro_batch_size,
                               threads=cfg.fast.threads)
    from reclight.engines.hf import HFGenerateEngine

    return HFGenerateEngine(source, tokenizer, sampling, cfg.dtype, stop_strings)
