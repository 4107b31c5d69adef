"""Exact maths of the bandit bench (docs/algorithms.md section 5), all in float64, no Monte Carlo:
expectations enumerate every group of K draws (A^K tuples) with its probability."""

import math

import pytest
import torch
from torch.testing import assert_close

from bandits import exact
from reclight.advantages import group_advantages
from reclight.algorithms import get_algorithm
from reclight.losses import policy_loss

F64 = torch.float64
MU = torch.tensor([0.3, 0.6, 0.1], dtype=F64)
R3 = torch.tensor([0.0, 0.8, 1.0], dtype=F64)


def _rand_simplex(n, gen):
    x = torch.rand(n, generator=gen, dtype=F64) + 0.05
    return x / x.sum()


def test_optimum_closed_form_small():
    """pi_t = [1/2, 1/2], r = [0, log 3], tau = 1: pi* ~ [1, 3] / 4 = [0.25, 0.75]."""
    pi = exact.kl_regularized_optimum(torch.tensor([0.5, 0.5], dtype=F64),
                                      torch.tensor([0.0, math.log(3.0)], dtype=F64), 1.0)
    assert_close(pi, torch.tensor([0.25, 0.75], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("tau", [1e-3, 1e-1, 1.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_optimum_stable_extremes(tau, dtype):
    """Rewards up to |100| and tau in [1e-3, 1e3]: r/tau reaches 1e5, exp would overflow. The
    result is finite, sums to 1, and matches the ratio identity
    log pi*(a) - log pi*(b) = log pi_t(a) - log pi_t(b) + (r_a - r_b)/tau (float64 case);
    at tau = 1e-3 all mass sits on the best arm."""
    pi_t = torch.tensor([0.2, 0.3, 0.5], dtype=dtype)
    r = torch.tensor([100.0, -100.0, 99.99], dtype=dtype)
    pi = exact.kl_regularized_optimum(pi_t, r, tau)
    assert torch.isfinite(pi).all()
    assert_close(pi.sum(), torch.tensor(1.0, dtype=dtype))
    if dtype == F64:
        logp = exact.log_kl_regularized_optimum(pi_t, r, tau)
        expected = pi_t.log()[0] - pi_t.log()[2] + (r[0] - r[2]) / tau
        assert_close(logp[0] - logp[2], expected, rtol=1e-12, atol=1e-9)
    if tau == 1e-3:
        # pi*(3)/pi*(1) = (0.5/0.2) exp(-0.01/1e-3) = 2.5 e^-10 ~ 1.1e-4; arm 2 gets ~e^-2e5
        # (the float32 rewards are not exactly 99.99 and 100: use their stored values)
        gap = (r[2].double() - r[0].double()).item() / tau
        expected = (pi_t[2].double() / pi_t[0].double()).item() * math.exp(gap)
        assert_close(pi[2] / pi[0], torch.tensor(expected, dtype=dtype), rtol=1e-5, atol=0)
        assert pi[1] == 0


def test_optimum_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau=0"):
        exact.kl_regularized_optimum(MU, R3, 0)


def test_pi_star_maximises_objective():
    """J(pi) = E_pi r - tau KL(pi||pi_t) is strictly concave in pi; gradient ascent (L-BFGS on
    logits, maximising J) from uniform reaches pi* within 1e-6, and J(pi*) = tau log Z with
    Z = E_{pi_t} exp(r/tau) (plugging pi* into J)."""
    gen = torch.Generator().manual_seed(1)
    pi_t, r, tau = _rand_simplex(5, gen), torch.randn(5, generator=gen, dtype=F64), 0.3
    z = torch.zeros(5, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -exact.kl_objective(torch.softmax(z, -1), pi_t, r, tau)
        loss.backward()
        return loss

    opt.step(closure)
    pi_star = exact.kl_regularized_optimum(pi_t, r, tau)
    assert_close(torch.softmax(z, -1), pi_star, rtol=0, atol=1e-6)
    log_z = torch.logsumexp(pi_t.log() + r / tau, -1)
    assert_close(exact.kl_objective(pi_star, pi_t, r, tau), tau * log_z, rtol=1e-12, atol=1e-12)
    # any other policy is worse
    for other in (pi_t, torch.full((5,), 0.2, dtype=F64)):
        assert exact.kl_objective(other, pi_t, r, tau) < tau * log_z


def test_pairwise_consistency_of_optimum():
    """r(y) - tau (log pi*(y) - log pi_t(y)) = tau log Z is the same for every y."""
    gen = torch.Generator().manual_seed(2)
    pi_t, r, tau = _rand_simplex(6, gen), torch.randn(6, generator=gen, dtype=F64), 0.7
    a = r - tau * (exact.log_kl_regularized_optimum(pi_t, r, tau) - pi_t.log())
    assert_close(a, torch.full_like(a, (tau * torch.logsumexp(pi_t.log() + r / tau, -1)).item()),
                 rtol=0, atol=1e-12)


def test_pairwise_surrogate_hand_value():
    """K = 3, theta = theta_t (a = r), r = [0, 1, 3], w = 1:
    L = (1/9)((0-1)^2 + (0-3)^2 + (1-3)^2) = 14/9. With w = 1[i,j in {0,1}]: L = 1/9."""
    r = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    lp = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=F64))
    assert_close(exact.pairwise_surrogate(lp, lp, r, 0.5), torch.tensor(14 / 9, dtype=F64))
    keep = torch.tensor([True, True, False])
    w = (keep[:, None] & keep[None, :]).to(F64)
    assert_close(exact.pairwise_surrogate(lp, lp, r, 0.5, w), torch.tensor(1 / 9, dtype=F64))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_surrogate_gradient_identity_every_group(k):
    """For EVERY group y_1..y_K (so under any sampling distribution), at theta = theta_t:
    grad_z L = -(2 tau/K) sum_i (r_i - rbar)(e_{y_i} - pi_t)   (autograd vs closed form)
             = 2 tau * grad_z policy_loss(reinforce)            (the project's loss, T = 1)
    since token_mean gives policy_loss = -(1/K) sum_i A_i log pi(y_i)."""
    gen = torch.Generator().manual_seed(k)
    logits_t = torch.randn(3, generator=gen, dtype=F64)
    r, tau = torch.randn(3, generator=gen, dtype=F64), 0.4
    outcomes, _ = exact.enumerate_groups(MU, k)
    cfg = get_algorithm("reinforce")
    for group in outcomes:
        z = logits_t.clone().requires_grad_(True)
        lp = torch.log_softmax(z, -1)[group]
        lp_t = torch.log_softmax(logits_t, -1)[group]
        (g_auto,) = torch.autograd.grad(exact.pairwise_surrogate(lp, lp_t, r[group], tau), z)
        g_closed = exact.surrogate_grad_at_reference(torch.softmax(logits_t, -1), group, r[group], tau)
        assert_close(g_auto, g_closed, rtol=1e-10, atol=1e-12)
        z2 = logits_t.clone().requires_grad_(True)
        adv, _ = group_advantages(r[group][None], cfg)
        loss, _ = policy_loss(torch.log_softmax(z2, -1)[group].view(1, k, 1), lp_t.view(1, k, 1).detach(),
                              adv, torch.ones(1, k, 1, dtype=torch.bool), cfg)
        (g_pl,) = torch.autograd.grad(loss, z2)
        assert_close(2 * tau * g_pl, g_closed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_expected_gradient_under_offpolicy_mu(k):
    """Enumerating all 3^K groups from a non-uniform mu != pi_t:
    E[grad L(theta_t)] = -(2 tau (K-1)/K) mu * (r - E_mu r), independent of pi_t."""
    gen = torch.Generator().manual_seed(10 + k)
    logits_t, r, tau = torch.randn(3, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64), 0.25
    z = logits_t.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(exact.expected_surrogate(z, logits_t, MU, r, tau, k), z)
    assert_close(g, exact.expected_surrogate_grad_at_reference(MU, r, tau, k), rtol=1e-10, atol=1e-13)


def test_red_drop_is_weighted_surrogate():
    """With S RED-Drop's kept set and w_ij = 1[i, j in S], at theta_t:
    grad L_w = -(2 tau/K^2) |S| sum_{i in S} (r_i - rbar_S) grad log pi(y_i)
             = 2 tau (|S|/K)^2 grad policy_loss(red_drop)  (token_mean over |S| kept tokens)."""
    cfg = get_algorithm("red_drop")
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.0], dtype=F64)  # 2 positives, 4 negatives
    group = torch.tensor([0, 1, 2, 1, 0, 2])
    tau, k = 0.3, 6
    logits_t = torch.tensor([0.1, -0.3, 0.5], dtype=F64)
    adv, keep = group_advantages(r[None], cfg, torch.Generator().manual_seed(0))
    n_keep = int(keep.sum())
    assert n_keep == 4
    w = (keep[0][:, None] & keep[0][None, :]).to(F64)
    z = logits_t.clone().requires_grad_(True)
    lp_t = torch.log_softmax(logits_t, -1)[group]
    (g_sur,) = torch.autograd.grad(exact.pairwise_surrogate(torch.log_softmax(z, -1)[group], lp_t, r, tau, w), z)
    z2 = logits_t.clone().requires_grad_(True)
    loss, _ = policy_loss(torch.log_softmax(z2, -1)[group].view(1, k, 1), lp_t.view(1, k, 1), adv,
                          keep[..., None], cfg)
    (g_pl,) = torch.autograd.grad(loss, z2)
    assert_close(g_sur, 2 * tau * (n_keep / k) ** 2 * g_pl, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("k", [2, 3])
def test_full_minimisation_recovers_optimum(k):
    """E_mu[L] = ((K-1)/K) Var_mu(a) (enumerated, checked) is 0 iff a is constant on supp mu,
    i.e. pi = pi*; L-BFGS on the exact expectation recovers pi* within 1e-5 although mu, pi_t
    and pi* all differ. One gradient step from theta_t does not."""
    gen = torch.Generator().manual_seed(20 + k)
    mu, pi_t = _rand_simplex(4, gen), _rand_simplex(4, gen)
    r, tau = torch.rand(4, generator=gen, dtype=F64), 0.5
    z_t = pi_t.log()
    z = torch.randn(4, generator=gen, dtype=F64)
    a = r - tau * (torch.log_softmax(z, -1) - z_t)
    var = (mu * (a - (mu * a).sum()).square()).sum()
    assert_close(exact.expected_surrogate(z, z_t, mu, r, tau, k), (k - 1) / k * var, rtol=1e-12, atol=0)
    z_min = exact.minimize_expected_surrogate(z_t, mu, r, tau, k)
    pi_star = exact.kl_regularized_optimum(pi_t, r, tau)
    assert_close(torch.softmax(z_min, -1), pi_star, rtol=0, atol=1e-5)
    one_step = z_t - 1.0 * exact.expected_surrogate_grad_at_reference(mu, r, tau, k)
    assert (torch.softmax(one_step, -1) - pi_star).abs().max() > 1e-3


def test_counterexample_offpolicy_reinforce_goes_to_arm_2():
    """Data from the fixed mu = [0.3, 0.6, 0.1], r = [0, 0.8, 1]: the exact expected reinforce
    gradient (via policy_loss) is the constant direction ((K-1)/K) mu*(r - E_mu r) =
    (1/2)[-0.174, 0.132, 0.042] (K = 2), so the logits move linearly towards arm 2."""
    k = 2
    z = MU.log().clone().requires_grad_(True)
    loss = exact.expected_policy_loss(z, MU.log(), R3, k, get_algorithm("reinforce"))
    (g,) = torch.autograd.grad(loss, z)
    assert_close(-g, 0.5 * torch.tensor([-0.174, 0.132, 0.042], dtype=F64), rtol=1e-12, atol=1e-14)
    pi = exact.iterate_expected_reinforce(MU.log(), R3, k, lr=5.0, n_iters=100, mu=MU)
    assert int(pi.argmax()) == 1 and pi[1] > 0.999


def test_counterexample_surrogate_minimisers_go_to_arm_3():
    """Iterating argmin E_mu[L(.; pi_n)] (data always from mu) gives pi_n ~ mu exp(n r/tau):
    matches the closed form within 1e-5 at every n and reaches arm 3."""
    tau = 0.1
    iterates = exact.iterate_surrogate_minimisers(MU, R3, tau, 2, 3)
    n = torch.arange(4, dtype=F64)[:, None]
    assert_close(iterates, exact.kl_regularized_optimum(MU.expand(4, 3), n * R3, tau), rtol=0, atol=1e-5)
    assert int(iterates[-1].argmax()) == 2 and iterates[-1, 2] > 0.98


def test_counterexample_onpolicy_reinforce_goes_to_arm_3():
    """Sampling from the current policy (exact expectation each step), REINFORCE from pi_0 = mu
    first grows arm 2 then escapes to the optimal arm 3."""
    pi = exact.iterate_expected_reinforce(MU.log(), R3, 2, lr=5.0, n_iters=200)
    assert int(pi.argmax()) == 2 and pi[2] > 0.99
