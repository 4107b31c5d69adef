"""Batched problems and vectorized runs of the bandit bench."""

import pytest
import torch
from torch.testing import assert_close

from bandits.envs import ChainEnv
from bandits.problems import bandit_problem, chain_problem
from bandits.simulate import SnapshotRing, per_row_policy_loss, run_preset
from reclight.algorithms import get_algorithm
from reclight.losses import policy_loss
from reclight.sync import behavior_version, resolve_setting

F64 = torch.float64


def test_outcome_distribution_normalised_and_exact_metrics():
    """Chain: sum over the 3^T trajectories of pi(traj) = 1. Bandit with pi uniform over A = 4
    arms: E r = mean of the table, entropy = log 4."""
    problem = chain_problem(ChainEnv(horizon=4), 1)
    logits = torch.randn(2, problem.n_states, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert_close(problem.outcome_logp(logits).logsumexp(-1), torch.zeros(2, 1, dtype=F64), rtol=0, atol=1e-12)
    bp = bandit_problem(3, 4, [0], "none")
    flat = torch.zeros(1, 3, 4, dtype=F64)
    m = bp.exact_metrics(flat, bp.optimal_logp(flat))
    assert_close(m["reward/expected"], bp.reward_means.mean((-1, -2)))
    assert_close(m["policy/entropy"], torch.tensor([torch.log(torch.tensor(4.0, dtype=F64)).item()], dtype=F64))
    # pi_opt = one-hot on each context's best arm: KL(pi_opt || uniform) = log 4
    assert_close(m["kl/opt"], torch.tensor([torch.log(torch.tensor(4.0, dtype=F64)).item()], dtype=F64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["on_policy", "periodic", "lag", "offline"])
def test_snapshot_ring_serves_behavior_version(name):
    """Step t reads exactly theta_v, v = behavior_version(t, k, d), and the ring keeps at most
    the versions still to be read (<= d + 1 for lag, 1 for periodic and offline)."""
    steps = 50
    k, d = resolve_setting(name, steps)
    ring = SnapshotRing([(k, d)], seeds=1, total_steps=steps)
    ring.record(0, torch.zeros(1, 1, 1))
    for t in range(steps):
        behav, stale = ring.behaviour(t)
        assert behav.item() == behavior_version(t, k, d)
        assert stale.item() == t - behav.item()
        ring.record(t + 1, torch.full((1, 1, 1), float(t + 1)))
        assert ring.n_stored() <= max(d, 0) + 2


def test_per_row_loss_equals_each_row_alone():
    """vmapped policy_loss == a Python loop of policy_loss per row, also when RED-Drop keeps
    a different number of samples in each row (token_mean's denominator is per row)."""
    gen = torch.Generator().manual_seed(0)
    cfg = get_algorithm("rec_oneside_is")
    logp = torch.randn(3, 2, 4, 2, generator=gen, dtype=F64)
    logp_behav = logp + 0.3 * torch.randn(logp.shape, generator=gen, dtype=F64)
    adv = torch.randn(3, 2, 4, generator=gen, dtype=F64)
    mask = torch.rand(3, 2, 4, 1, generator=gen) > 0.3
    mask = mask.expand(3, 2, 4, 2)
    loss, metrics = per_row_policy_loss(logp, logp_behav, adv, mask, cfg)
    for r in range(3):
        ref, ref_m = policy_loss(logp[r], logp_behav[r], adv[r], mask[r], cfg)
        assert_close(loss[r], ref, rtol=1e-12, atol=1e-12)
        assert_close(metrics["clip/frac"][r], ref_m["clip/frac"], rtol=1e-12, atol=1e-12)


def _run(preset, env="bandit", steps=30, seeds=4, settings=("on_policy", "periodic", "lag", "offline")):
    problem = bandit_problem(4, 5, list(range(seeds)), "bernoulli") if env == "bandit" else chain_problem(ChainEnv(horizon=4), 2)
    init = torch.randn(seeds, problem.n_states, problem.n_actions, dtype=F64, generator=torch.Generator().manual_seed(1))
    sets = {s: resolve_setting(s, steps) for s in settings}
    return run_preset(problem, get_algorithm(preset), preset, sets, init, steps=steps, group_size=4, lr=0.1), init


def test_onpolicy_clipping_is_inactive_and_variants_coincide():
    """On-policy each batch feeds one update, so rho == 1: clip/frac is 0 and, with the same
    seed, rec_oneside_is follows REINFORCE exactly (paired seeds)."""
    a, _ = _run("rec_oneside_is", settings=("on_policy",))
    b, _ = _run("reinforce", settings=("on_policy",))
    assert a.history["clip/frac"].abs().max() == 0
    assert_close(a.history["reward/expected"], b.history["reward/expected"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("env", ["bandit", "chain"])
def test_run_shapes_staleness_and_learning(env):
    """Histories have [steps(+1), settings, seeds]; logged staleness is t - behavior_version;
    on-policy training raises the mean (over seeds) exact expected reward by > 0.05."""
    steps = 30
    res, _ = _run("rec_oneside_nois", env=env, steps=steps)
    h = res.history
    assert h["reward/expected"].shape == (steps + 1, 4, 4)
    assert h["clip/frac"].shape == (steps, 4, 4)
    for i, name in enumerate(res.settings):
        k, d = resolve_setting(name, steps)
        expected = torch.tensor([t - behavior_version(t, k, d) for t in range(steps)], dtype=h["rollout/staleness"].dtype)
        assert_close(h["rollout/staleness"][:, i, 0], expected)
    on = h["reward/expected"][:, 0]
    assert on[-1].mean() > on[0].mean() + 0.05
    assert torch.isfinite(h["kl/opt"]).all() and (h["policy/entropy"] >= 0).all()
    off = res.settings.index("offline")
    assert h["clip/frac"][5:, off].mean() > 0  # stale data trips the one-sided mask
