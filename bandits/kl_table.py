"""The exact estimator table (docs/algorithms.md section 6.3): which KL does each sampled estimator's
gradient follow, on-policy and off-policy, plain or importance-weighted?

For one bandit context with A arms, a policy pi_theta = softmax(theta), a reference pi_ref and a
behaviour policy mu (mu = pi_theta on-policy), the expected gradient of the KL term the trainer
adds to its loss is, by enumerating the A outcomes (no Monte Carlo)::

    g = sum_a mu(a) * w(a) * d/dtheta k(log pi_theta(a), log pi_ref(a))

with w = 1 (plain) or w = pi_theta(a) / mu(a), detached (``kl_importance_weighted``), k one of
:func:`reclight.losses.kl_terms`' estimators, and the gradient flowing only through log pi_theta
of the sampled outcome (as autograd does in a trainer: the sampling distribution carries no
gradient). Each g is compared with the exact gradients of KL(pi_theta || pi_ref) (the penalty
the estimators are named after) and of KL(pi_ref || pi_theta): cosine and relative error
||g - g*|| / ||g*||. Known identities, checked in tests: on-policy (or importance-weighted),
E[grad k1] = 0, E[grad k2] = grad KL(pi || ref), E[grad k3] = grad KL(ref || pi).

The computation runs through the same ``reclight.losses.kl_terms`` the trainer uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reclight.algorithms import KL_ESTIMATORS
from reclight.losses import kl_terms


def expected_kl_gradient(theta: Tensor, logp_ref: Tensor, mu: Tensor | None, estimator: str,
                         weighted: bool) -> Tensor:  # [A] -> [A]
    """E_{a ~ mu}[w(a) grad_theta k(a)] exactly (mu None: on-policy, mu = pi_theta detached)."""
    theta = theta.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    sampler = logp.detach().exp() if mu is None else mu
    w = (logp.detach().exp() / sampler) if weighted else torch.ones_like(sampler)
    k = kl_terms(logp, logp_ref, estimator)
    (g,) = torch.autograd.grad((sampler * w * k).sum(), theta)
    return g


def exact_kl_gradients(theta: Tensor, logp_ref: Tensor) -> tuple[Tensor, Tensor]:
    """grad_theta KL(pi_theta || pi_ref) and grad_theta KL(pi_ref || pi_theta), exactly."""
    out = []
    for forward in (True, False):
        t = theta.detach().clone().requires_grad_(True)
        logp = torch.log_softmax(t, -1)
        kl = (logp.exp() * (logp - logp_ref)).sum() if forward else (logp_ref.exp() * (logp_ref - logp)).sum()
        out.append(torch.autograd.grad(kl, t)[0])
    return out[0], out[1]


def _compare(g: Tensor, target: Tensor) -> tuple[float, float]:
    """(cosine, relative error); the cosine of a zero vector (|g| < 1e-12 |target|, float64
    round-off) is reported as NaN: it has no direction."""
    norm = target.norm().item()
    cos = (torch.dot(g, target) / (g.norm() * norm)).item() if g.norm() > 1e-12 * norm else float("nan")
    return cos, (g - target).norm().item() / norm


def kl_estimator_table(n_arms: int = 6, seed: int = 0) -> list[dict]:
    """Rows estimator x {plain, importance-weighted} x {on-policy, off-policy}: cosine and relative
    error of the expected gradient against grad KL(pi||ref) and grad KL(ref||pi). float64; pi,
    ref and mu are random softmaxes of one seeded context (mu independent of pi: off-policy)."""
    g = torch.Generator().manual_seed(seed)
    theta, ref, behav = (torch.randn(n_arms, generator=g, dtype=torch.float64) for _ in range(3))
    logp_ref = torch.log_softmax(ref, -1)
    mu = torch.softmax(behav, -1)
    fwd, rev = exact_kl_gradients(theta, logp_ref)
    rows = []
    for estimator in KL_ESTIMATORS:
        for weighted in (False, True):
            for sampling, m in (("on-policy", None), ("off-policy", mu)):
                grad = expected_kl_gradient(theta, logp_ref, m, estimator, weighted)
                cos_f, err_f = _compare(grad, fwd)
                cos_r, err_r = _compare(grad, rev)
                rows.append({"estimator": estimator, "weighting": "importance-weighted" if weighted else "plain",
                             "sampling": sampling, "grad_norm": grad.norm().item(),
                             "cos_forward": cos_f, "relerr_forward": err_f,
                             "cos_reverse": cos_r, "relerr_reverse": err_r})
    return rows


def kl_table_markdown(rows: list[dict]) -> list[str]:
    """The table as markdown lines (for the claims report)."""
    lines = ["| estimator | weighting | samples | norm of E[grad] | cos vs grad KL(pi\\|\\|ref) | rel. error | "
             "cos vs grad KL(ref\\|\\|pi) | rel. error |", "|---|---|---|---|---|---|---|---|"]
    def cos(x: float) -> str:
        return "- (zero)" if x != x else f"{x:+.4f}"

    for r in rows:
        lines.append(f"| {r['estimator']} | {r['weighting']} | {r['sampling']} | {r['grad_norm']:.3g} | "
                     f"{cos(r['cos_forward'])} | {r['relerr_forward']:.3g} | {cos(r['cos_reverse'])} | "
                     f"{r['relerr_reverse']:.3g} |")
    return lines
