"""Hand-derived tests of the rollout corrections of docs/algorithms.md section 6.8: ICEPOP's band
(the behaviour-weight mask with its own floor), the geometric sequence mask, the token veto, OPSM,
the truncated-sampling correction, their denominators, the mismatch diagnostics and the config
errors. Every case is float64 with log-ratios built so that the boundary comparisons are exact."""

import math

import pytest
import torch
from torch.func import vmap
from torch.testing import assert_close

from reclight.algorithms import PRESETS, AlgorithmConfig, get_algorithm
from reclight.losses import effective_sample_size, policy_loss, rollout_rejections

F64 = torch.float64
LOG = math.log


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


def _t(rows):
    return torch.tensor([rows], dtype=F64)


# -- ICEPOP: the behaviour-weight mask with a floor ------------------------------------------------
def _weights_case(w):
    """B = 1, K = 2, T = 2, A = [+1, -1]; logp_behav = 0 and logp_prox = log w exactly, so the log
    weight IS log w (x - 0.0 = x); logp = logp_prox (a batch's first update: rho = 1)."""
    logp_prox = torch.log(torch.tensor([w], dtype=F64))
    logp_behav = torch.zeros_like(logp_prox)
    logp = logp_prox.clone().requires_grad_(True)
    return logp, logp_behav, logp_prox, torch.tensor([[1.0, -1.0]], dtype=F64), torch.ones(1, 2, 2, dtype=torch.bool)


@pytest.mark.parametrize("floor, grad, masked", [
    # band [0.5, 5]: 0.5 and 5 sit on its edges (kept), 0.4999 and 5.0001 just outside (masked).
    # dl/dlogp = -A w M / 4: sample 0 (A = +1) [-0.5/4, 0], sample 1 (A = -1) [+5/4, 0].
    (0.5, [[-0.125, 0.0], [1.25, 0.0]], 0.5),
    # floor null: the symmetric band [1/5, 5] keeps 0.4999 (weight 0.4999).
    (None, [[-0.125, -0.4999 / 4], [1.25, 0.0]], 0.25),
    # floor 0: no lower edge at all.
    (0.0, [[-0.125, -0.4999 / 4], [1.25, 0.0]], 0.25),
])
def test_icepop_band_edges_and_gradient(floor, grad, masked):
    logp, logp_behav, logp_prox, adv, mask = _weights_case([[0.5, 0.4999], [5.0, 5.0001]])
    cfg = AlgorithmConfig(clip_mode="none", ratio_anchor="proximal", behavior_correction="mask",
                          behavior_correction_cap=5.0, behavior_correction_floor=floor)
    loss, m = policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox=logp_prox)
    assert_close(_grad(loss, logp), _t(grad), rtol=0, atol=1e-15)
    assert m["mismatch/corrected_frac"].item() == pytest.approx(masked)
    assert m["mismatch/mis_tok_frac"].item() == pytest.approx(masked)
    assert m["mismatch/mis_seq_frac"].item() == pytest.approx(1.0 if masked == 0.5 else 0.5)
    assert m["clip/frac"].item() == pytest.approx(masked)  # every mask counts in clip/frac


def test_icepop_floor_at_sequence_level():
    """Sequence weights W = product: sample 0 [0.5, 0.9] -> 0.45 < 0.5 (masked although its first
    token sits on the floor), sample 1 [5, 1] -> 5 on the cap (kept). dl/dlogp = -A W M / 4: sample 0
    zero, sample 1 +5/4 on both tokens."""
    logp, logp_behav, logp_prox, adv, mask = _weights_case([[0.5, 0.9], [5.0, 1.0]])
    cfg = AlgorithmConfig(clip_mode="none", ratio_anchor="proximal", behavior_correction="mask",
                          behavior_correction_level="sequence", behavior_correction_cap=5.0,
                          behavior_correction_floor=0.5)
    loss, m = policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox=logp_prox)
    assert_close(_grad(loss, logp), _t([[0.0, 0.0], [1.25, 1.25]]), rtol=0, atol=1e-12)
    assert m["mismatch/mis_seq_frac"].item() == 0.5 and m["mismatch/mis_tok_frac"].item() == 0.5


