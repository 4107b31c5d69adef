"""The REC / REP / RED policy loss (docs/algorithms.md section 2).

Per token (b, k, t), with A = adv[b, k] broadcast over t::

    rho = exp(logp - logp_anchor)                   detached: never carries gradient
    M   = clip_mask(rho, A)                         zeroes gradient, never clamps values
    A~  = A * (rho if importance_sampling) * (exp(A / T) if RED-Weight) * (w if proximal)
    l   = -A~ * M * logp + R                        R = regularizer, NOT masked by M

then aggregated over valid tokens by ``cfg.loss_agg``. The anchor is ``logp_behav`` (the
paper), or with ``ratio_anchor: proximal`` (section 6.2) ``logp_prox``, the trainer's own
log-probs at the start of the step, and w = pi_t / mu the (corrected) behaviour weight of
:func:`behavior_weight`. The regularizers keep measuring against mu (``logp_behav``).

Departures from the textbook PPO/GRPO loss, listed up front:

- "Clipping" is a keep mask on the REINFORCE term, not a clamp of the ratio. With
  ``importance_sampling=True`` the gradient equals the PPO clipped surrogate's
  -min(rho*A, clip(rho)*A) (tested), so the IS presets ARE GRPO/PPO.
- The regularizer is added outside the mask: a clipped token still feels OPMD's pull.
- Sequences with no valid token (RED-Drop drops, failed rewards) do not count in any
  denominator, so they do not dilute the loss.
- Padding positions may hold any value (even inf/NaN log-probs): they are zeroed before use.
- The rollout corrections of section 6.8 (ICEPOP's band, the geometric sequence mask, the token
  veto, OPSM) reject by M = 0: a rejected token or sequence keeps its place in every denominator
  (as AReaL, TRL, SkyRL and NeMo-RL do; verl's mask mode removes it), so the trainer's counts,
  fixed before the loss, stay exact and micro-batches still sum to the batch.

Imports only torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reclight.algorithms import KL_ESTIMATORS, AlgorithmConfig


def clip_mask(
    ratio: Tensor,  # [...], rho = pi_theta / mu
    adv: Tensor,  # [...], broadcastable to ratio
    cfg: AlgorithmConfig,
) -> Tensor:  # [...] bool, True = keep gradient
    """The REC keep mask M::

        none:     M = 1
        one_side: M = (A >= 0 and rho <= 1 + eps_high) or (A <= 0 and rho >= 1 - eps_low)
        two_side: M = 1 - eps_low <= rho <= 1 + eps_high
        ring:     M = two_side or (A >= 0 and rho <= 1 - eps_low_outer)
                              or (A <= 0 and rho >= 1 + eps_high_outer)

    Boundaries are inclusive (rho == 1 + eps_high keeps its gradient).
    """
    shape = torch.broadcast_shapes(ratio.shape, adv.shape)
    if cfg.clip_mode == "none":
        return torch.ones(shape, dtype=torch.bool, device=ratio.device)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    good, bad = adv >= 0, adv <= 0
    if cfg.clip_mode == "one_side":
        return (good & (ratio <= hi)) | (bad & (ratio >= lo))
    band = (ratio >= lo) & (ratio <= hi)
    if cfg.clip_mode == "two_side":
        return band.expand(shape)
    # ring
    return (
        band
        | (good & (ratio <= 1.0 - cfg.eps_low_outer))
        | (bad & (ratio >= 1.0 + cfg.eps_high_outer))
    )


def aggregate(
    per_token: Tensor,  # [B, K, T], already zero where ~mask
    mask: Tensor,  # [B, K, T] bool
    loss_agg: str,
    *,
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
    num_samples: Tensor | float | None = None,
    norm_length: int | None = None,
) -> Tensor:  # scalar
    """Reduce a per-token loss over valid tokens::

        token_mean:              sum_{b,k,t} l / N_tok
        seq_mean_token_mean:     sum_{b,k} (sum_t l / |y_bk|) / N_seq
        seq_mean_token_sum:      sum_{b,k} (sum_t l) / N_seq
        seq_mean_token_sum_norm: sum_{b,k,t} l / (N_all * L)            (Dr. GRPO)

    N_tok defaults to the number of valid tokens, N_seq to the number of sequences with at
    least one valid token, N_all (``num_samples``) to ALL B * K sequences (before any drop or
    filter), L (``norm_length``) is a fixed constant: no term of that normalizer depends on the
    sampled lengths. Passing the full batch's counts makes micro-batch losses sum exactly to the
    full-batch loss. Length bias: ``token_mean`` weights every token equally (long responses weigh
    more); ``seq_mean_token_mean`` weights every sequence equally; ``seq_mean_token_sum`` and
    ``seq_mean_token_sum_norm`` scale with length (the REINFORCE sum over a trajectory).
    Followed for the last: TRL's ``loss_type="dr_grpo"`` (``trl/trainer/grpo_trainer.py``: the
    masked sum over the local batch divided by batch size x ``max_completion_length``);
    reclight differs in taking N_all over the whole batch (all ranks, all micro-batches).
    """
    if loss_agg == "token_mean":
        n = mask.sum() if num_tokens is None else num_tokens
        return per_token.sum() / torch.as_tensor(n, dtype=per_token.dtype).clamp(min=1)
    if loss_agg == "seq_mean_token_sum_norm":
        if norm_length is None:
            raise ValueError("loss_agg='seq_mean_token_sum_norm' needs norm_length (L, e.g. max_new_tokens); "
                             "accepted: an integer >= 1")
        n = mask.shape[0] * mask.shape[1] if num_samples is None else num_samples
        return per_token.sum() / (torch.as_tensor(n, dtype=per_token.dtype).clamp(min=1) * norm_length)
    seq_len = mask.sum(-1)  # [B, K]
    n = (seq_len > 0).sum() if num_seqs is None else num_seqs
    n = torch.as_tensor(n, dtype=per_token.dtype).clamp(min=1)
    seq_sum = per_token.sum(-1)
    if loss_agg == "seq_mean_token_mean":
        return (seq_sum / seq_len.clamp(min=1)).sum() / n
    if loss_agg == "seq_mean_token_sum":
        return seq_sum.sum() / n
    raise ValueError(f"loss_agg={loss_agg!r} is not valid")


def kl_terms(
    logp: Tensor,  # [...], log pi_theta
    logp_ref: Tensor,  # [...], log pi_ref of the same tokens
    estimator: str = "k3",
) -> Tensor:  # [...]
    """Schulman's per-token estimators of KL(pi_theta || pi_ref) from tokens sampled from
    pi_theta, with d = logp_ref - logp::

        k1 = -d                 unbiased, high variance, can be negative
        k2 = d^2 / 2            biased, low variance
        k3 = exp(d) - d - 1     unbiased, low variance, always >= 0

    Gradients flow through ``logp`` (and ``logp_ref`` if it has them)."""
    d = logp_ref - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"estimator={estimator!r} is not valid; accepted: {', '.join(KL_ESTIMATORS)}")


def kl_estimate(
    logp: Tensor,  # [B, K, T], log pi_theta of the sampled tokens
    logp_ref: Tensor,  # [B, K, T]
    mask: Tensor,  # [B, K, T] bool
    *,
    logp_behav: Tensor | None = None,  # [B, K, T]: the tokens were sampled from mu, not pi_theta
    estimator: str = "k3",
) -> Tensor:  # scalar
    """Token-mean over ``mask`` of ``kl_terms(logp, logp_ref, estimator)``; with
    ``logp_behav`` each term is importance-weighted by rho = pi_theta / mu (detached), which
    turns an average over tokens sampled from mu into an estimate under pi_theta. This is the
    trainer's ``kl/init`` (pi_ref = the policy at the start of RL, k3, weighted by rho)::

        kl/init = sum_{valid} rho * (exp(d) - d - 1) / N_valid,   d = logp_ref - logp

    Padding positions may hold any value: they are zeroed before use."""
    mask = mask.bool()
    terms = kl_terms(torch.where(mask, logp, 0.0), torch.where(mask, logp_ref, 0.0), estimator)
    if logp_behav is not None:
        terms = terms * torch.where(mask, logp.detach() - logp_behav, 0.0).exp()
    return torch.where(mask, terms, 0.0).sum() / mask.sum().clamp(min=1)


def behavior_weight(
    logp_prox: Tensor,  # [B, K, T], log pi_theta_t (the trainer at the start of the step)
    logp_behav: Tensor,  # [B, K, T], log mu
    mask: Tensor,  # [B, K, T] bool
    cfg: AlgorithmConfig,
) -> tuple[Tensor, Tensor, Tensor]:  # weight [B, K, T], keep [B, K, T] bool, corrected [B, K, T] bool
    """The behaviour correction of the decoupled objective (docs/algorithms.md section 6.2), detached::

        token:    w_t = exp(logp_prox_t - logp_behav_t)
        sequence: w   = exp(sum_t (logp_prox_t - logp_behav_t)) for every token of the sequence
        none:     A~ *= w
        truncate: A~ *= min(w, C)                                   (TIS)
        mask:     M = 0 where w > C or w < F, else A~ *= w          (MIS; ICEPOP with its own floor)

    F = ``behavior_correction_floor`` (null: 1/C, the symmetric band).

    Returns the factor on the advantage, the keep mask of ``mask`` mode (all true otherwise) and
    the tokens the correction changed (truncated or masked), for ``mismatch/corrected_frac``.
    Comparisons with the cap are made in log space, so a sequence weight that overflows fp32
    still truncates to C or is masked (never inf * 0).

    Followed: AReaL's ``areal/utils/functional.py::ppo_actor_loss_fn`` (``behav_imp_weight_cap``:
    weights above the cap are dropped) and verl's ``verl/trainer/ppo/rollout_corr_helper.py``
    (token / sequence levels; truncation; rejection below ``1/threshold`` and above it). reclight
    differs: the mask is two-sided (AReaL's drops only w > C), and the sequence weight is the plain
    product of token ratios, without verl's exp(+-20) safety clamp (truncate and mask are exact in
    log space; with ``none`` a huge sequence weight is the user's choice and the non-finite-step
    guard catches an overflow). The floor F is ICEPOP's lower bound (NeMo-RL's
    ``nemo_rl/algorithms/loss/loss_functions.py``, ``truncated_importance_sampling_type: icepop``:
    w kept inside [min, max], zero outside), the same band at the ``sequence`` level."""
    log_w = torch.where(mask, logp_prox.detach() - logp_behav.detach(), 0.0)
    if cfg.behavior_correction_level == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
    log_cap = torch.log(torch.tensor(cfg.behavior_correction_cap, dtype=log_w.dtype, device=log_w.device))
    keep = torch.ones_like(mask, dtype=torch.bool)
    if cfg.behavior_correction == "truncate":
        corrected = mask & (log_w > log_cap)
        weight = torch.where(corrected, cfg.behavior_correction_cap, log_w.exp())
    elif cfg.behavior_correction == "mask":
        floor = cfg.behavior_correction_floor
        log_floor = -log_cap if floor is None else torch.log(log_w.new_tensor(floor))
        keep = (log_w <= log_cap) & (log_w >= log_floor)
        corrected = mask & ~keep
        weight = torch.where(keep, log_w, 0.0).exp()
    else:
        corrected = torch.zeros_like(keep)
        weight = log_w.exp()
    return weight, keep, corrected


def sequence_log_ratio(
    log_ratio: Tensor,  # [B, K, T], zero off-mask
    mask: Tensor,  # [B, K, T] bool
) -> Tensor:  # [B, K, T]
    """GSPO's length-normalised sequence log-ratio, broadcast to every token of the sequence:
    mean over the sequence's valid tokens of (logp - logp_anchor)."""
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    return (log_ratio.sum(-1, keepdim=True) / n).expand_as(log_ratio)


