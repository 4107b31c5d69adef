"""The exact expected gradient of one asynchronous step (bandits/async_exact.py): the (y, r, S)
decomposition against brute force over every group of K samples and every reward pattern, and
the rows the theory predicts in the exact table."""

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from bandits.async_bench import bench_schedule, behaviour_token_logp, run_schedule, schedule_config
from bandits.async_exact import (
    CORRECTIONS, ON_POLICY_TOKENS, advantage_table, exact_async_table, expected_step_gradient, expected_step_loss,
)
from bandits.envs import ChainPromptsEnv
from bandits.problems import chain_prompts_problem
from reclight.advantages import group_advantages
from reclight.algorithms import get_algorithm
from reclight.clock import ClockCosts, GroupRecord, StepPlan
from reclight.losses import policy_loss

F64 = torch.float64


def tiny():
    env = ChainPromptsEnv(horizons=[1, 2])
    return chain_prompts_problem(env)


def brute_force_loss(problem, plan, theta, snapshots, cfg, k):
    """E[L] by enumerating, per group, every ordered K-tuple of trajectories and every 0/1 reward
    pattern, through group_advantages and policy_loss on the real [1, K, T] group with the batch's
    counts (the batch loss is a sum over groups of such terms)."""
    n_tokens = k * sum(int(problem.horizons[g.prompt]) for g in plan.groups)
    n_seqs, t_max = k * len(plan.groups), problem.horizon
    total = 0.0
    for g in plan.groups:
        p, h = g.prompt, int(problem.horizons[g.prompt])
        tok_b = behaviour_token_logp(problem, {v: snapshots[v][None] for v in set(g.token_versions)}, p,
                                     g.token_versions[:h])[0]
        tok_p = behaviour_token_logp(problem, {0: theta[None]}, p, [0] * h)[0]
        tok_x = tok_p.detach()
        mu, rbar = tok_b.sum(-1).exp(), problem.reward_means[0, p, : tok_b.shape[0]]
        for ys in itertools.product(range(tok_b.shape[0]), repeat=k):
            for rs in itertools.product((0, 1), repeat=k):
                prob = math.prod(mu[y].item() * (rbar[y].item() if r else 1 - rbar[y].item()) for y, r in zip(ys, rs))
                if prob == 0:
                    continue
                adv, _ = group_advantages(torch.tensor([rs], dtype=F64), cfg)
                pad = lambda x: torch.nn.functional.pad(x[list(ys)], (0, t_max - h))[None]  # noqa: E731
                loss, _ = policy_loss(pad(tok_p), pad(tok_b), adv, torch.ones(1, k, t_max, dtype=torch.bool)
                                      & (torch.arange(t_max) < h), cfg,
                                      logp_prox=pad(tok_x) if cfg.needs_proximal else None, num_tokens=n_tokens,
                                      num_seqs=n_seqs, num_samples=n_seqs, norm_length=t_max)
                total = total + prob * loss
    return total


def _plan(groups):
    return StepPlan(step=2, groups=[GroupRecord(n=i, prompt=p, admitted_at=0.0, token_versions=v,
                                                lengths=[len(v)] * 2) for i, (p, v) in enumerate(groups)],
                    metrics={})


@pytest.mark.parametrize("preset,overrides", [
    ("rec_oneside_nois", {}), ("reinforce", {}), ("grpo", {}), ("red_weight", {}), ("opmd", {}),
    ("decoupled_tis", {}), ("rec_oneside_is", dict(ratio_anchor="proximal", behavior_correction="mask")),
    ("rec_oneside_is", dict(ratio_anchor="proximal", behavior_correction="truncate",
                            behavior_correction_level="sequence")),
])
def test_decomposition_equals_brute_force(preset, overrides):
    """Step 2 of a schedule: group 0 on the 1-token prompt sampled by version 0, group 1 on the
    2-token prompt whose tokens came from versions 1 then 2 (it spans versions); K = 2."""
    problem = tiny()
    gen = torch.Generator().manual_seed(0)
    snaps = [torch.randn(problem.n_states, 3, generator=gen, dtype=F64) for _ in range(3)]
    theta = torch.randn(problem.n_states, 3, generator=gen, dtype=F64, requires_grad=True)
    cfg = get_algorithm(preset, **overrides)
    plan = _plan([(0, [0]), (1, [1, 2])])
    exact = expected_step_loss(problem, plan, theta, snaps, cfg, 2)
    brute = brute_force_loss(problem, plan, theta, snaps, cfg, 2)
    assert_close(exact, brute, rtol=1e-12, atol=1e-14)
    g_exact = torch.autograd.grad(exact, theta)[0]
    g_brute = torch.autograd.grad(brute_force_loss(problem, plan, theta, snaps, cfg, 2), theta)[0]
    assert_close(g_exact, g_brute, rtol=1e-10, atol=1e-13)
    assert g_exact.norm() > 1e-3  # not vacuous


