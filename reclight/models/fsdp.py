"""Fully sharded data parallel (FSDP2) for the trained policy.

``configs/strategy/fsdp.yaml`` selects Lightning's ``ModelParallelStrategy`` (a data-parallel
device mesh); :meth:`reclight.trainer.module.RLModule.configure_model` then calls :func:`shard_policy`,
which applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer and to the policy
itself. The policy stays an ordinary module whose forward unshards on the fly, so the warm-up,
the greedy evaluation and the KL monitor call it as on one device. Tested on CPU with 2
processes (gloo) in ``tests/trainer/test_fsdp.py``.

Why not Lightning's ``FSDPStrategy`` (FSDP1): it refuses CPU, so nothing could be tested here;
it wraps the whole LightningModule, so the policy's embeddings and head are only unsharded
inside the wrapped ``training_step`` (the warm-up, evaluation and weight sync run outside it);
and its flat parameters give the engines nothing to copy by name.

Rollout engines hold their own unsharded copy of the weights; :func:`full_weights` gathers the
full tensors from a sharded policy for each weight sync (a collective: every rank calls it at
the same steps, which the deterministic sync schedule guarantees).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from reclight.kernels.adapters import has_lora, merged_state_dict


def is_decoder_layer(module: torch.nn.Module) -> bool:
    """``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...: any HF decoder block, by class name."""
    return type(module).__name__.endswith("DecoderLayer")


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a sharded ``DTensor`` (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_policy(policy: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the policy (embeddings, final norm, LM
    head). ``mesh`` is a 1-D data-parallel device mesh. Returns ``policy`` (sharded in place)."""
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in policy.modules() if is_decoder_layer(m)]
    if not layers:
        raise ValueError(f"shard_policy: {type(policy).__name__} has no *DecoderLayer modules to shard; "
                         "accepted: a Hugging Face decoder-only causal LM")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return policy


def full_weights(policy: torch.nn.Module) -> torch.nn.Module | Mapping[str, Tensor]:
    """The policy itself when it is not sharded (engines read its parameters in place, no copy);
    its merged weights when it has LoRA layers (Hugging Face names, :mod:`reclight.models.lora`);
    otherwise its full state dict (HF names, full tensors on every rank), gathered collectively."""
    if not is_sharded(policy):
        return merged_state_dict(policy) if has_lora(policy) else policy  # LoRA: W + scaling * (B @ A)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))


def unsharded_copy(policy: torch.nn.Module) -> torch.nn.Module:
    """A plain (unsharded, not trained) copy of the policy on this rank: the policy's class
    rebuilt from its config and loaded with :func:`full_weights` when sharded; a plain model of
    its merged weights when it has LoRA layers; a deep copy otherwise. Collective when sharded."""
    import copy

    if not is_sharded(policy):
        return plain_copy(policy) if has_lora(policy) else copy.deepcopy(policy)
    from transformers import AutoModelForCausalLM

    weights = full_weights(policy)
    first = next(iter(weights.values()))
    with torch.device(first.device):
        fresh = AutoModelForCausalLM.from_config(policy.config, dtype=first.dtype)
    missing, unexpected = fresh.load_state_dict(dict(weights), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not fresh.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"unsharded_copy: state dict mismatch (missing {missing}, unexpected {unexpected})")
    return fresh


def shard_on_mesh(policy: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """FSDP2 over the data-parallel dimension of Lightning's ``ModelParallelStrategy`` mesh
    (``configs/strategy/fsdp.yaml``); tensor parallelism is not implemented (refused)."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
        raise ValueError(f"ModelParallelStrategy tensor_parallel_size={mesh['tensor_parallel'].size()} is not "
                         "valid; accepted: 1 (reclight shards the policy with FSDP over data_parallel only)")
    return shard_policy(policy, mesh["data_parallel"] if "data_parallel" in names else mesh)


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain Hugging Face model (no LoRA layers) holding ``model``'s merged weights."""
    from transformers import AutoModelForCausalLM

    weights = merged_state_dict(model)
    first = next(iter(weights.values()))
    with torch.device(first.device):
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=first.dtype)
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not fresh.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"plain_copy: state dict mismatch (missing {missing}, unexpected {unexpected})")
    return fresh