def test_icepop_with_the_behaviour_anchor_is_two_side_is_clipping():
    """No new mechanism is needed there: against mu, ICEPOP's band [lo, hi] on w = pi_theta / mu
    times w is two_side clipping with importance sampling and (eps_low, eps_high) = (1 - lo, hi - 1):
    both give dl/dlogp = -A rho 1[lo <= rho <= hi] / N (checked on random ratios)."""
    g = torch.Generator().manual_seed(0)
    logp_behav = -torch.rand(2, 3, 4, generator=g, dtype=F64) * 3
    logp = (logp_behav + 0.6 * torch.randn(2, 3, 4, generator=g, dtype=F64)).requires_grad_(True)
    adv = torch.randn(2, 3, generator=g, dtype=F64)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    loss, _ = policy_loss(logp, logp_behav, adv, mask, get_algorithm("rec_twoside_is", eps_low=0.5, eps_high=1.0))
    rho = (logp.detach() - logp_behav).exp()
    band = (rho >= 0.5) & (rho <= 2.0)
    assert 0 < band.sum() < band.numel()
    assert_close(_grad(loss, logp), -adv[..., None] * rho * band / 24, rtol=1e-12, atol=1e-15)


# -- the geometric sequence mask ---------------------------------------------------------------------
def _geo_case():
    """B = 1, K = 6, T = 2, A = +1 everywhere, logp_behav = 0 and logp_prox = log w per token:

        seq 0 [.99, .99]               mean log w = log .99 exactly (2a / 2 = a): on the lower edge, kept
        seq 1 [.99 e^-1e-6] * 2        just below: rejected, both tokens
        seq 2 [1.01, 1.01]             on the upper edge: kept
        seq 3 [1.01 e^1e-6] * 2        just above: rejected
        seq 4 [0.5, 2]                 mean log w = 0: kept, however far its tokens are (geometric mean)
        seq 5 [1.01, pad]              one valid token (padding holds NaN): kept
    """
    lw = [[LOG(0.99)] * 2, [LOG(0.99) - 1e-6] * 2, [LOG(1.01)] * 2, [LOG(1.01) + 1e-6] * 2,
          [LOG(0.5), -LOG(0.5)], [LOG(1.01), 0.0]]
    logp_prox = torch.tensor([lw], dtype=F64)
    mask = torch.ones(1, 6, 2, dtype=torch.bool)
    mask[0, 5, 1] = False
    logp_behav = torch.zeros_like(logp_prox).masked_fill(~mask, float("nan"))
    return logp_prox, logp_behav, torch.ones(1, 6, dtype=F64), mask


def test_geo_mask_edges_whole_sequences_and_denominator():
    """Proximal anchor, no behaviour weight beyond w (correction none), NoIS, no clip, token_mean:
    dl/dlogp_t = -A w_t M_t / N with N = 11 valid tokens, the rejected ones INCLUDED (they keep
    their place in the denominator); M = 0 on both tokens of sequences 1 and 3."""
    logp_prox, logp_behav, adv, mask = _geo_case()
    logp = logp_prox.clone().requires_grad_(True)
    cfg = AlgorithmConfig(clip_mode="none", ratio_anchor="proximal", geo_mask=(0.99, 1.01))
    loss, m = policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox=logp_prox)
    w = torch.where(mask, logp_prox, 0.0).exp()
    keep = torch.tensor([[[1, 1], [0, 0], [1, 1], [0, 0], [1, 1], [1, 0]]], dtype=torch.bool)
    assert_close(_grad(loss, logp), torch.where(keep, -w / 11, 0.0), rtol=0, atol=1e-15)
    assert_close(loss, (torch.where(keep, -w * logp_prox, 0.0)).sum() / 11, rtol=0, atol=1e-15)
    assert m["mismatch/geo_mask_tok_frac"].item() == pytest.approx(4 / 11)
    assert m["mismatch/geo_mask_seq_frac"].item() == pytest.approx(2 / 6)
    assert m["mismatch/reject_seq_frac"].item() == pytest.approx(2 / 6)
    assert all(torch.isfinite(v) for v in m.values())