def _log_bound(x: float | None, missing: float) -> float:
    """log of a band edge for comparisons in log space: log 0 = -inf, no bound = ``missing``."""
    if x is None:
        return missing
    return math.log(x) if x > 0 else -math.inf


def rollout_rejections(
    logp: Tensor,  # [B, K, T], log pi_theta of the sampled tokens (detached here)
    logp_behav: Tensor,  # [B, K, T], log mu (the truncated distribution's with truncation_correction)
    adv: Tensor,  # [B, K, 1] or [B, K, T], the advantage of each token's sequence
    mask: Tensor,  # [B, K, T] bool
    cfg: AlgorithmConfig,
    logp_prox: Tensor | None = None,  # [B, K, T], log pi_t: the rule ratio's reference with the proximal anchor
) -> dict[str, Tensor]:  # rule -> [B, K, T] bool, the valid tokens it rejects
    """The whole-sequence rules of docs/algorithms.md section 6.8, each as the valid tokens it
    rejects (every token of a rejected sequence). With ``ratio_anchor: proximal`` the behaviour
    ratio is w_t = pi_t / mu (fixed within a step); with ``behavior`` it is pi_theta / mu, detached
    and recomputed at every update (verl's bypass mode; at a batch's first update the two agree)::

        geo_mask   [lo, hi]   reject i if mean_t log w_t < log lo or > log hi       (SkyRL: geometric)
        token_veto [lo, hi]   reject i if some t has log w_t < log lo or > log hi   (SkyRL: outlier tokens)
        opsm       delta      reject i if A_i < 0 and mean_t (log mu - log pi_theta) > delta   (DeepSeek-V3.2)

    Means are over the sequence's valid tokens; comparisons are made in log space, boundaries kept
    (a sequence whose mean log-ratio equals log lo, as the tensor's dtype rounds it, is kept; OPSM
    keeps A = 0 and a mean equal to delta). OPSM always measures mu against the current pi_theta,
    whatever the anchor, as DeepSeek-V3.2 and its peers define it.

    Followed: SkyRL's ``skyrl/backends/skyrl_train/utils/off_policy_correction_utils.py``
    (``compute_sequence_mask`` with ``geometric``, ``compute_outlier_token_mask``), verl's
    ``verl/trainer/ppo/rollout_corr_helper.py`` (``compute_rollout_rejection_mask``, ``seq_mean_k1``:
    its band bounds the mean of log(mu / pi), i.e. [a, b] there is [1/b, 1/a] here), TRL's
    ``trl/trainer/grpo_trainer.py`` (``get_off_policy_mask``). reclight differs: no exp(+-20) clamp
    (the comparisons are in log space, exact for any ratio), and OPSM's decision is per sequence by
    construction (its advantage is per sequence; slime's ``compute_opsm_mask`` reads a per-token sign)."""
    out: dict[str, Tensor] = {}
    logp = logp.detach()
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    if cfg.geo_mask is not None or cfg.token_veto is not None:
        ref = logp_prox.detach() if cfg.needs_proximal else logp
        log_w = torch.where(mask, ref - logp_behav, 0.0)
    if cfg.geo_mask is not None:
        low, high = cfg.geo_mask
        geo = log_w.sum(-1, keepdim=True) / n  # [B, K, 1], log of the geometric-mean ratio
        out["geo_mask"] = mask & ((geo < _log_bound(low, -math.inf)) | (geo > _log_bound(high, math.inf)))
    if cfg.token_veto is not None:
        low, high = cfg.token_veto
        outlier = mask & ((log_w < _log_bound(low, -math.inf)) | (log_w > _log_bound(high, math.inf)))
        out["token_veto"] = mask & outlier.any(-1, keepdim=True)
    if cfg.opsm_threshold is not None:
        kl = torch.where(mask, logp_behav - logp, 0.0).sum(-1, keepdim=True) / n  # k1 of KL(mu || pi_theta) per token
        out["opsm"] = mask & (adv < 0) & (kl > cfg.opsm_threshold)
    return out


