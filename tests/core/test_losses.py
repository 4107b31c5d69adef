"""Hand-derived tests of reclight.losses (docs/algorithms.md section 2)."""

import pytest
import torch
from torch.testing import assert_close

from reclight.algorithms import PRESETS, AlgorithmConfig, get_algorithm
from reclight.advantages import group_advantages
from reclight.losses import aggregate, clip_mask, policy_loss

F64 = torch.float64


def _batch(B=3, K=4, T=5, seed=0, spread=0.5):
    """Random [B, K, T] log-probs with ratios spread around 1, mixed-sign advantages and a
    ragged mask (every sequence keeps at least one token)."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, K, T, generator=g, dtype=F64) * 3).requires_grad_()
    logp_behav = logp.detach() + spread * torch.randn(B, K, T, generator=g, dtype=F64)
    adv = torch.randn(B, K, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B, K), generator=g)
    mask = torch.arange(T) < lengths[..., None]
    return logp, logp_behav, adv, mask


# ---------------------------------------------------------------------------------------------
# Keep masks: truth tables
# ---------------------------------------------------------------------------------------------

# Ratios probed, with eps_low = eps_high = 0.2 and ring outer (0.6, 2.0):
#   0.3 < 0.4 = 1 - eps_low_outer (boundary) < 0.5 < 0.8 = 1 - eps_low (boundary) < 1.0
#   < 1.2 = 1 + eps_high (boundary) < 1.5 < 3.0 = 1 + eps_high_outer (boundary) < 3.5
RATIOS = [0.3, 1 - 0.6, 0.5, 1 - 0.2, 1.0, 1 + 0.2, 1.5, 1 + 2.0, 3.5]
# Expected keep masks per sign of A (1 keep, 0 masked), column by column as RATIOS.
TRUTH = {
    "none": {+1: [1] * 9, 0: [1] * 9, -1: [1] * 9},
    # A >= 0: keep iff rho <= 1.2;  A <= 0: keep iff rho >= 0.8;  A == 0: either -> always.
    "one_side": {
        +1: [1, 1, 1, 1, 1, 1, 0, 0, 0],
        0: [1] * 9,
        -1: [0, 0, 0, 1, 1, 1, 1, 1, 1],
    },
    # keep iff 0.8 <= rho <= 1.2 whatever the sign.
    "two_side": {s: [0, 0, 0, 1, 1, 1, 0, 0, 0] for s in (+1, 0, -1)},
    # band, plus A >= 0 with rho <= 0.4, plus A <= 0 with rho >= 3.0.
    "ring": {
        +1: [1, 1, 0, 1, 1, 1, 0, 0, 0],
        0: [1, 1, 0, 1, 1, 1, 0, 1, 1],
        -1: [0, 0, 0, 1, 1, 1, 0, 1, 1],
    },
}


@pytest.mark.parametrize("mode", list(TRUTH))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_clip_mask_truth_table(mode, dtype):
    """Each clip mode's keep mask M on every (sign of A, rho) case, boundaries inclusive:
    one_side keeps (A>=0, rho<=1+eps_high) or (A<=0, rho>=1-eps_low); two_side keeps
    1-eps_low <= rho <= 1+eps_high; ring adds (A>=0, rho<=1-eps_low_outer) and
    (A<=0, rho>=1+eps_high_outer) to the band."""
    cfg = AlgorithmConfig(clip_mode=mode)
    ratio = torch.tensor(RATIOS, dtype=dtype)
    for sign, expected in TRUTH[mode].items():
        adv = torch.full_like(ratio, float(sign))
        got = clip_mask(ratio, adv, cfg)
        assert got.tolist() == [bool(e) for e in expected], (mode, sign)


def test_clip_frac_counts_valid_tokens_only():
    """clip/frac = #(valid tokens with M = 0) / #valid tokens. One group, A = [+1, -1],
    ratios [[1.5, 1.0, 9.9], [0.5, 1.0, 9.9]] with the last token padding: one_side masks the
    1.5 of the positive and the 0.5 of the negative -> 2 of 4 valid tokens."""
    ratio = torch.tensor([[[1.5, 1.0, 9.9], [0.5, 1.0, 9.9]]])
    logp_behav = torch.zeros(1, 2, 3)
    logp = ratio.log()
    mask = torch.tensor([[[True, True, False], [True, True, False]]])
    _, m = policy_loss(logp, logp_behav, torch.tensor([[1.0, -1.0]]), mask, PRESETS["rec_oneside_nois"])
    assert m["clip/frac"].item() == pytest.approx(0.5, abs=1e-7)
    assert m["ratio/max"].item() == pytest.approx(1.5, rel=1e-6)  # 9.9 is padding
    assert m["ratio/min"].item() == pytest.approx(0.5, rel=1e-6)
    assert m["ratio/mean"].item() == pytest.approx(1.0, rel=1e-6)  # (1.5+1+0.5+1)/4
    assert m["adv/abs_mean"].item() == pytest.approx(1.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# Gradient identities
# ---------------------------------------------------------------------------------------------


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.6, 2.0), (0.1, 0.28)])
def test_is_one_side_equals_ppo_clipped_surrogate(eps):
    """IS + one_side: d/dlogp of -A*rho*M*logp (rho, M detached) equals the gradient of the
    PPO clipped surrogate -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) with rho =
    exp(logp - logp_behav) carrying gradient, both token-mean aggregated. PPO's min picks the
    unclipped (differentiable) branch exactly where M = 1, and d rho / d logp = rho."""
    eps_low, eps_high = eps
    cfg = get_algorithm("rec_oneside_is", eps_low=eps_low, eps_high=eps_high)
    logp, logp_behav, adv, mask = _batch(B=4, K=6, T=7, seed=1, spread=1.2)
    # spread 1.2 puts some negative-advantage tokens at rho > 5, where IS weights matter most.
    loss, _ = policy_loss(logp, logp_behav, adv, mask, cfg)

    rho = torch.exp(logp - logp_behav)
    a = adv[..., None]
    ppo = -torch.minimum(rho * a, rho.clamp(1 - eps_low, 1 + eps_high) * a)
    ppo_loss = (ppo * mask).sum() / mask.sum()
    # No ratio may sit exactly on a clip boundary, where PPO's subgradient is ambiguous.
    assert ((rho - (1 + eps_high)).abs() > 1e-9).all() and ((rho - (1 - eps_low)).abs() > 1e-9).all()
    g = _grad(loss, logp)
    assert_close(g, _grad(ppo_loss, logp), rtol=1e-6, atol=1e-9)
    # The IS loss value is not the PPO value (it is -A*rho*logp), only the gradient matches;
    # check the gradient is non-trivial and some tokens are clipped, so the comparison means
    # something.
    assert g.abs().sum() > 0.1 and ((g == 0) & mask).any()


@pytest.mark.parametrize("mode", ["none", "one_side", "two_side", "ring"])
def test_nois_gradient_is_minus_a_m_over_n(mode):
    """NoIS: l = -A*M*logp per token, so d loss / d logp_t = -A*M_t / N_tok on valid tokens
    and 0 on padding (token_mean)."""
    cfg = AlgorithmConfig(clip_mode=mode)
    logp, logp_behav, adv, mask = _batch(seed=2, spread=0.8)
    loss, _ = policy_loss(logp, logp_behav, adv, mask, cfg)
    rho = torch.exp(logp.detach() - logp_behav)
    m = clip_mask(rho, adv[..., None], cfg)
    expected = -adv[..., None] * (m & mask) / mask.sum()
    assert_close(_grad(loss, logp), expected, rtol=1e-12, atol=1e-15)


def test_asymre_is_reinforce_with_lowered_baseline():
    """AsymRE adds -coef*logp per token: d/dlogp = -(A + coef)/N, i.e. REINFORCE whose
    advantage is A + coef (the baseline lowered by coef)."""
    cfg = PRESETS["asymre"]
    logp, logp_behav, adv, mask = _batch(seed=3)
    loss, m = policy_loss(logp, logp_behav, adv, mask, cfg)
    ref, _ = policy_loss(logp, logp_behav, adv + cfg.regularizer_coef, mask, PRESETS["reinforce"])
    assert cfg.regularizer_coef == 0.1
    assert_close(_grad(loss, logp), _grad(ref, logp), rtol=1e-12, atol=1e-15)
    assert_close(m["loss/reg"], -0.1 * (logp.detach() * mask).sum() / mask.sum())


def test_opmd_regularizer_gradient():
    """OPMD adds coef*(logp - logp_behav)^2 per token, NOT masked by M:
    d/dlogp = (-A*M + 2*coef*(logp - logp_behav)) / N. With clip_mode none, M = 1."""
    cfg = PRESETS["opmd"]
    logp, logp_behav, adv, mask = _batch(seed=4)
    loss, m = policy_loss(logp, logp_behav, adv, mask, cfg)
    n = mask.sum()
    diff = logp.detach() - logp_behav
    expected = (-adv[..., None] + 2 * 0.1 * diff) * mask / n
    assert_close(_grad(loss, logp), expected, rtol=1e-12, atol=1e-15)
    assert_close(m["loss/reg"], 0.1 * (diff.square() * mask).sum() / n)
    assert_close(m["loss/policy"] + m["loss/reg"], loss.detach())


def test_opmd_regularizer_applies_to_clipped_tokens():
    """The regularizer sits outside the keep mask: with one_side clipping a positive-advantage
    token at rho = e^1 > 1.2 has M = 0 but still gets 2*coef*(logp - logp_behav)/N = 0.2."""
    cfg = AlgorithmConfig(clip_mode="one_side", regularizer="k2", regularizer_coef=0.1)
    logp = torch.tensor([[[0.0]], [[0.0]]], dtype=F64).reshape(1, 2, 1).requires_grad_()
    logp_behav = torch.tensor([[[-1.0], [0.0]]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0]], dtype=F64)
    mask = torch.ones(1, 2, 1, dtype=torch.bool)
    loss, m = policy_loss(logp, logp_behav, adv, mask, cfg)
    # token 0: M=0 (A>0, rho=e), reg grad 2*0.1*1/2 = 0.1; token 1: rho=1, M=1, -(-1)/2 = 0.5
    assert_close(_grad(loss, logp), torch.tensor([[[0.1], [0.5]]], dtype=F64))
    assert m["clip/frac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_red_weight_gradient(temperature):
    """RED-Weight: A~ = A*exp(A/T), so d/dlogp = -A*exp(A/T)/N (no clipping, no IS)."""
    cfg = get_algorithm("red_weight", weight_temperature=temperature)
    logp, logp_behav, adv, mask = _batch(seed=5)
    loss, _ = policy_loss(logp, logp_behav, adv, mask, cfg)
    expected = -(adv * torch.exp(adv / temperature))[..., None] * mask / mask.sum()
    assert_close(_grad(loss, logp), expected, rtol=1e-12, atol=1e-15)


def test_ratio_and_advantage_never_carry_gradient():
    """rho, logp_behav and A are detached: the IS loss's gradient w.r.t. logp_behav is None
    even when logp_behav requires grad, and changing A's graph changes nothing."""
    logp, logp_behav, adv, mask = _batch(seed=6)
    logp_behav = logp_behav.clone().requires_grad_()
    adv = adv.clone().requires_grad_()
    loss, _ = policy_loss(logp, logp_behav, adv, mask, PRESETS["rec_oneside_is"])
    g = torch.autograd.grad(loss, [logp, logp_behav, adv], allow_unused=True)
    assert g[1] is None and g[2] is None and g[0] is not None


