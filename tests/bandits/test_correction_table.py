"""The exact rollout-correction table (bandits/correction_table.py, docs/algorithms.md section 6.8):
its per-sample decomposition against brute force over every group, the closed forms the theory
gives, and the rows the theory predicts."""

import itertools
import math

import pytest
import torch
from torch.func import vmap
from torch.testing import assert_close

from bandits.correction_table import (
    CORRECTIONS,
    ENGINE_GAP,
    Behaviour,
    chain,
    correction_table,
    moments,
    on_policy,
    per_token_gap,
    sample_terms,
    top_p_behaviour,
)
from bandits.envs import ChainEnv
from bandits.problems import chain_problem
from reclight.advantages import group_advantages
from reclight.algorithms import PRESETS, get_algorithm
from reclight.losses import policy_loss

F64 = torch.float64


def _small(horizon=2):
    problem = chain_problem(ChainEnv(length=4, start=1, horizon=horizon), 1)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(problem.n_states, 3, generator=g, dtype=F64)
    z = torch.randn(problem.n_states, 3, generator=g, dtype=F64)
    return problem, theta, z


def _sampled(logits):
    logp = torch.log_softmax(logits, -1)
    return Behaviour("", logp, logp, torch.zeros(logits.shape[0], dtype=F64))


def brute_force_gradient(problem, theta, beh, cfg, k):
    """E over every ordered group of K trajectories from the sampled distribution and every 0/1
    reward vector of the group loss's gradient at theta (group_advantages + policy_loss on the whole
    [1, K, T] group, token_mean over its K * T tokens), by autograd."""
    n_out, horizon = problem.states.shape[1], problem.horizon
    groups = torch.tensor(list(itertools.product(range(n_out), repeat=k)))  # [G, K]
    rewards = torch.tensor(list(itertools.product((0.0, 1.0), repeat=k)), dtype=F64)  # [R, K]
    n_g, n_r = groups.shape[0], rewards.shape[0]
    states, actions = problem.states[0][groups], problem.actions[0][groups]  # [G, K, T]
    p_y = beh.sample_logp[problem.states[0], problem.actions[0]].sum(-1).exp()  # [M]
    rbar = problem.reward_means[0, 0].to(F64)[groups]  # [G, K]
    p_r = torch.where(rewards[None] == 1, rbar[:, None], 1 - rbar[:, None]).prod(-1)  # [G, R]
    prob = (p_y[groups].prod(-1)[:, None] * p_r).reshape(-1)
    adv, _ = group_advantages(rewards.repeat(n_g, 1), cfg)  # [G * R, K], group-major
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)[states, actions].repeat_interleave(n_r, 0)[:, None]  # [G*R, 1, K, T]
    behav = beh.recorded_logp[states, actions].repeat_interleave(n_r, 0)[:, None]
    kept = beh.log_kept[states].repeat_interleave(n_r, 0)[:, None]
    mask = torch.ones(n_g * n_r, 1, k, horizon, dtype=torch.bool)

    def one(lp, lb, a, m, ls):
        return policy_loss(lp, lb, a, m, cfg, logp_prox=lp.detach() if cfg.needs_proximal else None,
                           logp_kept_mass=ls if cfg.truncation_correction else None)[0]

    losses = vmap(one)(logp, behav, adv[:, None], mask, kept)
    return torch.autograd.grad((prob * losses).sum(), theta)[0]