def effective_sample_size(
    log_w: Tensor,  # [...], log of the importance weights
    valid: Tensor,  # [...] bool, the entries that count
) -> Tensor:  # scalar in (0, 1]
    """Normalised effective sample size of the weights w over the valid entries::

        ESS = (sum w)^2 / (n sum w^2)                  1: all equal; 1/n: one weight carries all

    computed in log space (exp(2 LSE(log w) - LSE(2 log w)) / n), so a sequence weight that
    overflows float32 still counts; 1 when nothing is valid. Followed: verl's
    ``compute_rs_metrics`` (``rollout_rs_eff_sample_size`` = 1 / mean((w / mean w)^2), the same
    number); reclight differs in not clamping w to the rejection band first."""
    lw = torch.where(valid, log_w, -torch.inf).flatten()
    n = valid.sum().to(lw.dtype)
    ess = torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0) - torch.log(n.clamp(min=1)))
    return torch.where(n > 0, ess.clamp(max=1.0), torch.ones_like(ess))


def policy_loss(
    logp: Tensor,  # [B, K, T], log pi_theta of the response tokens, with grad
    logp_behav: Tensor,  # [B, K, T], log mu recorded at sampling time
    adv: Tensor,  # [B, K]
    mask: Tensor,  # [B, K, T] bool, valid response tokens (and kept samples)
    cfg: AlgorithmConfig,
    *,
    logp_prox: Tensor | None = None,  # [B, K, T], log pi_theta_t: needed by ratio_anchor "proximal"
    logp_ref: Tensor | None = None,  # [B, K, T], log pi_ref: needed by kl_coef > 0 with kl_in "loss"
    entropy: Tensor | None = None,  # [B, K, T], H of pi_theta per position, with grad: entropy_coef > 0
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
    num_samples: Tensor | float | None = None,
    norm_length: int | None = None,
    logp_kept_mass: Tensor | None = None,  # [B, K, T], log S of top-p at each token: truncation_correction
) -> tuple[Tensor, dict[str, Tensor]]:
    """The REC/REP/RED loss of docs/algorithms.md section 2 (see the module docstring), with the
    GRPO-family knobs of section 6: the ratio anchor (6.2), the reference KL and the entropy
    bonus (6.3), the sequence-level ratio, the clipped IS weight and the dual clip (6.4), the
    constant normalizer (6.5), the rollout corrections (6.8).

    Per token, with rho against the anchor (token level, or GSPO's sequence level)::

        M   = clip_mask(rho, A) and not (dual_clip and A < 0 and rho > c) [and MIS's keep]
              [and not rejected by geo_mask, token_veto, opsm: :func:`rollout_rejections`]
        A~  = A * IS * RED-Weight * w_behav,   IS = rho, or clamp(rho, 1 - lo, 1 + hi) (is_clip)
        l   = -A~ M logp  +  R  +  beta k(logp, logp_ref) (x rho_mu if kl_importance_weighted)
              -  entropy_coef H

    (R, the KL and the entropy terms are not masked by M.) A token or sequence that a rule rejects
    gets M = 0 and keeps its place in every denominator (section 6.8). With
    ``truncation_correction`` every use of mu reads log mu = logp_behav - log S.

    Args:
        logp, logp_behav, adv, mask: see shapes above. ``logp_behav`` and ``adv`` are
            detached here. Pass ``mask & keep[..., None]`` to drop RED-Drop's samples.
        cfg: the algorithm.
        logp_prox: the trainer's own log-probs of the sampled tokens at the start of the step
            (before its first update, no grad). ``ratio_anchor: proximal`` measures rho against
            it and weights the advantage by :func:`behavior_weight`; then ``mismatch/*`` metrics
            are returned too.
        logp_ref: the reference policy's log-probs (no grad), for ``kl_coef > 0`` in the loss.
        entropy: the per-position entropy of pi_theta WITH its gradient, for ``entropy_coef > 0``.
        num_tokens, num_seqs, num_samples: the full batch's counts (valid tokens, sequences with a
            valid token, all sequences) when this call sees one micro-batch or one data-parallel
            rank (so the pieces sum to the full-batch loss).
        norm_length: L of ``seq_mean_token_sum_norm`` when ``cfg.norm_length`` is None.
        logp_kept_mass: log S per token, S the probability mass top-p kept where the token was
            sampled (``RolloutBatch.logp_kept_mass``), for ``truncation_correction``.

    Returns:
        ``(loss, metrics)``; ``loss`` is the scalar to backpropagate, and ``metrics`` holds
        detached scalars: ``loss/policy``, ``loss/reg``, ``loss/kl``, ``loss/entropy`` (the terms,
        which sum to ``loss``), ``clip/frac`` (valid tokens with M = 0), ``ratio/mean``,
        ``ratio/max``, ``ratio/min`` (over valid tokens) and ``adv/abs_mean`` (over sequences with a
        valid token); with ``logp_ref``: ``kl/ref`` (token mean of the estimator, without beta);
        with ``logp_prox``: ``mismatch/logp_diff_mean``, ``mismatch/logp_diff_max``
        (|logp_behav - logp_prox| over valid tokens), ``mismatch/weight_mean`` (w before
        correction), ``mismatch/corrected_frac`` (valid tokens truncated or masked),
        ``mismatch/kl_k1`` and ``mismatch/kl_k3`` (token means of the k1 and k3 estimates of
        KL(mu || pi_t) on the samples) and ``mismatch/ess`` (:func:`effective_sample_size` of w at
        ``behavior_correction_level``); with a rejection rule on (the behaviour-weight mask, geo_mask,
        token_veto, opsm): ``mismatch/<rule>_tok_frac`` and ``mismatch/<rule>_seq_frac`` (valid
        tokens, and sequences with a valid token, that the rule rejects; rule ``mis``, ``geo_mask``,
        ``token_veto``, ``opsm``) and ``mismatch/reject_tok_frac``, ``mismatch/reject_seq_frac`` (by
        any of them).
    """
    if not (logp.shape == logp_behav.shape == mask.shape) or logp.dim() != 3:
        raise ValueError(
            "logp, logp_behav and mask must share one [B, K, T] shape; got "
            f"{tuple(logp.shape)}, {tuple(logp_behav.shape)}, {tuple(mask.shape)}"
        )
    if adv.shape != logp.shape[:2]:
        raise ValueError(f"adv must have shape [B, K] = {tuple(logp.shape[:2])}; got {tuple(adv.shape)}")
    for name, t, needed, why in (
        ("logp_prox", logp_prox, cfg.needs_proximal, "ratio_anchor='proximal'"),
        ("logp_ref", logp_ref, cfg.kl_coef > 0 and cfg.kl_in == "loss", "kl_coef > 0 with kl_in='loss'"),
        ("entropy", entropy, cfg.entropy_coef > 0, "entropy_coef > 0"),
        ("logp_kept_mass", logp_kept_mass, cfg.truncation_correction, "truncation_correction=True"),
    ):
        if needed and t is None:
            raise ValueError(f"AlgorithmConfig {why} needs {name}; accepted: pass {name} [B, K, T]")
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must have the [B, K, T] shape {tuple(logp.shape)}; got {tuple(t.shape)}")
    mask = mask.bool()
    logp_behav = logp_behav.detach()
    if cfg.truncation_correction:  # top-p sampled pi / S on the kept set: log mu = log pi - log S
        logp_behav = logp_behav - torch.where(mask, logp_kept_mass.detach(), 0.0)
    adv_tok = adv.detach()[..., None].to(logp.dtype)  # [B, K, 1]
    anchor = logp_prox.detach() if cfg.needs_proximal else logp_behav

    # Padding may hold garbage (inf - inf = NaN); zero it before exp().
    log_ratio = torch.where(mask, logp.detach() - anchor, 0.0)
    if cfg.ratio_level == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, mask)
    ratio = log_ratio.exp()
    keep = clip_mask(ratio, adv_tok, cfg)
    if cfg.dual_clip is not None:
        keep = keep & ~((adv_tok < 0) & (ratio > cfg.dual_clip))

    weight = torch.ones_like(ratio)
    if cfg.importance_sampling:
        weight = weight * (ratio if cfg.is_clip is None else ratio.clamp(1.0 - cfg.is_clip[0], 1.0 + cfg.is_clip[1]))
    if cfg.advantage_weighting == "exp":
        weight = weight * torch.exp(adv_tok / cfg.weight_temperature)
    if cfg.needs_proximal:
        w_behav, keep_behav, corrected = behavior_weight(logp_prox, logp_behav, mask, cfg)
        weight = weight * w_behav
        keep = keep & keep_behav
    rejected = rollout_rejections(logp, logp_behav, adv_tok, mask, cfg, logp_prox) if cfg.rejects_sequences else {}
    for rule in rejected.values():
        keep = keep & ~rule
    coef = torch.where(mask & keep, adv_tok * weight, 0.0)
    logp_valid = torch.where(mask, logp, 0.0)
    terms = {"loss/policy": -coef * logp_valid}

    if cfg.regularizer == "k2":
        terms["loss/reg"] = cfg.regularizer_coef * torch.where(mask, logp - logp_behav, 0.0).square()
    elif cfg.regularizer == "forward_kl":
        terms["loss/reg"] = -cfg.regularizer_coef * logp_valid
    kl_tok = None
    if logp_ref is not None:
        kl_tok = torch.where(mask, kl_terms(logp_valid, torch.where(mask, logp_ref.detach(), 0.0), cfg.kl_estimator), 0.0)
    if cfg.kl_coef > 0 and cfg.kl_in == "loss":
        kl_loss = cfg.kl_coef * kl_tok
        if cfg.kl_importance_weighted:  # rho against mu, per token: the estimate is then under pi_theta
            kl_loss = kl_loss * torch.where(mask, logp.detach() - logp_behav, 0.0).exp()
        terms["loss/kl"] = kl_loss
    if cfg.entropy_coef > 0:
        terms["loss/entropy"] = -cfg.entropy_coef * torch.where(mask, entropy, 0.0)

    counts = dict(num_tokens=num_tokens, num_seqs=num_seqs, num_samples=num_samples,
                  norm_length=cfg.norm_length or norm_length)
    parts = {k: aggregate(v, mask, cfg.loss_agg, **counts) for k, v in terms.items()}
    loss = sum(parts.values())

    with torch.no_grad():
        n_valid = mask.sum().clamp(min=1)
        has_tok = mask.any(-1)
        zero = loss.detach().new_zeros(())
        metrics = {
            **{k: parts.get(k, zero).detach() for k in ("loss/policy", "loss/reg", "loss/kl", "loss/entropy")},
            "clip/frac": (mask & ~keep).sum() / n_valid,
            "ratio/mean": torch.where(mask, ratio, 0.0).sum() / n_valid,
            "ratio/max": torch.where(mask, ratio, -torch.inf).amax().clamp(min=0.0),
            "ratio/min": torch.where(mask, ratio, torch.inf).amin().clamp(max=1e30),
            "adv/abs_mean": (adv.detach().abs() * has_tok).sum() / has_tok.sum().clamp(min=1),
        }
        if kl_tok is not None:
            metrics["kl/ref"] = kl_tok.sum() / n_valid
        if logp_prox is not None:
            diff = torch.where(mask, (logp_behav - logp_prox.detach()).abs(), 0.0)
            metrics["mismatch/logp_diff_mean"] = diff.sum() / n_valid
            metrics["mismatch/logp_diff_max"] = diff.amax()
            w_raw = torch.where(mask, logp_prox.detach() - logp_behav, 0.0)
            if cfg.behavior_correction_level == "sequence":
                w_raw = w_raw.sum(-1, keepdim=True).expand_as(w_raw)
            metrics["mismatch/weight_mean"] = torch.where(mask, w_raw.exp(), 0.0).sum() / n_valid
            if cfg.needs_proximal:
                metrics["mismatch/corrected_frac"] = corrected.sum() / n_valid
            log_w = torch.where(mask, logp_prox.detach() - logp_behav, 0.0)  # log pi_t / mu
            metrics["mismatch/kl_k1"] = -log_w.sum() / n_valid
            metrics["mismatch/kl_k3"] = torch.where(mask, torch.expm1(log_w) - log_w, 0.0).sum() / n_valid
            if cfg.behavior_correction_level == "sequence":
                metrics["mismatch/ess"] = effective_sample_size(log_w.sum(-1), has_tok)
            else:
                metrics["mismatch/ess"] = effective_sample_size(log_w, mask)
        if cfg.needs_proximal and cfg.behavior_correction == "mask":
            rejected = {"mis": corrected, **rejected}
        if rejected:
            n_seq = has_tok.sum().clamp(min=1)
            for rule, r in {**rejected, "reject": torch.stack(list(rejected.values())).any(0)}.items():
                metrics[f"mismatch/{rule}_tok_frac"] = r.sum() / n_valid
                metrics[f"mismatch/{rule}_seq_frac"] = r.any(-1).sum() / n_seq
    return loss, metrics
