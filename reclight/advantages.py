"""Group-relative advantages, with RED-Drop (docs/algorithms.md section 1).

Departures from the textbook, listed up front:

- Ties count as positives in RED-Drop, and "tie" is decided up to a few ulps of the group's
  reward scale: the float mean of three equal rewards 0.1 is 0.10000000000000002, and without
  the tolerance every sample of such a group would count as negative.
- A group whose (kept, valid) rewards are all equal gets A = 0 *exactly*, also under
  ``std_normalize`` (where the textbook formula gives (tiny)/(0 + 1e-6), a spurious non-zero).
- Samples marked invalid (``valid=False``, e.g. a reward function that raised) take no part in
  the baseline and get ``keep=False``; callers drop them from the loss like RED-Drop's drops.

Imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reclight.algorithms import MIN_GROUP_SIZE, AlgorithmConfig

STD_EPS = 1e-6


def _masked_mean(x: Tensor, w: Tensor) -> Tensor:
    """Mean of ``x`` over the last axis where ``w`` is true; 0 where nothing is. [B, K] -> [B, 1]"""
    n = w.sum(-1, keepdim=True)
    return torch.where(w, x, 0.0).sum(-1, keepdim=True) / n.clamp(min=1)


def balance_drop(
    rewards: Tensor,  # [B, K]
    valid: Tensor,  # [B, K] bool
    generator: torch.Generator | None = None,
) -> Tensor:  # [B, K] bool: kept
    """RED-Drop's kept set S per group.

    Positives are r_i >= rbar (rbar the mean over the group's valid samples; ties positive),
    negatives the rest. When #neg > #pos, (#neg - #pos) negatives chosen uniformly at random
    (with ``generator``) are dropped, so every group keeps #neg == #pos. Invalid samples are
    never kept.
    """
    rbar = _masked_mean(rewards, valid)
    scale = torch.where(valid, rewards.abs(), 0.0).amax(-1, keepdim=True).clamp(min=1.0)
    tol = 8 * torch.finfo(rewards.dtype).eps * scale
    pos = valid & (rewards - rbar >= -tol)
    neg = valid & ~pos
    n_drop = (neg.sum(-1) - pos.sum(-1)).clamp(min=0)  # [B]
    # A uniformly random subset of n_drop negatives: the n_drop smallest of iid uniform keys.
    keys = torch.rand(rewards.shape, generator=generator, device=rewards.device)
    keys = torch.where(neg, keys, 2.0)  # non-negatives sort last, never dropped
    rank = keys.argsort(-1).argsort(-1)  # rank of each sample's key within its group
    dropped = neg & (rank < n_drop[:, None])
    return valid & ~dropped


def uniform_groups(rewards: Tensor, valid: Tensor) -> Tensor:  # [B, K], [B, K] bool -> [B] bool
    """Groups whose valid rewards are all equal (or that have fewer than 2 valid rewards): their
    group-relative advantages are exactly 0, so they carry no policy gradient."""
    r_max = torch.where(valid, rewards, -torch.inf).amax(-1)
    r_min = torch.where(valid, rewards, torch.inf).amin(-1)
    return (valid.sum(-1) < 2) | (r_max <= r_min)


def kl_reward_penalty(
    logp_behav: Tensor,  # [B, K, T]
    logp_ref: Tensor,  # [B, K, T]
    mask: Tensor,  # [B, K, T] bool
    kl_coef: float,
) -> Tensor:  # [B, K]
    """``kl_in: reward`` (docs/algorithms.md section 6.3): beta * sum_t (logp_behav - logp_ref) over each
    sequence's valid tokens, the k1 estimate of KL(mu || ref) on the sample, to SUBTRACT from the
    reward before the group advantages (no gradient flows through it)."""
    return kl_coef * torch.where(mask.bool(), logp_behav.detach() - logp_ref.detach(), 0.0).sum(-1)


def overlong_penalty(lengths: Tensor, length: int, cache: int) -> Tensor:  # [B, K] -> [B, K]
    """DAPO's soft overlong punishment, added to the reward (docs/algorithms.md section 6.6)::

        0                      if |y| <= L - C
        ((L - C) - |y|) / C    if L - C < |y| <= L      (from 0 down to -1, linearly)
        -1                     if |y| > L

    Followed: DAPO's reward shaping as in verl's ``verl/workers/reward_manager/dapo.py``
    (``overlong_buffer``: expected length L - C, penalty factor 1); reclight states the third
    region (|y| > L, which an engine capped at L cannot produce) explicitly."""
    y = lengths.to(torch.float64)
    pen = ((length - cache) - y) / cache
    out = torch.where(y <= length - cache, 0.0, torch.where(y <= length, pen, -1.0))
    return out.to(torch.get_default_dtype())


def truncated_responses(
    response_ids: Tensor,  # [B, K, T] long
    response_mask: Tensor,  # [B, K, T] bool
    eos_ids: list[int],
    max_new_tokens: int,
) -> Tensor:  # [B, K] bool
    """Responses cut at ``max_new_tokens`` without an end token (DAPO's "overlong" samples)."""
    has_eos = (torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)) & response_mask).any(-1)
    return ~has_eos & (response_mask.sum(-1) >= max_new_tokens)