def test_geo_mask_with_the_behaviour_anchor_reads_pi_theta_over_mu():
    """With ratio_anchor behavior the rule ratio is pi_theta / mu (verl's bypass mode), not pi_t / mu:
    logp = logp_behav + 0.1 on sequence 0 (geo mean e^0.1 > 1.01: rejected) whatever logp_prox says."""
    logp_behav = torch.zeros(1, 2, 2, dtype=F64)
    logp = torch.tensor([[[0.1, 0.1], [0.0, 0.0]]], dtype=F64, requires_grad=True)
    adv, mask = torch.tensor([[1.0, -1.0]], dtype=F64), torch.ones(1, 2, 2, dtype=torch.bool)
    cfg = AlgorithmConfig(clip_mode="none", geo_mask=(0.99, 1.01))
    loss, m = policy_loss(logp, logp_behav, adv, mask, cfg)
    assert_close(_grad(loss, logp), _t([[0.0, 0.0], [0.25, 0.25]]), rtol=0, atol=1e-15)
    rules = rollout_rejections(logp, logp_behav, adv[..., None], mask, cfg.replace(ratio_anchor="proximal"),
                               logp_prox=logp_behav)  # against pi_t = mu: nothing rejected
    assert not rules["geo_mask"].any()


def test_geo_mask_is_verls_seq_mean_k1_with_inverted_bounds():
    """verl's seq_mean_k1 keeps a sequence when log a <= mean_t (log mu - log pi) <= log b; here
    that is geo_mask [1/b, 1/a]. Same decision on random sequences away from the edges."""
    g = torch.Generator().manual_seed(1)
    logp_behav = -torch.rand(4, 8, 5, generator=g, dtype=F64)
    logp_prox = logp_behav + 0.02 * torch.randn(4, 8, 5, generator=g, dtype=F64)
    mask = torch.ones(4, 8, 5, dtype=torch.bool)
    a, b = 0.995, 1.004
    k1_mean = (logp_behav - logp_prox).mean(-1)
    verl_keep = (k1_mean >= LOG(a)) & (k1_mean <= LOG(b))
    cfg = AlgorithmConfig(ratio_anchor="proximal", geo_mask=(1 / b, 1 / a))
    rules = rollout_rejections(logp_prox, logp_behav, torch.ones(4, 8, 1, dtype=F64), mask, cfg, logp_prox)
    assert 0 < verl_keep.sum() < verl_keep.numel()
    assert torch.equal(~rules["geo_mask"][..., 0], verl_keep)


# -- the token veto ----------------------------------------------------------------------------------
@pytest.mark.parametrize("veto, keep", [
    # tokens per sequence (w): [0.5, 1], [0.4999, 1], [1, 2], [1, 2.0001]
    ((0.5, 2.0), [1, 0, 1, 0]),
    ((0.5, None), [1, 0, 1, 1]),     # no upper bound: 2.0001 passes
    ((None, 2.0), [1, 1, 1, 0]),     # no lower bound (verl's old veto was the lower one alone)
])
def test_token_veto_rejects_whole_sequences(veto, keep):
    """One token past a bound rejects its whole sequence; bounds are kept (0.5 and 2 pass). Proximal
    anchor, correction none, NoIS, A = +1: dl/dlogp = -w M / 8 (N = 8 valid tokens)."""
    w = [[0.5, 1.0], [0.4999, 1.0], [1.0, 2.0], [1.0, 2.0001]]
    logp_prox = torch.log(torch.tensor([w], dtype=F64))
    logp_behav = torch.zeros_like(logp_prox)
    logp = logp_prox.clone().requires_grad_(True)
    cfg = AlgorithmConfig(clip_mode="none", ratio_anchor="proximal", token_veto=veto)
    loss, m = policy_loss(logp, logp_behav, torch.ones(1, 4, dtype=F64), torch.ones(1, 4, 2, dtype=torch.bool),
                          cfg, logp_prox=logp_prox)
    kept = torch.tensor(keep, dtype=torch.bool)[None, :, None].expand(1, 4, 2)
    assert_close(_grad(loss, logp), torch.where(kept, -torch.tensor([w], dtype=F64) / 8, 0.0), rtol=0, atol=1e-15)
    assert m["mismatch/token_veto_seq_frac"].item() == pytest.approx(keep.count(0) / 4)
    assert m["mismatch/token_veto_tok_frac"].item() == pytest.approx(keep.count(0) * 2 / 8)


