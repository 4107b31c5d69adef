"""What every rollout engine shares: the sampling settings, the output format and the protocol.

``logp_behav`` is ``log softmax(logits / temperature)`` of the engine's own weights at the
sampled token, recorded while sampling. It does NOT reflect top-p truncation (the trainer's
``logp`` does not either, so on-policy ratios stay exactly 1); with ``top_p < 1`` the true
behaviour distribution differs from it on the truncated tail: a kept token was sampled with
probability pi / S, S the mass top-p kept. An engine that records S returns log S per token in
``Generation.logp_kept_mass`` (the HF engine, with top_p < 1; None elsewhere), which
``model.algorithm.truncation_correction`` reads (docs/algorithms.md section 6.8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from reclight.checks import check_float, check_int


@dataclass(frozen=True)
class SamplingConfig:
    """How the behaviour policy samples (the trainer's ``logp`` uses the same temperature)."""

    num_samples: int = 8
    """K: responses per prompt (>= 2, the group-relative baseline needs a group)."""
    temperature: float = 1.0
    """Softmax temperature of sampling and of the trainer's ``logp``."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; not reflected in ``logp_behav`` (see module doc)."""
    max_new_tokens: int = 8
    """Longest response, in tokens; longer responses are cut (and usually scored wrong)."""

    def __post_init__(self) -> None:
        check_int("model.sampling.num_samples", self.num_samples, minimum=2, accepted=(
            "an integer >= 2 (K, the group size: every preset is group-relative, its baseline is the mean reward "
            "of the other samples)"))
        check_float("model.sampling.temperature", self.temperature, gt=0, accepted="a number > 0")
        check_float("model.sampling.top_p", self.top_p, gt=0, le=1, accepted="0 < top_p <= 1")
        check_int("model.sampling.max_new_tokens", self.max_new_tokens, minimum=1)


@dataclass
class Generation:
    """What an engine returns for B prompts x K samples."""

    response_ids: Tensor  # [B, K, T] long, right-padded
    response_mask: Tensor  # [B, K, T] bool, real tokens (up to and including EOS)
    logp_behav: Tensor  # [B, K, T] fp32, 0 off-mask
    version: Tensor  # [B, K] long, policy version of the weights that sampled each response
    logp_kept_mass: Tensor | None = None  # [B, K, T] fp32, log S of top-p per token, 0 off-mask; None: not recorded


@runtime_checkable
class RolloutEngine(Protocol):
    """Something that samples responses with its own copy of the weights (the behaviour
    policy) and accepts new weights from the trainer.

    ``version`` is the trainer step whose weights the engine holds (0 = the initial policy).
    ``state_dict`` must hold everything to restore the engine exactly (weights and version).
    ``scores_with_trainer``: the engine re-scores its samples with the trainer's model (vLLM's
    ``recompute_logp_behav``), which is exact only while the trainer still holds the engine's
    weights; the rollout queue then generates every batch of a version at that version's sync.
    """

    version: int
    scores_with_trainer: bool

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, *, seed: int
    ) -> Generation:  # prompt_ids/prompt_mask [B, P]
        """K samples per prompt (K and the sampling settings are the engine's). ``seed``
        fixes the sampling randomness, so a rollout is a function of (weights, prompts, seed)."""
        ...

    def update_weights(self, policy: torch.nn.Module, version: int) -> None:
        """Copy ``policy``'s current weights into the engine and set ``version``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
