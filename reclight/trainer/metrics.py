"""Per-step metrics of the rollout batch that are not the loss's own: degenerate samples."""

from __future__ import annotations

import torch
from torch import Tensor

from reclight.advantages import uniform_groups


@torch.no_grad()
def truncated_responses(
    response_ids: Tensor,  # [B, K, T] long
    response_mask: Tensor,  # [B, K, T] bool
    eos_ids: list[int],
    max_new_tokens: int,
) -> Tensor:  # [B, K] bool
    """Responses cut at ``max_new_tokens`` without an end token (DAPO's "overlong" samples)."""
    has_eos = (torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)) & response_mask).any(-1)
    return ~has_eos & (response_mask.sum(-1) >= max_new_tokens)


@torch.no_grad()
def rollout_health(
    response_ids: Tensor,  # [B, K, T] long
    response_mask: Tensor,  # [B, K, T] bool
    rewards: Tensor,  # [B, K]
    reward_valid: Tensor,  # [B, K] bool
    eos_ids: list[int],
    max_new_tokens: int,
) -> dict[str, Tensor]:
    """Fractions of degenerate samples in a rollout batch (all trained on as they are):

    - ``response/empty_frac``: responses with no token besides a final EOS (the EOS token still
      gets the sample's advantage: ending at once is a choice the policy made);
    - ``response/truncated_frac``: responses that hit ``max_new_tokens`` without an EOS (cut off;
      the task scores the cut text, usually as wrong);
    - ``reward/uniform_groups_frac``: groups whose valid rewards are all equal (or that have fewer
      than 2 valid rewards): their advantages are exactly 0, so only a regularizer moves them.
    """
    lengths = response_mask.sum(-1)  # [B, K]
    eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)) & response_mask
    has_eos = eos.any(-1)  # [B, K]
    empty = (lengths - has_eos.long()) <= 0
    truncated = truncated_responses(response_ids, response_mask, eos_ids, max_new_tokens)
    uniform = uniform_groups(rewards, reward_valid)  # [B]
    return {
        "response/empty_frac": empty.float().mean(),
        "response/truncated_frac": truncated.float().mean(),
        "reward/uniform_groups_frac": uniform.float().mean(),
    }