# -- OPSM --------------------------------------------------------------------------------------------
def test_opsm_drops_whole_negative_sequences_by_their_mean_kl():
    """delta = 0.25, behaviour anchor (NoIS, no clip). logp = 0 (the current policy), so the per-token
    k1 = logp_behav - logp = logp_behav; its mean over each sequence decides, never a single token:

        seq 0  A = -1  k1 [0.75, -0.5]   mean 0.125 <= delta       kept (one token exceeds delta)
        seq 1  A = -1  k1 [0.5, 0.0]     mean 0.25 == delta        kept (strict >)
        seq 2  A = -1  k1 [0.5, 0.25]    mean 0.375 > delta        BOTH tokens dropped (0.25 <= delta too)
        seq 3  A = +2  k1 [4.0, 4.0]     positive advantage        kept
        seq 4  A = 0   k1 [4.0, 4.0]     A = 0 is not negative     kept

    dl/dlogp = -A M / 10 (N = 10 valid tokens, the dropped ones included)."""
    logp_behav = torch.tensor([[[0.75, -0.5], [0.5, 0.0], [0.5, 0.25], [4.0, 4.0], [4.0, 4.0]]], dtype=F64)
    logp = torch.zeros_like(logp_behav, requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0, -1.0, 2.0, 0.0]], dtype=F64)
    mask = torch.ones(1, 5, 2, dtype=torch.bool)
    cfg = AlgorithmConfig(clip_mode="none", opsm_threshold=0.25)
    loss, m = policy_loss(logp, logp_behav, adv, mask, cfg)
    expected = torch.tensor([[[0.1, 0.1], [0.1, 0.1], [0.0, 0.0], [-0.2, -0.2], [0.0, 0.0]]], dtype=F64)
    assert_close(_grad(loss, logp), expected, rtol=0, atol=1e-15)
    assert m["mismatch/opsm_seq_frac"].item() == pytest.approx(1 / 5)
    assert m["mismatch/opsm_tok_frac"].item() == pytest.approx(2 / 10)


def test_opsm_measures_mu_against_the_current_policy_whatever_the_anchor():
    """With the proximal anchor OPSM still reads log mu - log pi_theta (the current, detached logp),
    not log mu - log pi_t: here pi_t = mu (KL 0) but pi_theta moved 1 nat away, so the negative
    sequence goes; the rule ratio of geo_mask / token_veto would read pi_t instead."""
    logp_behav = torch.zeros(1, 2, 2, dtype=F64)
    logp = torch.full((1, 2, 2), -1.0, dtype=F64)
    adv, mask = torch.tensor([[1.0, -1.0]], dtype=F64), torch.ones(1, 2, 2, dtype=torch.bool)
    cfg = AlgorithmConfig(ratio_anchor="proximal", opsm_threshold=0.5)
    rules = rollout_rejections(logp, logp_behav, adv[..., None], mask, cfg, logp_prox=logp_behav)
    assert rules["opsm"].tolist() == [[[False, False], [True, True]]]


