"""Per-step metrics of the rollout batch that are not the loss's own: rewards, lengths, entropy,
staleness, degenerate samples, rollout throughput."""

from __future__ import annotations

import torch
from torch import Tensor

from reclight.advantages import truncated_responses, uniform_groups
from reclight.rollout.batch import RolloutBatch


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




@torch.no_grad()
def batch_metrics(batch: RolloutBatch, entropy: Tensor, eos_ids: list[int], max_new_tokens: int) -> dict[str, Tensor]:
    """The step's metrics of its rollout batch (``entropy`` [B, K, T]: the policy's per-token
    entropy from the update's forward): reward and accuracy of the valid samples, response
    lengths, entropy, staleness (step - the version of each sample's oldest token), the degenerate
    samples of :func:`rollout_health`, DAPO's informative fraction, the rollout's tokens/s, and
    whatever the rollout path measured itself (``batch.metrics``: the asynchronous schedule's)."""
    m = batch.response_mask
    n_tok = m.sum().clamp(min=1)
    staleness = (batch.step - batch.version).float()
    valid = batch.reward_valid
    out = {
        "reward/mean": (batch.rewards * valid).sum() / valid.sum().clamp(min=1),
        "reward/acc": batch.correct.float().mean(),
        "reward/failed": (~valid).sum().float(),
        "response/len_mean": m.sum(-1).float().mean(),
        "response/len_max": m.sum(-1).float().max(),
        "policy/entropy": (entropy * m).sum() / n_tok,
        "rollout/staleness_mean": staleness.mean(),
        "rollout/staleness_max": staleness.max(),
        **rollout_health(batch.response_ids, m, batch.rewards, valid, eos_ids, max_new_tokens),
        **({"data/informative_frac": torch.tensor(batch.informative_groups / batch.sampled_groups)}
           if batch.sampled_groups else {}),
        "throughput/rollout_tok_s": n_tok / max(batch.gen_seconds, 1e-9),
    }
    out.update({k: torch.tensor(float(v)) for k, v in (batch.metrics or {}).items()})
    return out