def test_advantage_table_by_hand():
    """K = 3, plain A = r - mean: own r = 1 with S = 1 other success -> 1 - 2/3 = 1/3;
    r = 0, S = 2 -> -2/3; a uniform group (r = 0, S = 0) -> 0."""
    a = advantage_table(get_algorithm("reinforce"), 3)
    assert_close(a, torch.tensor([[0.0, -1 / 3, -2 / 3], [2 / 3, 1 / 3, 0.0]], dtype=F64), rtol=0, atol=1e-15)


def test_refuses_losses_with_a_random_normalizer():
    problem = tiny()
    theta = torch.zeros(problem.n_states, 3, dtype=F64)
    with pytest.raises(ValueError, match="accepted: drop 'none'"):
        expected_step_gradient(problem, _plan([(0, [0])]), theta, [theta], get_algorithm("red_drop"), 2)


def test_table_rows_the_theory_predicts():
    """A tiny bench: 3 prompts (horizons 1, 2, 3), B = 3, K = 2, in-flight updates with 6 slots.

    - fixed snapshots (every version = theta_0): every behaviour weight is 1, so each correction's
      row equals the plain row, and equals the on-policy-token row;
    - trained snapshots: the sequence-level importance weight without cap gives exactly the
      gradient of the same prompts with on-policy tokens (E_mu[w A grad log pi] = (K - 1)
      E_pi[r grad log pi]): behaviour correction at its best removes staleness, nothing else;
    - the synchronous schedule is the reference: error 0 with any loss (on-policy, w = 1);
    - drop's selection bias stays after every correction (relative error > 0.05)."""
    env = ChainPromptsEnv(horizons=[1, 2, 3])
    problem = chain_prompts_problem(env)
    costs = ClockCosts(decode_a=1.0, decode_b=0.02, train_c=1.5, train_e=0.01)
    knobs = dict(eta=0, max_inflight=6, weight_update="inflight", recompute_kv_on_update=False, starve_after=3,
                 costs=costs, groups_per_step=3)
    plans = {name: bench_schedule(schedule_config(name, **knobs), env.horizons, 3, 2, 10, 0)
             for name in ("sync", "pace", "drop")}
    init = torch.randn(1, problem.n_states, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    trained = run_schedule(problem, get_algorithm("rec_oneside_nois"), plans["sync"], init, group_size=2, lr=0.3,
                           keep_snapshots=True)["snapshots"]
    rows = {(r["schedule"], r["loss"]): r for r in exact_async_table(problem, plans, [t[0] for t in trained],
                                                                      range(3, 9), 2)}
    assert len(rows) == 3 * (len(CORRECTIONS) + 1)
    for sched in ("sync", "pace", "drop"):
        plain = rows[(sched, "plain (rec_oneside_nois)")]
        for loss in list(CORRECTIONS) + [ON_POLICY_TOKENS]:
            assert rows[(sched, loss)]["relerr_fixed"] == pytest.approx(plain["relerr_fixed"], abs=1e-12)
        assert rows[(sched, "sequence IS, no cap")]["relerr_trained"] == pytest.approx(
            rows[(sched, ON_POLICY_TOKENS)]["relerr_trained"], abs=1e-10)
    for loss in list(CORRECTIONS) + [ON_POLICY_TOKENS]:
        assert rows[("sync", loss)]["relerr_trained"] < 1e-12 and rows[("sync", loss)]["relerr_fixed"] < 1e-12
    assert rows[("drop", ON_POLICY_TOKENS)]["relerr_trained"] > 0.05
    for loss in CORRECTIONS:
        assert rows[("drop", loss)]["relerr_trained"] > 0.05
        assert rows[("drop", loss)]["relerr_fixed"] > 0.05