# -- denominators and micro-batches ------------------------------------------------------------------
@pytest.mark.parametrize("agg, expected", [
    # per-token loss -A*logp with logp = -1, A = +1: l = 1 per kept token, 0 per rejected one.
    # 3 sequences of 2 tokens, sequence 1 rejected by the veto:
    ("token_mean", 4 / 6),                  # the rejected tokens stay in N_tok = 6
    ("seq_mean_token_mean", (1 + 0 + 1) / 3),  # the rejected sequence stays in N_seq = 3 (and |y| = 2)
    ("seq_mean_token_sum", (2 + 0 + 2) / 3),
])
def test_rejected_tokens_keep_their_place_in_every_denominator(agg, expected):
    logp = torch.full((1, 3, 2), -1.0, dtype=F64)
    logp_behav = logp.clone()
    logp_behav[0, 1, 0] = 4.0  # w = pi / mu = e^-5 < 0.01 on one token of sequence 1: vetoed
    cfg = AlgorithmConfig(clip_mode="none", loss_agg=agg, token_veto=(0.01, None))
    loss, _ = policy_loss(logp, logp_behav, torch.ones(1, 3, dtype=F64), torch.ones(1, 3, 2, dtype=torch.bool), cfg)
    assert loss.item() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("preset", ["icepop", "geo_mask", "opsm"])
def test_micro_batches_sum_to_the_batch_with_every_rule(preset):
    """Every rule decides per sequence (per token for ICEPOP): micro-batches of whole groups with
    the batch's counts give exactly the batch's loss and gradient."""
    g = torch.Generator().manual_seed(2)
    B, K, T = 6, 3, 5
    logp_behav = -torch.rand(B, K, T, generator=g, dtype=F64) * 3
    logp_prox = logp_behav + 0.03 * torch.randn(B, K, T, generator=g, dtype=F64)
    logp = (logp_prox + 0.03 * torch.randn(B, K, T, generator=g, dtype=F64)).requires_grad_(True)
    adv = torch.randn(B, K, generator=g, dtype=F64)
    mask = torch.arange(T) < torch.randint(1, T + 1, (B, K), generator=g)[..., None]
    cfg = PRESETS[preset] if preset != "icepop" else PRESETS[preset].replace(behavior_correction_floor=0.97,
                                                                             behavior_correction_cap=1.03)
    full, m = policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox=logp_prox)
    assert 0 < m["mismatch/reject_tok_frac"] < 1  # the rule acts on part of the batch
    n_tok, n_seq = mask.sum(), mask.any(-1).sum()
    total = sum(policy_loss(logp[sl], logp_behav[sl], adv[sl], mask[sl], cfg, logp_prox=logp_prox[sl],
                            num_tokens=n_tok, num_seqs=n_seq)[0] for sl in (slice(0, 1), slice(1, 4), slice(4, 6)))
    assert_close(total, full, rtol=1e-12, atol=1e-14)
    assert_close(_grad(total, logp), _grad(full, logp), rtol=1e-12, atol=1e-15)


# -- every rule is a no-op on-policy -----------------------------------------------------------------
@pytest.mark.parametrize("extra", [dict(geo_mask=(0.99, 1.01)), dict(token_veto=(0.9, 1.1)), dict(opsm_threshold=0.0),
                                   dict(behavior_correction="mask", behavior_correction_floor=0.9)])
def test_rules_change_nothing_when_mu_equals_pi(extra):
    """logp = logp_prox = logp_behav (on-policy, same numerics): w = 1 and KL = 0, so every rule keeps
    every sequence and the loss and gradient are the base's, bitwise."""
    g = torch.Generator().manual_seed(3)
    logp_behav = -torch.rand(2, 4, 3, generator=g, dtype=F64)
    logp = logp_behav.clone().requires_grad_(True)
    adv, mask = torch.randn(2, 4, generator=g, dtype=F64), torch.ones(2, 4, 3, dtype=torch.bool)
    base = PRESETS["decoupled_tis"]
    cfg = base.replace(**extra)
    ref, _ = policy_loss(logp, logp_behav, adv, mask, base, logp_prox=logp_behav)
    out, m = policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox=logp_behav)
    assert torch.equal(out, ref) and torch.equal(_grad(out, logp), _grad(ref, logp))
    assert m["mismatch/reject_tok_frac"].item() == 0.0


