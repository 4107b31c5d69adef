"""FSDP helpers for Lightning's ``FSDPStrategy`` (GPU runs).

``wrap_decoder_layers`` is an auto-wrap policy that shards any Hugging Face decoder stack per
layer (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...) without naming the model class in the
config, so one YAML (``configs/strategy/fsdp.yaml``) serves every causal LM.
"""

from __future__ import annotations

import torch


def wrap_decoder_layers(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: recurse everywhere; wrap exactly the modules whose class name ends
    in ``DecoderLayer`` (the root is wrapped by FSDP itself)."""
    if recurse:
        return True
    return type(module).__name__.endswith("DecoderLayer")