def test_padding_garbage_does_not_leak():
    """Padding positions may hold -inf/NaN log-probs (a masked softmax) without NaN reaching
    the loss or the gradient."""
    logp, logp_behav, adv, mask = _batch(seed=7)
    behav_bad = torch.where(mask, logp_behav, torch.tensor(float("nan"), dtype=F64))
    for name in ("rec_ring_is", "opmd", "asymre", "red_weight"):
        logp_bad = torch.where(mask, logp, torch.tensor(float("-inf"), dtype=F64))
        loss, m = policy_loss(logp_bad, behav_bad, adv, mask, PRESETS[name])
        ref, _ = policy_loss(logp, logp_behav, adv, mask, PRESETS[name])
        assert_close(loss, ref)
        g = _grad(loss, logp)
        assert torch.isfinite(g).all()
        assert all(torch.isfinite(v) for v in m.values())


# ---------------------------------------------------------------------------------------------
# Aggregation and micro-batch invariance
# ---------------------------------------------------------------------------------------------


def test_aggregation_modes_by_hand():
    """Two sequences: l = [1, 2, 3] (3 valid) and [4, pad, pad] (1 valid).
    token_mean = (1+2+3+4)/4 = 2.5; seq_mean_token_mean = (6/3 + 4/1)/2 = 3;
    seq_mean_token_sum = (6 + 4)/2 = 5. A third, fully masked sequence counts nowhere."""
    per_token = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[[1, 1, 1], [1, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(2.5)
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)
    assert aggregate(per_token, mask, "seq_mean_token_sum").item() == pytest.approx(5.0)
    # Explicit global counts replace the local ones.
    assert aggregate(per_token, mask, "token_mean", num_tokens=8).item() == pytest.approx(1.25)
    assert aggregate(per_token, mask, "seq_mean_token_sum", num_seqs=5).item() == pytest.approx(2.0)


def test_aggregation_through_policy_loss():
    """REINFORCE with logp = -1 everywhere and A = [2, -1] (one group): per-token loss is
    -A*logp = A, so l = [2, 2, 2] and [-1] (1 valid token).
    token_mean = (6 - 1)/4 = 1.25; seq_mean_token_mean = (2 + -1)/2 = 0.5;
    seq_mean_token_sum = (6 - 1)/2 = 2.5."""
    logp = torch.full((1, 2, 3), -1.0)
    mask = torch.tensor([[[1, 1, 1], [1, 0, 0]]], dtype=torch.bool)
    adv = torch.tensor([[2.0, -1.0]])
    for agg, want in [("token_mean", 1.25), ("seq_mean_token_mean", 0.5), ("seq_mean_token_sum", 2.5)]:
        loss, _ = policy_loss(logp, logp, adv, mask, AlgorithmConfig(clip_mode="none", loss_agg=agg))
        assert loss.item() == pytest.approx(want, abs=1e-7), agg


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
@pytest.mark.parametrize("preset", ["rec_oneside_is", "opmd", "red_weight", "rec_ring_nois"])
def test_micro_batch_invariance(agg, preset):
    """Splitting B into micro-batches and passing the FULL batch's num_tokens / num_seqs
    makes the micro-batch losses (and gradients) sum exactly to the full-batch ones."""
    cfg = get_algorithm(preset, loss_agg=agg)
    logp, logp_behav, adv, mask = _batch(B=6, K=3, T=5, seed=8)
    full, _ = policy_loss(logp, logp_behav, adv, mask, cfg)
    g_full = _grad(full, logp)

    n_tok, n_seq = mask.sum(), mask.any(-1).sum()
    total = 0.0
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part, _ = policy_loss(
            logp[sl], logp_behav[sl], adv[sl], mask[sl], cfg, num_tokens=n_tok, num_seqs=n_seq
        )
        total = total + part
    assert_close(total, full, rtol=1e-12, atol=1e-14)
    assert_close(_grad(total, logp), g_full, rtol=1e-12, atol=1e-15)


def test_red_drop_samples_leave_the_denominator():
    """Samples dropped by RED-Drop (keep=False) are removed with mask & keep: they neither
    contribute a term nor count in the token-mean denominator. Group r = [1, 0, 0, 0]: one
    positive, three negatives; two negatives are dropped, so S = {0, j}, rbar = 0.5,
    A = [0.5, -0.5] on S. With logp = -1 and 2 tokens each, loss = (2*0.5 + 2*(-0.5))/4 = 0,
    and d/dlogp = -A/4 on the kept tokens only."""
    cfg = PRESETS["red_drop"]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=F64)
    adv, keep = group_advantages(rewards, cfg, torch.Generator().manual_seed(0))
    assert keep.sum().item() == 2 and keep[0, 0]
    logp = torch.full((1, 4, 2), -1.0, dtype=F64, requires_grad=True)
    mask = torch.ones(1, 4, 2, dtype=torch.bool) & keep[..., None]
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, cfg)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    expected = (-adv[..., None] / 4).expand(1, 4, 2) * keep[..., None]
    assert_close(_grad(loss, logp), expected)