def test_the_default_path_computes_nothing_new():
    """With none of the new knobs, the metrics are exactly the ones before section 6.8 (no new
    work); the proximal path adds only the three diagnostics."""
    g = torch.Generator().manual_seed(4)
    logp_behav = -torch.rand(2, 2, 3, generator=g, dtype=F64)
    logp, adv, mask = logp_behav + 0.1, torch.randn(2, 2, generator=g, dtype=F64), torch.ones(2, 2, 3, dtype=torch.bool)
    base_keys = {"loss/policy", "loss/reg", "loss/kl", "loss/entropy", "clip/frac", "ratio/mean", "ratio/max",
                 "ratio/min", "adv/abs_mean"}
    _, m = policy_loss(logp, logp_behav, adv, mask, AlgorithmConfig())
    assert set(m) == base_keys
    _, m = policy_loss(logp, logp_behav, adv, mask, PRESETS["decoupled_tis"], logp_prox=logp)
    old = {"mismatch/logp_diff_mean", "mismatch/logp_diff_max", "mismatch/weight_mean", "mismatch/corrected_frac"}
    assert set(m) == base_keys | old | {"mismatch/kl_k1", "mismatch/kl_k3", "mismatch/ess"}


def test_every_rule_runs_under_vmap():
    """The bench vmaps policy_loss over its rows: every rule and diagnostic is vmap-safe."""
    g = torch.Generator().manual_seed(5)
    logp_behav = -torch.rand(3, 2, 4, 5, generator=g, dtype=F64)
    logp_prox = logp_behav + 0.05 * torch.randn(3, 2, 4, 5, generator=g, dtype=F64)
    adv, mask = torch.randn(3, 2, 4, generator=g, dtype=F64), torch.ones(3, 2, 4, 5, dtype=torch.bool)
    cfg = PRESETS["icepop"].replace(geo_mask=(0.9, 1.1), token_veto=(0.8, None), opsm_threshold=0.0)
    loss, m = vmap(lambda lp, lb, a, mk, lx: policy_loss(lp, lb, a, mk, cfg, logp_prox=lx))(
        logp_prox, logp_behav, adv, mask, logp_prox)
    for i in range(3):
        one, mi = policy_loss(logp_prox[i], logp_behav[i], adv[i], mask[i], cfg, logp_prox=logp_prox[i])
        assert_close(loss[i], one, rtol=1e-12, atol=1e-15)
        assert_close(m["mismatch/reject_seq_frac"][i], mi["mismatch/reject_seq_frac"])


# -- the truncated-sampling correction ---------------------------------------------------------------
def test_truncation_correction_by_hand():
    """Top-p sampled from pi / S on the kept set: log mu = logp_behav - log S. Proximal anchor,
    correction none, NoIS, logp = logp_prox = logp_behav (the engine and trainer agree on pi): the
    token weight is w = pi_t / mu = S, so dl/dlogp = -A S / 4. S = [[0.9, 0.5], [1.0, 0.8]]."""
    logp_behav = torch.tensor([[[-1.0, -2.0], [-0.5, -0.25]]], dtype=F64)
    logp = logp_behav.clone().requires_grad_(True)
    log_s = torch.log(torch.tensor([[[0.9, 0.5], [1.0, 0.8]]], dtype=F64))
    adv, mask = torch.tensor([[1.0, -1.0]], dtype=F64), torch.ones(1, 2, 2, dtype=torch.bool)
    cfg = AlgorithmConfig(clip_mode="none", ratio_anchor="proximal", truncation_correction=True)
    loss, m = policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox=logp_behav, logp_kept_mass=log_s)
    assert_close(_grad(loss, logp), _t([[-0.225, -0.125], [0.25, 0.2]]), rtol=0, atol=1e-15)
    # every use of mu reads the corrected one: the same as passing logp_behav - log S with the knob off
    ref, mr = policy_loss(logp, logp_behav - log_s, adv, mask, cfg.replace(truncation_correction=False),
                          logp_prox=logp_behav)
    assert torch.equal(loss, ref) and torch.equal(_grad(loss, logp), _grad(ref, logp))
    assert m["mismatch/kl_k1"].item() == pytest.approx(-(LOG(0.9) + LOG(0.5) + LOG(0.8)) / 4, abs=1e-15)
    assert m.keys() == mr.keys() and all(torch.equal(m[k], mr[k]) for k in m)


