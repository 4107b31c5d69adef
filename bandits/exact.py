"""Exact maths of docs/algorithms.md section 5, for a single prompt with A outcomes.

Everything here is a closed form or an exact expectation by enumerating all A^K groups, so
the tests can assert tight tolerances. Notation: ``pi_t`` is the reference (the policy at
iteration t), ``mu`` the sampling distribution of the group (any, not necessarily pi_t), ``r``
the reward of each outcome, ``tau`` the KL temperature, K the group size. Policies are
tabular softmaxes over logits ``z`` [A], so grad_z log pi(a) = e_a - pi.

The group-relative REINFORCE steps of the counterexample call the project's own
``reclight.advantages.group_advantages`` and ``reclight.losses.policy_loss``: nothing of the
loss is re-implemented here.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torch.func import vmap

from reclight.advantages import group_advantages
from reclight.algorithms import AlgorithmConfig, get_algorithm
from reclight.losses import policy_loss


def log_kl_regularized_optimum(pi_t: Tensor, rewards: Tensor, tau: float) -> Tensor:
    """log pi*(y) = log pi_t(y) + r(y)/tau - log Z, computed with logsumexp.

    pi_t, rewards: [..., A]. Stable for any tau > 0 and large |r| / tau (no exp of r/tau is
    ever formed). Outcomes with pi_t = 0 get -inf.
    """
    if not tau > 0:
        raise ValueError(f"tau={tau!r} is not valid; accepted: tau > 0")
    # pi* is invariant to shifting r; shifting by max r keeps |logits| small, which matters
    # in float32 where r/tau ~ 1e5 would leave a spacing of ~1e-2 between representable logits.
    shifted = (rewards - rewards.amax(-1, keepdim=True)) / tau
    logits = torch.log(pi_t) + shifted
    return logits - torch.logsumexp(logits, -1, keepdim=True)


def kl_regularized_optimum(pi_t: Tensor, rewards: Tensor, tau: float) -> Tensor:
    """pi*(y) = pi_t(y) exp(r(y)/tau) / Z, the maximiser of J(pi) = E_pi r - tau KL(pi||pi_t).

    pi_t, rewards: [..., A] -> [..., A].
    """
    return log_kl_regularized_optimum(pi_t, rewards, tau).exp()


def kl_objective(pi: Tensor, pi_t: Tensor, rewards: Tensor, tau: float) -> Tensor:
    """J(pi) = sum_y pi(y) r(y) - tau * sum_y pi(y) log(pi(y) / pi_t(y)), 0 log 0 = 0.

    pi, pi_t, rewards: [..., A] -> [...].
    """
    kl = (torch.xlogy(pi, pi) - torch.xlogy(pi, pi_t)).sum(-1)
    return (pi * rewards).sum(-1) - tau * kl


def entropy(logp: Tensor) -> Tensor:
    """-sum p log p of a log-distribution [..., M] -> [...] (0 log 0 = 0)."""
    return -torch.where(logp > -torch.inf, logp.exp() * logp, 0.0).sum(-1)


def kl_divergence(logp_q: Tensor, logp_p: Tensor) -> Tensor:
    """KL(q || p) = sum q (log q - log p) over the last axis, 0 where q = 0. [..., M] -> [...]"""
    q = logp_q.exp()
    return torch.where(q > 0, q * (logp_q - logp_p), 0.0).sum(-1)


def pairwise_surrogate(
    logp: Tensor,  # [..., K], log pi_theta(y_i)
    logp_ref: Tensor,  # [..., K], log pi_t(y_i)
    rewards: Tensor,  # [..., K]
    tau: float,
    weights: Tensor | None = None,  # [..., K, K], w_ij (only i < j is read)
) -> Tensor:  # [...]
    """L(theta) = (1/K^2) sum_{i<j} w_ij (a_i - a_j)^2, a_i = r_i - tau (log pi_theta(y_i) -
    log pi_t(y_i)); w_ij = 1 by default, w_ij = 1[i, j in S] gives RED-Drop."""
    k = logp.shape[-1]
    a = rewards - tau * (logp - logp_ref)
    sq = (a[..., :, None] - a[..., None, :]).square()
    upper = torch.ones(k, k, dtype=torch.bool, device=logp.device).triu(1)
    w = upper if weights is None else weights * upper
    return (sq * w).sum((-1, -2)) / k**2


def surrogate_grad_at_reference(
    pi_t: Tensor, outcomes: Tensor, rewards: Tensor, tau: float
) -> Tensor:
    """grad_z L at theta = theta_t for a tabular softmax: -(2 tau/K) sum_i (r_i - rbar)(e_{y_i}
    - pi_t), i.e. group-relative REINFORCE. pi_t [A], outcomes [K] long, rewards [K] -> [A]."""
    k = outcomes.shape[-1]
    onehot = torch.nn.functional.one_hot(outcomes, pi_t.shape[-1]).to(pi_t.dtype)  # [K, A]
    centered = rewards - rewards.mean()
    return -(2 * tau / k) * (centered[:, None] * (onehot - pi_t)).sum(0)


def expected_surrogate_grad_at_reference(mu: Tensor, rewards: Tensor, tau: float, k: int) -> Tensor:
    """E_{y_1..y_K iid mu}[grad_z L at theta_t] = -(2 tau (K-1)/K) mu * (r - E_mu r).

    Since E[sum_i (r_i - rbar) g(y_i)] = (K - 1) Cov_mu(r, g) and the pi_t part of
    g = e_y - pi_t is constant. mu, rewards: [A] -> [A]."""
    return -(2 * tau * (k - 1) / k) * mu * (rewards - (mu * rewards).sum())


def enumerate_groups(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """All A^K ordered groups of K iid draws from ``probs`` [A], with their probabilities.

    Returns ``(outcomes [A^K, K] long, prob [A^K])``; ``prob`` sums to 1.
    """
    n_out = probs.shape[-1]
    outcomes = torch.tensor(list(itertools.product(range(n_out), repeat=k)), device=probs.device)
    return outcomes, probs[outcomes].prod(-1)


def expected_surrogate(
    logits: Tensor, logits_ref: Tensor, mu: Tensor, rewards: Tensor, tau: float, k: int
) -> Tensor:
    """E_{groups ~ mu^K}[L(theta)] by enumeration (scalar). logits, logits_ref, mu, rewards: [A]."""
    outcomes, prob = enumerate_groups(mu, k)
    logp = torch.log_softmax(logits, -1)[outcomes]
    logp_ref = torch.log_softmax(logits_ref, -1)[outcomes]
    return (prob * pairwise_surrogate(logp, logp_ref, rewards[outcomes], tau)).sum()


def minimize_expected_surrogate(
    logits_ref: Tensor, mu: Tensor, rewards: Tensor, tau: float, k: int, max_iter: int = 500
) -> Tensor:
    """argmin_z E_mu[L(z)] over a tabular softmax, by L-BFGS from z = logits_ref. [A] -> [A]

    With mu of full support the minimum is 0, reached exactly at softmax(z) = pi*.
    """
    z = logits_ref.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [z], lr=1.0, max_iter=max_iter, tolerance_grad=1e-14, tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = expected_surrogate(z, logits_ref, mu, rewards, tau, k)
        loss.backward()
        return loss

    opt.step(closure)
    return z.detach()


def expected_policy_loss(
    logits: Tensor, logits_behav: Tensor, rewards: Tensor, k: int, cfg: AlgorithmConfig
) -> Tensor:
    """E over all groups of K iid draws from softmax(logits_behav) of ``policy_loss`` with
    ``group_advantages``, for one prompt (B = 1, T = 1). logits, logits_behav, rewards: [A].

    Exact for presets without RED-Drop (whose random drop would need its own enumeration).
    """
    if cfg.drop != "none":
        raise ValueError(f"cfg.drop={cfg.drop!r} is not valid here; accepted: none")
    mu = torch.softmax(logits_behav.detach(), -1)
    outcomes, prob = enumerate_groups(mu, k)  # [G, K], [G]
    adv, _ = group_advantages(rewards[outcomes], cfg)  # [G, K]
    logp = torch.log_softmax(logits, -1)[outcomes][:, None, :, None]  # [G, 1, K, 1]
    logp_behav = torch.log_softmax(logits_behav.detach(), -1)[outcomes][:, None, :, None]
    mask = torch.ones_like(logp, dtype=torch.bool)

    def one_group(lp: Tensor, lb: Tensor, a: Tensor, m: Tensor) -> Tensor:
        return policy_loss(lp, lb, a, m, cfg)[0]

    losses = vmap(one_group)(logp, logp_behav, adv[:, None, :], mask)  # [G]
    return (prob * losses).sum()


def iterate_expected_reinforce(
    logits0: Tensor, rewards: Tensor, k: int, lr: float, n_iters: int, mu: Tensor | None = None
) -> Tensor:
    """Gradient descent on the exact expected ``reinforce`` preset loss. Data come from the
    fixed ``mu`` when given (off-policy), else from the current policy (on-policy).
    Returns the final policy [A]."""
    cfg = get_algorithm("reinforce")
    z = logits0.detach().clone()
    logits_mu = None if mu is None else mu.log()
    for _ in range(n_iters):
        z.requires_grad_(True)
        behav = z.detach() if logits_mu is None else logits_mu
        (grad,) = torch.autograd.grad(expected_policy_loss(z, behav, rewards, k, cfg), z)
        z = (z - lr * grad).detach()
    return torch.softmax(z, -1)


def iterate_surrogate_minimisers(
    mu: Tensor, rewards: Tensor, tau: float, k: int, n_iters: int
) -> Tensor:
    """pi_{n+1} = argmin E_{mu}[L(.; pi_n)] from pi_0 = mu, data always from the fixed mu.
    Returns [n_iters + 1, A], the iterates (closed form: pi_n ~ mu exp(n r / tau))."""
    z = mu.log()
    iterates = [torch.softmax(z, -1)]
    for _ in range(n_iters):
        z = minimize_expected_surrogate(z, mu, rewards, tau, k)
        iterates.append(torch.softmax(z, -1))
    return torch.stack(iterates)