def test_shape_errors_are_clear():
    logp = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"\[B, K, T\]"):
        policy_loss(logp, logp, torch.zeros(2, 3), torch.ones(2, 3, 5, dtype=torch.bool), PRESETS["grpo"])
    with pytest.raises(ValueError, match=r"adv must have shape \[B, K\] = \(2, 3\)"):
        policy_loss(logp, logp, torch.zeros(2, 4), torch.ones(2, 3, 4, dtype=torch.bool), PRESETS["grpo"])


def test_kl_estimate_k3_importance_weighted_by_hand():
    """kl/init's estimator. Two valid tokens and one padded one holding garbage (inf):
    logp = log[.5, .25], logp_ref = log[.25, .5], logp_behav = log[.25, .5] (rho = [2, .5]).
    d = logp_ref - logp = [-log 2, log 2], so k3 = exp(d) - d - 1
    = [0.5 + log2 - 1, 2 - log2 - 1] = [log2 - 0.5, 1 - log2].
    Unweighted token mean: ((log2 - .5) + (1 - log2)) / 2 = 0.25 exactly.
    Weighted: (2 (log2 - .5) + .5 (1 - log2)) / 2 = 0.75 log2 - 0.25.
    Gradient wrt logp of the weighted estimate: rho (1 - exp(d)) / 2 = [2 * .5, .5 * (-1)] / 2
    = [0.5, -0.25] (rho detached); the padded token gets 0.
    k1 = -d: mean 0; k2 = d^2 / 2: mean (log 2)^2 / 2."""
    import math

    from reclight.losses import kl_estimate, kl_terms

    inf = float("inf")
    logp = torch.tensor([[[math.log(0.5), math.log(0.25), inf]]], dtype=torch.float64, requires_grad=True)
    logp_ref = torch.tensor([[[math.log(0.25), math.log(0.5), -inf]]], dtype=torch.float64)
    logp_behav = torch.tensor([[[math.log(0.25), math.log(0.5), 0.0]]], dtype=torch.float64)
    mask = torch.tensor([[[True, True, False]]])
    plain = kl_estimate(logp, logp_ref, mask)
    assert plain.item() == pytest.approx(0.25, abs=1e-12)
    weighted = kl_estimate(logp, logp_ref, mask, logp_behav=logp_behav)
    assert weighted.item() == pytest.approx(0.75 * math.log(2) - 0.25, abs=1e-12)
    (grad,) = torch.autograd.grad(weighted, logp)
    assert_close(grad, torch.tensor([[[0.5, -0.25, 0.0]]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert kl_estimate(logp, logp_ref, mask, estimator="k1").item() == pytest.approx(0.0, abs=1e-12)
    assert kl_estimate(logp, logp_ref, mask, estimator="k2").item() == pytest.approx(math.log(2) ** 2 / 2, abs=1e-12)
    with pytest.raises(ValueError, match="estimator='k4' is not valid; accepted: k1, k2, k3"):
        kl_terms(logp, logp_ref, "k4")


# -- the proximal anchor and behaviour correction (docs/algorithms.md section 6.2) ---------------------------
def _decoupled_case():
    """B=1 prompt, K=2 samples, T=2 tokens, A = [+1, -1], NoIS, no clipping, token_mean (N=4).
    logp_prox - logp_behav per token: sample 0 [log 3, log 1/4], sample 1 [log 1.5, log 2], so the
    token weights are w = [[3, 1/4], [1.5, 2]] and the sequence weights 3/4 and 3. logp equals
    logp_prox (the first update of a batch), so rho = 1 against the proximal anchor."""
    import math

    logp_behav = torch.tensor([[[-1.0, -2.0], [-1.5, -0.5]]], dtype=torch.float64)
    log_w = torch.tensor([[[math.log(3), math.log(0.25)], [math.log(1.5), math.log(2.0)]]], dtype=torch.float64)
    logp_prox = logp_behav + log_w
    logp = logp_prox.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    return logp, logp_behav, logp_prox, adv, mask


@pytest.mark.parametrize("mode, level, grad, corrected", [
    # dl/dlogp_t = -A w_t M_t / 4 (l = -A w M logp, token mean over 4 tokens)
    ("none", "token", [[-0.75, -0.0625], [0.375, 0.5]], 0.0),
    ("truncate", "token", [[-0.5, -0.0625], [0.375, 0.5]], 0.25),       # 3 -> 2; 2 is not > 2
    ("mask", "token", [[0.0, 0.0], [0.375, 0.5]], 0.5),                # 3 > 2 and 1/4 < 1/2 masked
    ("none", "sequence", [[-0.1875, -0.1875], [0.75, 0.75]], 0.0),     # w = 3/4 and 3 per sequence
    ("truncate", "sequence", [[-0.1875, -0.1875], [0.5, 0.5]], 0.5),   # 3 -> 2
    ("mask", "sequence", [[-0.1875, -0.1875], [0.0, 0.0]], 0.5),       # sequence 1 (w = 3) masked
])
def test_behavior_correction_gradients_by_hand(mode, level, grad, corrected):
    logp, logp_behav, logp_prox, adv, mask = _decoupled_case()
    cfg = AlgorithmConfig(clip_mode="none", ratio_anchor="proximal", behavior_correction=mode,
                          behavior_correction_level=level, behavior_correction_cap=2.0)
    loss, m = policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox=logp_prox)
    (g,) = torch.autograd.grad(loss, logp)
    assert_close(g, torch.tensor([grad], dtype=torch.float64), rtol=0, atol=1e-12)
    assert m["mismatch/corrected_frac"].item() == pytest.approx(corrected)
    assert m["ratio/max"].item() == 1.0 and m["ratio/min"].item() == 1.0  # rho against the proximal anchor
    import math

    diffs = [math.log(3), math.log(4), math.log(1.5), math.log(2)]
    assert m["mismatch/logp_diff_mean"].item() == pytest.approx(sum(diffs) / 4)
    assert m["mismatch/logp_diff_max"].item() == pytest.approx(math.log(4))
    raw = [3, 0.25, 1.5, 2] if level == "token" else [0.75, 0.75, 3, 3]
    assert m["mismatch/weight_mean"].item() == pytest.approx(sum(raw) / 4)


def test_proximal_anchor_is_what_the_mask_and_is_factor_see():
    """One-side clip (0.2, 0.2) with IS. Against mu the first token's rho is 3 (A > 0: masked
    by the behaviour anchor), against the proximal policy rho = exp(0.1) (kept). With the
    proximal anchor: grad = -A * rho * w / N, rho = exp(logp - logp_prox) = exp(0.1) for that
    token and 1 elsewhere; w = [[3, 1/4], [1.5, 2]] (no correction)."""
    import math

    logp, logp_behav, logp_prox, adv, mask = _decoupled_case()
    shift = torch.tensor([[[0.1, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    logp = (logp_prox + shift).requires_grad_(True)
    behav = AlgorithmConfig(clip_mode="one_side", importance_sampling=True)
    _, mb = policy_loss(logp, logp_behav, adv, mask, behav)
    assert mb["clip/frac"].item() > 0  # the behaviour anchor sees rho = 3 exp(0.1) and masks it
    prox = behav.replace(ratio_anchor="proximal")
    loss, mp = policy_loss(logp, logp_behav, adv, mask, prox, logp_prox=logp_prox)
    (g,) = torch.autograd.grad(loss, logp)
    expected = -torch.tensor([[[1.0 * math.exp(0.1) * 3, 1.0 * 0.25], [-1.0 * 1.5, -1.0 * 2.0]]],
                             dtype=torch.float64) / 4
    assert mp["clip/frac"].item() == 0.0
    assert_close(g, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["none", "truncate", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_every_correction_is_a_no_op_when_logp_prox_equals_logp_behav(mode, level):
    """On-policy with the same numerics (logp_prox == logp_behav), w = 1: the decoupled loss is
    the behaviour-anchored loss, value and gradient, for every mode and level."""
    logp, logp_behav, _, adv, mask = _decoupled_case()
    logp = (logp_behav + 0.05 * torch.randn(logp_behav.shape, generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64)).requires_grad_(True)
    base = AlgorithmConfig(clip_mode="one_side", importance_sampling=True)
    loss_b, _ = policy_loss(logp, logp_behav, adv, mask, base)
    cfg = base.replace(ratio_anchor="proximal", behavior_correction=mode, behavior_correction_level=level)
    loss_p, m = policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox=logp_behav.clone())
    g_b, g_p = (torch.autograd.grad(x, logp, retain_graph=True)[0] for x in (loss_b, loss_p))
    assert_close(loss_p, loss_b, rtol=0, atol=1e-15)
    assert_close(g_p, g_b, rtol=0, atol=1e-15)
    assert m["mismatch/weight_mean"].item() == 1.0 and m["mismatch/corrected_frac"].item() == 0.0


def test_proximal_anchor_config_rules():
    with pytest.raises(ValueError, match=r"behavior_correction='mask' is not valid; accepted: 'none' with "
                                         r"ratio_anchor 'behavior'"):
        AlgorithmConfig(behavior_correction="mask")
    with pytest.raises(ValueError, match=r"behavior_correction_cap=1.0 is not valid; accepted: behavior_correction_cap > 1"):
        AlgorithmConfig(ratio_anchor="proximal", behavior_correction_cap=1.0)
    with pytest.raises(ValueError, match=r"ratio_anchor='proximal' needs logp_prox"):
        logp, logp_behav, _, adv, mask = _decoupled_case()
        policy_loss(logp, logp_behav, adv, mask, AlgorithmConfig(ratio_anchor="proximal"))


# -- the rest of the GRPO family (docs/algorithms.md sections 6.3-6.5) -----------------------------------------
def _two_tokens():
    """B=1, K=2, T=2, all valid; A = [+1, -1] (zero-mean); fp64."""
    logp = torch.tensor([[[-1.0, -2.0], [-0.5, -1.5]]], dtype=torch.float64, requires_grad=True)
    logp_behav = logp.detach().clone()
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    return logp, logp_behav, adv, torch.ones(1, 2, 2, dtype=torch.bool)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_kl_in_the_loss_gradients_by_hand(estimator, weighted):
    """d = logp_ref - logp. d/dlogp of beta * k, per token, over N = 4 tokens (token mean):
    k1 = -d -> beta; k2 = d^2/2 -> -beta d; k3 = exp(d) - d - 1 -> beta (1 - exp(d)); the
    importance-weighted term is multiplied by rho = exp(logp - logp_behav), detached. The policy
    term is switched off (A = 0) so the gradient is the KL term's alone."""
    logp, logp_behav, _, mask = _two_tokens()
    logp_behav = logp_behav + torch.tensor([[[0.3, -0.2], [0.0, 0.1]]], dtype=torch.float64)  # rho != 1
    logp_ref = logp.detach() + torch.tensor([[[0.5, -0.4], [0.2, -1.0]]], dtype=torch.float64)
    beta = 0.04
    cfg = AlgorithmConfig(clip_mode="none", kl_coef=beta, kl_estimator=estimator, kl_importance_weighted=weighted)
    loss, m = policy_loss(logp, logp_behav, torch.zeros(1, 2, dtype=torch.float64), mask, cfg, logp_ref=logp_ref)
    (g,) = torch.autograd.grad(loss, logp)
    d = logp_ref - logp.detach()
    per_tok = {"k1": torch.ones_like(d), "k2": -d, "k3": 1 - d.exp()}[estimator] * beta / 4
    if weighted:
        per_tok = per_tok * (logp.detach() - logp_behav).exp()
    assert_close(g, per_tok, rtol=0, atol=1e-14)
    k = {"k1": -d, "k2": d**2 / 2, "k3": d.exp() - d - 1}[estimator]
    assert m["kl/ref"].item() == pytest.approx(k.mean().item(), abs=1e-14)
    assert m["loss/policy"].item() == 0.0 and m["loss/kl"].item() == pytest.approx(loss.item(), abs=1e-14)


def test_kl_in_the_reward_by_hand():
    """kl_in: reward subtracts beta * sum_t (logp_behav - logp_ref) over valid tokens: sample 0
    (2 tokens): 0.1 * ((-1 - -1.5) + (-2 - -1)) = 0.1 * (0.5 - 1) = -0.05; sample 1, one valid
    token (the padded one holds garbage): 0.1 * (-0.5 - 0) = -0.05."""
    from reclight.advantages import kl_reward_penalty

    logp_behav = torch.tensor([[[-1.0, -2.0], [-0.5, float("nan")]]])
    logp_ref = torch.tensor([[[-1.5, -1.0], [0.0, 3.0]]])
    mask = torch.tensor([[[True, True], [True, False]]])
    assert_close(kl_reward_penalty(logp_behav, logp_ref, mask, 0.1), torch.tensor([[-0.05, -0.05]]), rtol=0, atol=1e-7)


def test_entropy_bonus_gradient_by_hand():
    """-entropy_coef * H_t per token, token mean over 3 valid tokens: dL/dH_t = -c / 3 on valid
    tokens, 0 on the padded one; the loss term is -c * mean H."""
    logp = torch.zeros(1, 2, 2, dtype=torch.float64, requires_grad=True)
    ent = torch.tensor([[[1.0, 2.0], [3.0, 9.0]]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[[True, True], [True, False]]])
    cfg = AlgorithmConfig(clip_mode="none", entropy_coef=0.01)
    loss, m = policy_loss(logp, logp.detach(), torch.zeros(1, 2, dtype=torch.float64), mask, cfg, entropy=ent)
    (g,) = torch.autograd.grad(loss, ent)
    assert_close(g, torch.tensor([[[-0.01 / 3, -0.01 / 3], [-0.01 / 3, 0.0]]], dtype=torch.float64), rtol=0, atol=1e-15)
    assert m["loss/entropy"].item() == pytest.approx(-0.01 * 2.0)


def test_clipped_is_weight_and_dual_clip_by_hand():
    """Three tokens of one sample with A = +1 and three with A = -1 (K = 2, T = 3), rho =
    [0.5, 1.5, 4.0] in both. CISPO's is_clip [0.2, 0.2] makes the IS factor [0.8, 1.2, 1.2]
    and keeps every token: grad = -A w / 6. Dual clip c = 3 with one-side IS (0.2, 0.2):
    A > 0 keeps rho <= 1.2 (tokens 1, 2: weights rho), A < 0 keeps rho >= 0.8 and rho <= 3
    (token 2 only: rho 1.5; token 3 has rho 4 > 3: masked by the dual clip)."""
    import math

    rho = torch.tensor([0.5, 1.5, 4.0], dtype=torch.float64).log()
    logp_behav = torch.tensor([[[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]]], dtype=torch.float64)
    logp = (logp_behav + rho).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, 3, dtype=torch.bool)
    cispo = AlgorithmConfig(clip_mode="none", importance_sampling=True, is_clip=(0.2, 0.2))
    loss, m = policy_loss(logp, logp_behav, adv, mask, cispo)
    (g,) = torch.autograd.grad(loss, logp)
    w = torch.tensor([0.8, 1.2, 1.2], dtype=torch.float64)
    assert_close(g, torch.stack([-w, w])[None] / 6, rtol=0, atol=1e-14)
    assert m["clip/frac"].item() == 0.0
    dual = AlgorithmConfig(clip_mode="one_side", importance_sampling=True, dual_clip=3.0)
    loss, m = policy_loss(logp, logp_behav, adv, mask, dual)
    (g,) = torch.autograd.grad(loss, logp)
    r = [0.5, 1.5, 4.0]
    expected = torch.tensor([[[-r[0] / 6, 0.0, 0.0], [0.0, r[1] / 6, 0.0]]], dtype=torch.float64)
    assert_close(g, expected, rtol=0, atol=1e-14)
    plain = AlgorithmConfig(clip_mode="one_side", importance_sampling=True)
    (g_plain,) = torch.autograd.grad(policy_loss(logp, logp_behav, adv, mask, plain)[0], logp)
    assert g_plain[0, 1, 2].item() == pytest.approx(r[2] / 6) and not math.isclose(g_plain[0, 1, 2].item(), 0.0)


def test_constant_normalizer_dr_grpo_by_hand():
    """seq_mean_token_sum_norm: sum(l) / (N_all * L). K = 2 samples of lengths 3 and 1 (+ a
    third sample dropped by RED-Drop: still counted in N_all = 3), L = 8: d loss / d logp_t =
    -A / 24 on every valid token, whatever the lengths. num_samples = 6 with L = 4 (a batch's
    counts passed to one piece of it) gives the same normalizer, 24."""
    logp = torch.zeros(1, 3, 3, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[0.5, -0.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[[True, True, True], [True, False, False], [False, False, False]]])
    cfg = AlgorithmConfig(clip_mode="none", loss_agg="seq_mean_token_sum_norm")
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, cfg, norm_length=8)
    (g,) = torch.autograd.grad(loss, logp)
    expected = torch.tensor([[[-0.5, -0.5, -0.5], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64) / 24
    assert_close(g, expected, rtol=0, atol=1e-15)
    loss2, _ = policy_loss(logp, logp.detach(), adv, mask, cfg.replace(norm_length=4), num_samples=6)
    assert_close(torch.autograd.grad(loss2, logp)[0], expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="needs norm_length"):
        policy_loss(logp, logp.detach(), adv, mask, cfg)


def test_gspo_gradient_equals_an_independent_sequence_level_clipped_surrogate():
    """GSPO (Zheng et al. 2025), written here independently: s_i = exp(mean_t (logp - logp_old))
    WITH gradient, J = mean_i min(s_i A_i, clip(s_i, 1 - 3e-4, 1 + 4e-4) A_i). Its autograd
    gradient equals policy_loss's with the gspo preset (detached rho_i x the per-token logp,
    sequence-mean aggregation) for random sequences of different lengths, some clipped."""
    g = torch.Generator().manual_seed(3)
    B, K, T = 3, 4, 5
    logp_old = -torch.rand(B, K, T, generator=g, dtype=torch.float64) * 3
    logp = (logp_old + (torch.rand(B, K, T, generator=g, dtype=torch.float64) - 0.5) * 4e-3).requires_grad_(True)
    lengths = torch.randint(1, T + 1, (B, K), generator=g)
    mask = torch.arange(T) < lengths[..., None]
    adv = torch.randn(B, K, generator=g, dtype=torch.float64)
    cfg = PRESETS["gspo"]
    loss, m = policy_loss(logp, logp_old, adv, mask, cfg)
    (ours,) = torch.autograd.grad(loss, logp)

    diff = torch.where(mask, logp - logp_old, 0.0)
    s = (diff.sum(-1) / mask.sum(-1)).exp()  # [B, K], with gradient
    surrogate = torch.minimum(s * adv, s.clamp(1 - 3e-4, 1 + 4e-4) * adv)
    (ref,) = torch.autograd.grad(-surrogate.mean(), logp)
    assert 0 < m["clip/frac"].item() < 1  # some sequences clipped, some not: both branches tested
    assert_close(ours, ref, rtol=1e-9, atol=1e-12)