@pytest.mark.parametrize("preset", ["rec_oneside_nois", "rec_oneside_is", "decoupled_tis", "icepop", "geo_mask",
                                    "opsm"])
def test_truncation_correction_with_nothing_truncated_is_bitwise_the_plain_loss(preset):
    """top_p = 1 keeps all the mass: log S = 0 everywhere, and the loss, gradient and metrics are
    bitwise those without the correction (x - 0.0 = x)."""
    g = torch.Generator().manual_seed(6)
    logp_behav = -torch.rand(2, 3, 4, generator=g)
    logp_prox = logp_behav + 0.01 * torch.randn(2, 3, 4, generator=g)
    logp = (logp_prox + 0.01 * torch.randn(2, 3, 4, generator=g)).requires_grad_(True)
    adv, mask = torch.randn(2, 3, generator=g), torch.arange(4) < torch.tensor([[4, 2, 1], [3, 4, 4]])[..., None]
    cfg = PRESETS[preset]
    prox = logp_prox if cfg.needs_proximal else None
    ref, mr = policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox=prox)
    out, mo = policy_loss(logp, logp_behav, adv, mask, cfg.replace(truncation_correction=True), logp_prox=prox,
                          logp_kept_mass=torch.zeros_like(logp_behav))
    assert torch.equal(out, ref) and torch.equal(_grad(out, logp), _grad(ref, logp))
    assert mo.keys() == mr.keys() and all(torch.equal(mo[k], mr[k]) for k in mo)
    with pytest.raises(ValueError, match="truncation_correction=True needs logp_kept_mass"):
        policy_loss(logp, logp_behav, adv, mask, cfg.replace(truncation_correction=True), logp_prox=prox)


# -- diagnostics -------------------------------------------------------------------------------------
def test_mismatch_diagnostics_by_hand():
    """w = pi_t / mu = [[3, 1/4], [1.5, 2]] (product 2.25):
    kl_k1 = mean(-log w) = -log(2.25) / 4; kl_k3 = mean(w - 1 - log w) = (6.75 - 4 - log 2.25) / 4;
    token ESS = (sum w)^2 / (n sum w^2) = 6.75^2 / (4 * 15.3125); sequence ESS over W = [0.75, 3]:
    3.75^2 / (2 * 9.5625)."""
    logp, logp_behav, logp_prox, adv, mask = _weights_case([[3.0, 0.25], [1.5, 2.0]])
    for level, ess in (("token", 6.75**2 / (4 * 15.3125)), ("sequence", 3.75**2 / (2 * 9.5625))):
        cfg = AlgorithmConfig(clip_mode="none", ratio_anchor="proximal", behavior_correction_level=level)
        _, m = policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox=logp_prox)
        assert m["mismatch/kl_k1"].item() == pytest.approx(-LOG(2.25) / 4, abs=1e-15)
        assert m["mismatch/kl_k3"].item() == pytest.approx((2.75 - LOG(2.25)) / 4, abs=1e-15)
        assert m["mismatch/ess"].item() == pytest.approx(ess, abs=1e-15)


