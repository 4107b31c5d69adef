"""LoRA layers read as plain weights: ``W + scaling * (B @ A)`` under the plain Hugging Face names.

The fused training forward (:mod:`reclight.kernels.fused_forward`) and the rollout engines read a
Llama's weights as tensors, not through its modules; a model with peft's LoRA layers must hand
them its merged weights, or they would silently skip the adapter. These helpers only read peft's
layer objects (``base_layer``, ``lora_A`` / ``lora_B``, ``scaling``, ``disable_adapters``); the
configuration, attaching, the reference and the checkpoint form are in :mod:`reclight.models.lora`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

ADAPTER = "default"  # peft's adapter name; reclight trains one adapter


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every peft LoRA layer of ``model`` (empty without peft or LoRA)."""
    if importlib.util.find_spec("peft") is None:
        return []
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: Any) -> bool:
    return isinstance(model, torch.nn.Module) and any(is_adapter(n) for n, _ in model.named_parameters())


def _delta(layer: Any, a: Tensor, b: Tensor) -> Tensor:
    """``scaling * (B @ A)`` in the weights' dtype, autocast off (bf16-mixed would otherwise round
    the training forward's delta to bf16 and not the engine's)."""
    with torch.autocast(a.device.type, enabled=False):
        return (b @ a) * layer.scaling[ADAPTER]


def effective_weights(model: torch.nn.Module, adapter: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``{Hugging Face name: tensor}`` of ``model``'s weights as its forward uses them: each LoRA
    layer's ``W + scaling * (B @ A)`` under the plain name (``...q_proj.weight``; ``W`` alone when
    its adapter is disabled), every other parameter as it is; autograd links kept. ``adapter``:
    other adapter tensors (by parameter name) to merge instead of the model's own."""
    params = dict(model.named_parameters())
    out = {n: p for n, p in params.items() if not is_adapter(n) and ".base_layer." not in n}
    for name, layer in lora_layers(model):
        for pname, p in layer.base_layer.named_parameters():
            w = p
            if pname == "weight" and not layer.disable_adapters and ADAPTER in layer.lora_A:
                a_name, b_name = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
                a = params[a_name] if adapter is None else adapter[a_name]
                b = params[b_name] if adapter is None else adapter[b_name]
                w = p + _delta(layer, a, b).to(p.dtype)
            out[f"{name}.{pname}"] = w
    return out


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, adapter: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """:func:`effective_weights` without gradient plus the persistent buffers: what a rollout
    engine copies (the plain model's state dict, Hugging Face names)."""
    out = {n: t.detach() for n, t in effective_weights(model, adapter).items()}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, buf in model.state_dict().items():  # the persistent buffers
        if name not in params and name not in out:
            out[name] = buf
    return out
