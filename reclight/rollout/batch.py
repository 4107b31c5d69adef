"""The rollout batch: one training step's data, as the loss needs it.

A rollout batch holds B prompts x K sampled responses: ``response_ids``/``response_mask``/
``logp_behav`` ``[B, K, T]``, ``rewards``/``reward_valid`` ``[B, K]`` and the policy
``version`` ``[B, K]`` that generated each sample (``logp_behav``: see
:mod:`reclight.engines.base`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """One training step's data. ``step`` is the 0-indexed step it was generated for."""

    step: int
    example_index: Tensor  # [B] long, index into the task's train split
    prompt_ids: Tensor  # [B, P] long, left-padded
    prompt_mask: Tensor  # [B, P] bool
    response_ids: Tensor  # [B, K, T] long
    response_mask: Tensor  # [B, K, T] bool
    logp_behav: Tensor  # [B, K, T] fp32
    version: Tensor  # [B, K] long
    rewards: Tensor  # [B, K] fp32 (0 where invalid)
    reward_valid: Tensor  # [B, K] bool: the reward function returned a finite number
    correct: Tensor  # [B, K] bool
    gen_seconds: float = 0.0  # wall time of generation + scoring (for throughput)
    sampled_groups: int = 0  # oversampling: groups sampled for this step (0: no oversampling)
    informative_groups: int = 0  # ... of which informative (rewards not all equal)
    token_version: Tensor | None = None  # [B, K, T] long: the version that sampled each token (asynchronous schedule)
    logp_kept_mass: Tensor | None = None  # [B, K, T] fp32: log S, the mass top-p kept per token (HF engine, top_p < 1)
    metrics: dict[str, float] | None = None  # what the rollout path measured for this step (logged as given)

    def to(self, device: torch.device | str, **kwargs: Any) -> "RolloutBatch":
        """Every tensor moved to ``device`` (Lightning's ``batch_to_device`` calls this)."""
        return RolloutBatch(**{
            f.name: (v.to(device, **kwargs) if isinstance(v := getattr(self, f.name), Tensor) else v)
            for f in fields(self)
        })

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (CPU), for checkpointing a queued rollout."""
        return {f.name: (v.cpu() if isinstance(v := getattr(self, f.name), Tensor) else v) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "RolloutBatch":
        return cls(**state)
