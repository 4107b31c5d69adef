"""Loading the policy: dtypes, attention kernels, the model-path check, and frozen copies."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flex_attention")


def resolve_dtype(name: str, field: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r} is not valid; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


def check_model_path(name_or_path: str | None, field: str = "model.policy.name_or_path") -> None:
    """A value that is clearly a local path (absolute, ``./``, ``../``, ``~``, or more than one
    ``/``) must be a folder with ``config.json``; checked before anything is loaded. Anything
    else (``org/name``) is a Hugging Face id, resolved by ``from_pretrained`` as usual."""
    if name_or_path is None:
        return
    p = Path(name_or_path).expanduser()
    local = p.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1 or p.exists()
    accepted = ("accepted: a folder written by save_pretrained (holding config.json), a Hugging Face model id "
                "such as 'Qwen/Qwen2.5-0.5B-Instruct', or null for the embedded tiny model")
    if local and not p.is_dir():
        raise ValueError(f"{field}={name_or_path!r} is not valid: no such folder; {accepted}")
    if local and not (p / "config.json").is_file():
        raise ValueError(f"{field}={name_or_path!r} is not valid: the folder has no config.json; {accepted}")


def check_finite_weights(model: torch.nn.Module, name_or_path: str, field: str = "model.policy.name_or_path") -> None:
    """Raise naming the first parameter or buffer holding NaN or inf (a damaged or badly
    converted checkpoint): otherwise sampling fails later with "probability tensor contains
    either inf, nan" (HF engine) or every step is skipped as non-finite (fast engine)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise ValueError(
                f"{field}={name_or_path!r} is not valid: its weights are not finite (tensor {name!r} {list(t.shape)} "
                f"holds {n_nan} NaN and {n_inf} inf of {t.numel()} values); accepted: a model whose every weight is "
                "finite (re-download or re-convert it)"
            )


def check_dtype_for_device(dtype: str, device: torch.device, field: str = "model.policy.dtype") -> None:
    """float16 MASTER weights on the CPU are refused. AdamW then keeps its moments in float16:
    squared gradients below 6e-8 (float16's smallest value) and Adam's eps (1e-8) round to 0,
    updates below the weights' resolution (1e-3 relative) round away, and reclight's manual
    optimization has no loss scaling: the weights drift instead of training. On a GPU the same
    holds and a warning says so (``trainer.precision: 16-mixed`` with float32 weights is the way
    to float16 compute)."""
    if dtype == "float16" and device.type == "cpu":
        raise ValueError(
            f"{field}='float16' is not valid on the CPU: float16 master weights make AdamW round small updates away "
            "and its squared-gradient moment and eps to 0 (no loss scaling), so the weights drift; accepted: float32 "
            "(with trainer.precision bf16-mixed for 16-bit compute) or bfloat16"
        )
    if dtype == "float16":
        warnings.warn(f"{field}='float16' on {device.type}: float16 master weights make AdamW round small updates "
                      "away and its squared-gradient moment to 0 (no loss scaling); prefer float32 weights with "
                      "trainer.precision 16-mixed or bf16-mixed", stacklevel=2)


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a Hugging Face causal LM id or local folder, set to left padding
    (generation) with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(name_or_path: str) -> Any:
    """The model's config alone (its sizes and positions), without loading any weight."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path)


def load_causal_lm(name_or_path: str, dtype: str = "float32",
                   attn_implementation: str | None = None, tokenizer: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a Hugging Face causal LM id or local folder (``tokenizer``: one
    already loaded with :func:`load_tokenizer`).

    ``attn_implementation`` picks the HF attention kernel (None: the transformers default).
    Every weight is checked to be finite (:func:`check_finite_weights`).
    Set ``HF_HUB_OFFLINE=1`` to forbid any network access.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path) if tokenizer is None else tokenizer
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype), **kw)
    check_finite_weights(model, name_or_path)
    return model, tokenizer


class Frozen:
    """Holds a module without registering it (not trained, not in the Lightning state dict)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model


def frozen_copy(policy: torch.nn.Module) -> Frozen:
    """An unregistered, eval-mode, grad-free copy of ``policy`` (gathered from the shards under
    FSDP2): the RL-start reference of ``kl/init`` (and of a reference KL)."""
    from reclight.models.fsdp import unsharded_copy

    return Frozen(unsharded_copy(policy).eval().requires_grad_(False))