def test_effective_sample_size_edges():
    """All weights equal -> 1; one weight carrying everything -> 1/n; a weight e^200 (overflows
    float32) still gives 1/n; nothing valid -> 1."""
    valid = torch.ones(4, dtype=torch.bool)
    assert effective_sample_size(torch.full((4,), 0.7), valid).item() == pytest.approx(1.0)
    lw = torch.tensor([200.0, 0.0, 0.0, 0.0])
    assert effective_sample_size(lw, valid).item() == pytest.approx(0.25)
    assert effective_sample_size(lw, torch.zeros(4, dtype=torch.bool)).item() == 1.0


# -- config errors -----------------------------------------------------------------------------------
BAD = [
    ("geo_mask", (1.01, 0.99), "here low 1.01 > high 0.99"),
    ("geo_mask", (0.99, float("inf")), "two finite numbers"),
    ("geo_mask", (float("nan"), 1.01), "two finite numbers"),
    ("geo_mask", (0.99,), "0 <= low <= 1 <= high"),
    ("geo_mask", (1.1, 1.2), "a band without 1 rejects every on-policy sample"),
    ("token_veto", (None, None), "not both null"),
    ("token_veto", (2.0, 0.5), "here low 2 > high 0.5"),
    ("token_veto", (None, float("inf")), "each a finite number or null"),
    ("opsm_threshold", float("inf"), "a number >= 0"),
    ("opsm_threshold", float("nan"), "(a finite number)"),
    ("opsm_threshold", -0.1, "a negative one drops on-policy negatives too"),
    ("truncation_correction", 1, "true or false"),
]


@pytest.mark.parametrize("field, value, accepted", BAD)
def test_bad_values_name_the_field_as_typed(field, value, accepted):
    with pytest.raises(ValueError) as err:
        AlgorithmConfig(**{field: value})
    assert f"model.algorithm.{field}={value!r} is not valid; accepted: " in str(err.value)
    assert accepted in str(err.value)


def test_floor_needs_the_mask_and_holds_one():
    with pytest.raises(ValueError, match=r"model.algorithm.behavior_correction_floor=0.5 is not valid; accepted: null "
                                         r"with behavior_correction 'truncate'"):
        AlgorithmConfig(ratio_anchor="proximal", behavior_correction="truncate", behavior_correction_floor=0.5)
    with pytest.raises(ValueError, match=r"behavior_correction_floor=1.5 is not valid; accepted: null or a number in "
                                         r"\[0, 1\]"):
        AlgorithmConfig(ratio_anchor="proximal", behavior_correction="mask", behavior_correction_floor=1.5)
    with pytest.raises(ValueError, match=r"behavior_correction_floor=inf"):
        AlgorithmConfig(ratio_anchor="proximal", behavior_correction="mask", behavior_correction_floor=float("inf"))


@pytest.mark.parametrize("engine, top_p, message", [
    ("fast", 0.9, "false with model.engine.name 'fast': that engine does not record"),
    ("vllm", 0.9, "false with model.engine.name 'vllm'"),
    ("hf", 1.0, "false with model.sampling.top_p 1.0: nothing is truncated"),
    ("auto", 1.0, "false with model.sampling.top_p 1.0"),
])
def test_truncation_correction_needs_an_engine_that_records_the_kept_mass(engine, top_p, message):
    cfg = AlgorithmConfig(truncation_correction=True)
    with pytest.raises(ValueError, match=r"model.algorithm.truncation_correction=True is not valid; accepted: "):
        cfg.check_sampling(engine, top_p)
    with pytest.raises(ValueError, match=message):
        cfg.check_sampling(engine, top_p)
    cfg.check_sampling("hf", 0.9)  # records S: fine
    cfg.check_sampling("auto", 0.9)  # auto resolves to hf whenever top_p < 1
    AlgorithmConfig().check_sampling("fast", 0.9)  # the knob off: nothing to check here


def test_bands_are_normalised_to_tuples():
    cfg = AlgorithmConfig(geo_mask=[0, 2], token_veto=[None, 3])
    assert cfg.geo_mask == (0.0, 2.0) and cfg.token_veto == (None, 3.0)