def shape_rewards(
    rewards: Tensor,  # [B, K]
    valid: Tensor,  # [B, K] bool: the reward function returned a usable number
    lengths: Tensor,  # [B, K] response lengths in tokens
    truncated: Tensor,  # [B, K] bool: cut at max_new_tokens without an end token
    cfg: AlgorithmConfig,
    *,
    max_new_tokens: int,
    logp_behav: Tensor | None = None,  # [B, K, T]: needed with kl_coef > 0 and kl_in "reward"
    logp_ref: Tensor | None = None,  # [B, K, T]
    mask: Tensor | None = None,  # [B, K, T] bool
) -> tuple[Tensor, Tensor]:  # rewards [B, K], keep [B, K] bool
    """The algorithm's reward shaping before the group advantages (docs/algorithms.md sections
    6.3, 6.6), the one place the trainer and the bench both take it from:

    1. ``overlong_penalty`` (DAPO): r_i += the soft penalty of |y_i| against (L, C) (L defaults to
       ``max_new_tokens``), on valid samples only;
    2. ``kl_coef > 0`` with ``kl_in: reward``: r_i -= beta * sum_t (logp_behav - logp_ref);
    3. ``overlong_filter``: ``keep`` is False for truncated samples. The caller ANDs it into
       :func:`group_advantages`' own ``keep`` AFTER the advantages: a truncated sample still counts
       in its group's baseline (as DAPO does), it only leaves the loss.

    Everything else passes through unchanged (no shaping: ``(rewards, all True)``)."""
    keep = torch.ones_like(valid, dtype=torch.bool)
    if cfg.overlong_penalty:
        length, cache = cfg.overlong_bounds(max_new_tokens)
        rewards = rewards + torch.where(valid, overlong_penalty(lengths, length, cache).to(rewards), 0.0)
    if cfg.kl_coef > 0 and cfg.kl_in == "reward":
        if logp_behav is None or logp_ref is None or mask is None:
            raise ValueError("kl_in='reward' with kl_coef > 0 needs logp_behav, logp_ref and mask [B, K, T]; accepted: "
                             "pass all three")
        rewards = rewards - kl_reward_penalty(logp_behav, logp_ref, mask, cfg.kl_coef)
    if cfg.overlong_filter:
        keep = keep & ~truncated.bool()
    return rewards, keep


def group_advantages(
    rewards: Tensor,  # [B, K]
    cfg: AlgorithmConfig,
    generator: torch.Generator | None = None,
    *,
    valid: Tensor | None = None,  # [B, K] bool
) -> tuple[Tensor, Tensor]:  # adv [B, K], keep [B, K] bool
    """Group-relative advantages.

    With S the kept set of a group (all valid samples, or RED-Drop's balanced subset when
    ``cfg.drop == "balance"``)::

        rbar  = mean_{i in S} r_i
        A_i   = r_i - rbar                                   (std_normalize=False)
        A_i   = (r_i - rbar) / (sigma_S + 1e-6)              (std_normalize=True, GRPO)
        sigma_S = sqrt(mean_{i in S} (r_i - rbar)^2)         (population std)

    and A_i = 0, keep_i = False for i not in S. Groups whose kept rewards are all equal get
    A = 0 exactly.

    Args:
        rewards: float rewards, one row per prompt group. Must be finite where ``valid``.
        cfg: the algorithm; reads ``std_normalize``, ``drop`` and ``filter_uniform_groups``
            (groups whose valid rewards are all equal, or with fewer than 2 valid rewards, get
            ``keep = False`` for every sample).
        generator: seeds RED-Drop's random choice (must live on ``rewards.device``).
        valid: samples allowed in the baseline (default: all). Non-finite rewards must be
            marked invalid here; they are an error otherwise.

    Returns:
        ``(adv, keep)``. Callers exclude ``~keep`` samples from the loss entirely
        (``mask & keep[..., None]``).
    """
    if rewards.dim() != 2 or rewards.shape[-1] < MIN_GROUP_SIZE:
        raise ValueError(
            f"rewards must have shape [B, K] with K >= {MIN_GROUP_SIZE} (group-relative "
            f"baseline); got shape {tuple(rewards.shape)}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    if valid.shape != rewards.shape:
        raise ValueError(
            f"valid must have the shape of rewards {tuple(rewards.shape)}; got {tuple(valid.shape)}"
        )
    bad = valid & ~torch.isfinite(rewards)
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"rewards{list(idx)}={rewards[idx].item()} is not finite; accepted: finite rewards "
            "(mark failed samples with valid=False to exclude them)"
        )
    rewards = torch.where(valid, rewards, 0.0)

    keep = balance_drop(rewards, valid, generator) if cfg.drop == "balance" else valid
    if cfg.filter_uniform_groups:  # DAPO's dynamic sampling: uniform groups leave the loss and the counts
        keep = keep & ~uniform_groups(rewards, valid)[:, None]
    rbar = _masked_mean(rewards, keep)
    centered = torch.where(keep, rewards - rbar, 0.0)
    if cfg.std_normalize:
        sigma = _masked_mean(centered.square(), keep).sqrt()
        centered = centered / (sigma + STD_EPS)
    all_equal = uniform_groups(rewards, keep)[:, None]  # also true for groups with 0 or 1 kept samples
    adv = torch.where(all_equal, 0.0, centered)
    return adv, keep