@pytest.mark.parametrize("name, cfg", [
    ("reinforce", get_algorithm("reinforce")),
    ("decoupled_tis", PRESETS["decoupled_tis"]),
    ("icepop", PRESETS["icepop"].replace(behavior_correction_floor=0.8, behavior_correction_cap=1.25)),
    ("geo_mask", PRESETS["geo_mask"].replace(geo_mask=(0.9, 1.1))),
    ("token_veto", PRESETS["decoupled_tis"].replace(token_veto=(0.8, 1.25))),
    ("opsm", get_algorithm("rec_oneside_is", opsm_threshold=0.01)),
    ("sequence TIS", CORRECTIONS["sequence TIS, cap 2"]),
    ("std-normalised", get_algorithm("grpo", ratio_anchor="proximal", geo_mask=(0.9, 1.1))),
])
def test_per_sample_decomposition_equals_brute_force_over_every_group(name, cfg):
    """K x sum over (y, r, S) of sample_terms equals the brute-force expectation over all 9^3 groups
    x 2^3 reward vectors (K = 3, T = 2), for rules that act on part of the samples (bands chosen
    so): every rule decides per sample, so the decomposition is exact (std normalisation included)."""
    problem, theta, z = _small()
    beh = _sampled(theta + 0.4 * z)
    terms = sample_terms(problem, theta, beh, cfg, k=3)
    mean, _, rejected = moments(terms)
    ref = brute_force_gradient(problem, theta, beh, cfg, 3)
    assert_close(3 * mean.view_as(ref), ref, rtol=1e-10, atol=1e-14)
    if name in ("icepop", "geo_mask", "token_veto", "opsm"):
        assert 0 < rejected < 1 or name == "icepop"


def test_truncation_decomposition_equals_brute_force():
    problem, theta, _ = _small()
    beh = top_p_behaviour(theta, 0.7)
    assert (beh.log_kept < 0).any()
    cfg = CORRECTIONS["decoupled_tis + truncation_correction"]
    ref = brute_force_gradient(problem, theta, beh, cfg, 3)
    assert_close(3 * moments(sample_terms(problem, theta, beh, cfg, k=3))[0].view_as(ref), ref, rtol=1e-10, atol=1e-14)


def _trajectory_grads(problem, theta):
    """G(y) = sum_t d log pi(a_t | s_t) / d theta = sum_t (onehot(a_t) - pi(s_t)) at row s_t. [M, S, A]"""
    pi = torch.softmax(theta, -1)
    states, actions = problem.states[0], problem.actions[0]
    per = torch.nn.functional.one_hot(actions, 3).to(F64) - pi[states]  # [M, T, A]
    out = torch.zeros(states.shape[0], problem.n_states, 3, dtype=F64)
    return out.scatter_add_(1, states[..., None].expand(-1, -1, 3), per)


def test_closed_forms_of_the_sequence_weight():
    """With L = sum_i sum_t -A_i w_i log pi / (K T) and A_i = r_i - mean_j r_j:
    E[grad L] = -(K - 1) / (K T) (E_q[w r G] - E_q[r] E_q[w G]). With w = pi / q on q's support:
    any mu of full support gives the on-policy -(K - 1) / (K T) sum_y pi r G (sum_y pi G = 0);
    top-p gives the same sums over the nucleus' trajectories only, with q's mean reward as baseline."""
    problem, theta, z = _small(horizon=3)
    k, horizon = 4, 3
    pi_y = problem.outcome_logp(theta[None])[0, 0].exp()  # [M]
    r = problem.reward_means[0, 0].to(F64)
    big_g = _trajectory_grads(problem, theta)
    on = -(k - 1) / (k * horizon) * (pi_y[:, None, None] * r[:, None, None] * big_g).sum(0)
    cfg = CORRECTIONS["sequence IS, uncapped"]
    for beh in (_sampled(theta + 0.5 * z), _sampled(theta - z)):
        assert_close(k * moments(sample_terms(problem, theta, beh, cfg, k))[0].view_as(on), on, rtol=1e-10, atol=1e-14)
    beh = top_p_behaviour(theta, 0.8)
    q_y = beh.sample_logp[problem.states[0], problem.actions[0]].sum(-1).exp()
    supp = (q_y > 0).to(F64)[:, None, None]
    assert 0 < supp.sum() < supp.numel()
    expected = -(k - 1) / (k * horizon) * ((supp * pi_y[:, None, None] * r[:, None, None] * big_g).sum(0)
                                           - (q_y * r).sum() * (supp * pi_y[:, None, None] * big_g).sum(0))
    got = moments(sample_terms(problem, theta, beh, CORRECTIONS["sequence IS + truncation_correction"], k))[0]
    assert_close(k * got.view_as(expected), expected, rtol=1e-10, atol=1e-14)
    assert (k * got.view_as(on) - on).norm() > 0.01 * on.norm()  # the tail is missing: biased


