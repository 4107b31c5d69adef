"""LoRA on the trained policy through ``peft`` (``model.policy.lora``; ``pip install 'reclight[lora]'``).

What this module decides, and why (docs/lora.md has the user's view):

- **peft's layers, injected in place** (``peft.inject_adapter_in_model``): the policy stays the
  Hugging Face model it was (``policy.config``, ``generate``, the tokenizer's model), each target
  ``nn.Linear`` becomes peft's ``lora.Linear`` (names ``...q_proj.base_layer.weight``,
  ``...q_proj.lora_A.default.weight``). Not ``get_peft_model``: its wrapper renames every tensor
  (``base_model.model...``) for nothing reclight needs.
- **Seeded, B = 0** (:func:`attach_lora`): peft draws A (Kaiming uniform) from the global RNG, so
  two runs that seeded differently before the model was built got different adapters (TRL issue
  6688). Here the draw runs under ``fork_rng`` seeded from the run seed alone (same seed, same
  adapter bitwise), and the global RNG is left as it was. B starts at 0, so the adapted model is
  the base model until the first update: the reference "base with the adapter disabled" is then
  exactly the RL-start policy.
- **The warm-up trains the base** (:func:`base_training`): adapter disabled, base weights
  trainable for the warm-up's own optimizer, frozen again afterwards. Equivalent to attaching the
  adapter after the warm-up (the adapter is untouched: no gradient reaches it).
- **Readers of raw weights get merged weights.** The fused training forward and the fast engine
  read the weight tensors, not the modules' forward; they would skip the adapter silently.
  :func:`effective_weights` gives them ``W + scaling * (B @ A)`` under Hugging Face names,
  computed in the weights' dtype with autocast off, with autograd into A and B for the training
  forward (nothing in the trainable model is mutated: peft's ``merge`` would write into W). The
  engines receive the same expression without gradient (:func:`merged_state_dict`), so the fused
  trainer and the fast engine compute from bitwise the same merged tensors.
- **Engine state in adapter form** (:class:`AdapterForm`): a checkpoint holds the adapter the
  engine's weights were merged from, not the merged weights; loading re-merges with the (frozen)
  base, bitwise the same tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from reclight.checks import check_bool, check_float, check_int, invalid
from reclight.kernels.adapters import (  # noqa: F401 (the merged-weight helpers, re-exported)
    ADAPTER,
    effective_weights,
    has_lora,
    is_adapter,
    lora_layers,
    merged_state_dict,
)
from reclight.models.fsdp import is_decoder_layer, plain_copy  # noqa: F401 (plain_copy re-exported)

INSTALL = "pip install 'reclight[lora]'"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA on the policy through ``peft`` (off by default; docs/lora.md). With it on, only the
    adapter is trained and checkpointed, and the reference policy (KL terms, ``kl/init``) is the
    base model with the adapter disabled instead of a frozen copy."""

    enabled: bool = False
    """Train a LoRA adapter instead of the full weights (needs ``pip install 'reclight[lora]'``)."""
    rank: int = 8
    """r, the adapter's rank (>= 1)."""
    alpha: float = 16.0
    """lora_alpha: the adapter's output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training, in [0, 1). Not 0 makes the trainer's
    log-probs random, so on-policy ratios are no longer 1 (a warning says so) and the fused
    training forward does not apply (``auto`` takes ``hf``)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Names of the ``nn.Linear`` modules of the decoder layers that get an adapter (the last part
    of their name); the default is every attention and MLP projection of Llama / Qwen / Mistral
    models."""

    def __post_init__(self) -> None:
        check_bool("model.policy.lora.enabled", self.enabled)
        check_int("model.policy.lora.rank", self.rank, minimum=1)
        check_float("model.policy.lora.alpha", self.alpha, gt=0)
        check_float("model.policy.lora.dropout", self.dropout, ge=0, lt=1, accepted="a number in [0, 1) (default 0)")
        targets = self.target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise invalid("model.policy.lora.target_modules", targets,
                          "a non-empty list of module names, e.g. [q_proj, v_proj]")
        object.__setattr__(self, "target_modules", tuple(targets))
        if not self.enabled:
            return
        require_peft()
        if self.dropout > 0:
            warnings.warn(f"model.policy.lora.dropout={self.dropout}: the trainer's log-probs are random while it "
                          "trains, so on-policy ratios pi / mu are no longer 1 and clipping acts on noise; 0 keeps "
                          "the update exact", stacklevel=2)


