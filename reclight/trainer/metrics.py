"""Per-step metrics of the rollout batch that are not the loss's own: degenerate samples."""

from __future__ import annotations

import torch
from torch import Tensor


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
    truncated = ~has_eos & (lengths >= max_new_tokens)
    big = torch.finfo(rewards.dtype).max
    r_max = torch.where(reward_valid, rewards, -big).amax(-1)
    r_min = torch.where(reward_valid, rewards, big).amin(-1)
    uniform = (reward_valid.sum(-1) < 2) | (r_max == r_min)  # [B]
    return {
        "response/empty_frac": empty.float().mean(),
        "response/truncated_frac": truncated.float().mean(),
        "reward/uniform_groups_frac": uniform.float().mean(),
    }