def test_token_weights_are_exact_for_one_token_only():
    """T = 1: the token weight is the sequence weight, so token IS is unbiased; T = 3: it is not."""
    for horizon, unbiased in ((1, True), (3, False)):
        problem, theta, z = _small(horizon)
        beh = _sampled(theta + 0.5 * z)
        ref, _, _ = moments(sample_terms(problem, theta, on_policy(theta), CORRECTIONS["reinforce (no correction)"]))
        got, _, _ = moments(sample_terms(problem, theta, beh, CORRECTIONS["token IS, uncapped (proximal, w_t)"]))
        err = ((got - ref).norm() / ref.norm()).item()
        assert (err < 1e-12) if unbiased else (err > 1e-3), (horizon, err)


@pytest.fixture(scope="module")
def table():
    t = correction_table()
    return t, {(c["behaviour"], c["correction"]): c for c in t["cells"]}


def test_the_behaviours_are_fixed_before_comparing(table):
    """The engine's noise is scaled to a mean per-token gap of exactly 5e-3; the rows differ only
    by their correction (the same behaviours for all)."""
    t, _ = table
    gaps = {b["behaviour"]: b["gap"] for b in t["behaviours"]}
    assert gaps["engine"] == pytest.approx(ENGINE_GAP, abs=1e-9) and gaps["on-policy"] == 0.0
    assert gaps["lag 1"] < gaps["lag 10"]
    problem = chain()
    assert per_token_gap(problem, on_policy(torch.zeros(problem.n_states, 3, dtype=F64)),
                         torch.zeros(problem.n_states, 3, dtype=F64)) == (0.0, 0.0)


def test_the_rows_the_theory_predicts(table):
    t, by = table
    mismatched = ["engine", "lag 1", "lag 1 + engine", "lag 10"]
    for corr in CORRECTIONS:  # on-policy every correction is exact and rejects nothing
        assert by[("on-policy", corr)]["relerr"] < 1e-12 and by[("on-policy", corr)]["rejected"] == 0.0, corr
    for b in mismatched:
        assert by[(b, "sequence IS, uncapped")]["relerr"] < 1e-12, b  # unbiased under any full-support mismatch
        assert by[(b, "reinforce (no correction)")]["relerr"] > 1e-3, b  # no correction: biased
        token = by[(b, "token IS, uncapped (proximal, w_t)")]["relerr"]
        assert 1e-3 < token, b  # token weights: biased for T = 4 ...
        for corr in CORRECTIONS:  # ... and truncation_correction with nothing truncated changes nothing
            if corr.endswith("+ truncation_correction"):
                base = {"decoupled_tis + truncation_correction": "decoupled_tis (token TIS, cap 2)",
                        "sequence IS + truncation_correction": "sequence IS, uncapped"}[corr]
                assert by[(b, corr)]["relerr"] == by[(b, base)]["relerr"]
    for b in ("engine", "lag 1"):  # token weights remove part of the bias at small mismatch
        assert by[(b, "token IS, uncapped (proximal, w_t)")]["relerr"] < by[(b, "reinforce (no correction)")]["relerr"]
    # a rejection rule that acts is biased: more error than the same loss without it
    for b in ("engine", "lag 1"):
        for rule, base in (("geo_mask (decoupled_tis + geo [0.99, 1.01])", "decoupled_tis (token TIS, cap 2)"),
                           ("opsm 1e-4 + rec_oneside_is", "rec_oneside_is (token IS factor pi_t/mu)")):
            assert by[(b, rule)]["rejected"] > 0 and by[(b, rule)]["relerr"] > by[(b, base)]["relerr"], (b, rule)
    # the cap trades bias for variance: at lag 10 the capped sequence weight has the smaller sd and a bias
    capped, exact = by[("lag 10", "sequence TIS, cap 2")], by[("lag 10", "sequence IS, uncapped")]
    assert capped["sd_ratio"] < exact["sd_ratio"] and capped["relerr"] > 0.1
    # top-p: a support mismatch, no row recovers the untruncated gradient
    assert all(by[("top-p 0.9", corr)]["relerr"] > 0.1 for corr in CORRECTIONS)
    assert not math.isnan(by[("top-p 0.9", "sequence IS + truncation_correction")]["cos"])