def require_peft() -> None:
    """Raise naming the install command when ``peft`` is missing."""
    if importlib.util.find_spec("peft") is None:
        raise ImportError(f"model.policy.lora.enabled=true needs the peft library, which is not installed; "
                          f"install it with: {INSTALL}")


# -- attaching ------------------------------------------------------------------------------------
def _linear_names(model: torch.nn.Module) -> list[str]:
    """The last name part of every ``nn.Linear`` inside the decoder layers: the accepted targets
    (not ``lm_head``, which may be tied to the input embedding: a merged head would then be
    written into the embedding too)."""
    return sorted({name.rsplit(".", 1)[-1] for layer in model.modules() if is_decoder_layer(layer)
                   for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)})


def attach_lora(model: torch.nn.Module, cfg: LoraConfig, seed: int) -> torch.nn.Module:
    """Inject peft's LoRA layers into ``model`` in place, A drawn from ``seed`` alone and B = 0,
    every other parameter frozen. Returns ``model``."""
    require_peft()
    import peft

    linear = _linear_names(model)
    missing = [t for t in cfg.target_modules if t not in linear]
    if missing:
        raise invalid("model.policy.lora.target_modules", list(cfg.target_modules),
                      f"names of the nn.Linear modules of the model's decoder layers ({', '.join(linear)}); "
                      f"not found: {', '.join(missing)}")
    pcfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(cfg.target_modules), bias="none", init_lora_weights=True)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(pcfg, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    return model


def adapter_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors (copies), by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_adapter(n)}


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model: every LoRA layer's adapter off, back on afterwards."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


@contextlib.contextmanager
def base_training(model: torch.nn.Module) -> Iterator[None]:
    """The supervised warm-up's view of a LoRA policy: adapter disabled, base weights trainable;
    afterwards the base is frozen and the adapter trainable again."""
    with adapter_disabled(model):
        for name, p in model.named_parameters():
            p.requires_grad_(not is_adapter(name))
        try:
            yield
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(is_adapter(name))


# -- merged weights ---------------------------------------------------------------------------------
def base_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the base weights (every parameter but the adapter's, by name and bytes): the
    checkpoint's proof of which base its adapter belongs to."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if is_adapter(name):
            continue
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class AdapterForm:
    """A rollout engine's LoRA bookkeeping: what it copies from a LoRA policy (the merged
    weights), and its checkpoint state in adapter form (the adapter its weights were merged from,
    not the weights)."""

    def __init__(self) -> None:
        self.policy: torch.nn.Module | None = None
        self.adapter: dict[str, Tensor] | None = None

    def source(self, policy: Any) -> Any:
        """What to copy from ``policy``: its merged state dict when it has LoRA (recording the
        adapter), else ``policy`` unchanged (a module or an already gathered state dict)."""
        if has_lora(policy):
            self.policy, self.adapter = policy, adapter_state(policy)
            return merged_state_dict(policy)
        return policy

    def state(self, state: dict[str, Any]) -> dict[str, Any]:
        if self.adapter is None:
            return state
        return {**{k: v for k, v in state.items() if k != "weights"}, "adapter": dict(self.adapter)}

    def restore(self, state: Mapping[str, Any]) -> dict[str, Tensor] | None:
        """The merged weights of a saved adapter-form state (None for a full-weight state)."""
        if "adapter" not in state:
            return None
        if self.policy is None:
            raise ValueError("the checkpoint's rollout-engine state is in LoRA adapter form but this engine was "
                             "not built from a LoRA policy; accepted: model.policy.lora as in the checkpoint's run")
        self.adapter = {k: v.clone() for k, v in state["adapter"].items()}
        return merged_state_dict(self.policy, adapter=self.adapter)
