"""Exact expected gradients of one asynchronous training step (docs/async.md, "The bench").

What is enumerated: for a FIXED schedule (the clock's plan of step s: which groups, which prompt,
which version sampled each token) and FIXED policy snapshots (theta_s, the trainer's weights,
and the behaviour versions theta_v), the expectation over the sampled actions and the Bernoulli
rewards of the gradient of step s's loss at theta_s::

    E[grad L_s] = sum_groups K * sum_y mu_g(y) * sum_{r in {0, 1}} P(r | y)
                  * sum_{S = 0}^{K - 1} Binom(S; K - 1, p_g) * grad l(y, A(r, S))

Why that is exact: every term of ``policy_loss`` for sample i depends on its own trajectory y_i
and on its advantage A_i only (the ratio, the masks, IS and behaviour weights are per token or
per sequence of y_i), and with the token_mean normalizer N = sum_groups K * H_p fixed (lengths
depend on the prompt only), the batch loss is a sum of per-sample terms / N. By symmetry the K
samples of a group contribute K times the first; with 0/1 rewards A_1 = A(r_1, S) is a function
of its own reward and of S, the number of successes among the other K - 1 samples, which is
Binomial(K - 1, p_g) with p_g = sum_y mu_g(y) rbar(y), independent of y_1. ``A(r, S)`` comes from
the project's ``group_advantages`` (std normalisation included) and every l from
``policy_loss`` (vmapped over the enumerated (y, r, S) with the batch's counts), so nothing of
the loss is re-implemented. Not covered (refused): RED-Drop's random drops, uniform-group
filtering (both make N random), rewards other than Bernoulli.

What the table compares: sum over a window of steps of E[grad L_s] under a schedule and a loss,
against the same sum for the synchronous on-policy loop (B = P and an epoch-ordered stream: each
step trains every prompt once, i.e. the uniform prompt distribution), by cosine and relative
error. Two sets of snapshots: all versions equal to theta_0 (staleness has no effect: only the
prompt selection differs), and the versions of a trained synchronous run (selection + staleness).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import vmap

from bandits.async_bench import behaviour_token_logp
from bandits.problems import PromptedProblem
from reclight.advantages import group_advantages
from reclight.algorithms import AlgorithmConfig, get_algorithm
from reclight.clock import StepPlan
from reclight.losses import policy_loss

CORRECTIONS: dict[str, AlgorithmConfig] = {
    "plain (rec_oneside_nois)": get_algorithm("rec_oneside_nois"),
    "decoupled_tis (token TIS, cap 2)": get_algorithm("decoupled_tis"),
    "MIS (token mask, cap 2)": get_algorithm("rec_oneside_is", ratio_anchor="proximal", behavior_correction="mask",
                                              behavior_correction_level="token", behavior_correction_cap=2.0),
    "sequence IS, no cap": get_algorithm("rec_oneside_is", ratio_anchor="proximal", behavior_correction="truncate",
                                         behavior_correction_level="sequence", behavior_correction_cap=1e12),
}
"""The losses of the table: the paper's default, and behaviour-side corrections (docs/algorithms.md
section 6.2). The last one has no cap in effect: the exact sequence-level importance weight."""
ON_POLICY_TOKENS = "same prompts, on-policy tokens"
"""The row whose tokens are all resampled from theta_s: what a perfect behaviour correction reaches."""


def _check_exact(cfg: AlgorithmConfig) -> None:
    if cfg.drop != "none" or cfg.filter_uniform_groups or cfg.needs_reference or cfg.entropy_coef:
        raise ValueError("the exact step gradient needs a loss whose normalizer is fixed and whose terms are per "
                         "sample: accepted: drop 'none', no filter_uniform_groups, no reference KL, no entropy term")


def advantage_table(cfg: AlgorithmConfig, group_size: int) -> Tensor:
    """A(r, S) of ``group_advantages`` for the first sample of a 0/1 group whose own reward is r
    and whose other K - 1 samples hold S successes. Returns [2, K] (float64)."""
    k = group_size
    rewards = torch.zeros(2, k, k, dtype=torch.float64)
    for r in (0, 1):
        rewards[r, :, 0] = r
        for s in range(k):
            rewards[r, s, 1: 1 + s] = 1.0
    adv, _ = group_advantages(rewards.view(2 * k, k), cfg)
    return adv[:, 0].view(2, k)


def expected_step_loss(problem: PromptedProblem, plan: StepPlan, theta: Tensor, snapshots: Sequence[Tensor],
                       cfg: AlgorithmConfig, group_size: int, *, on_policy_tokens: bool = False) -> Tensor:
    """E[L_s] over actions and rewards for one row: ``theta`` [S, A] (with grad: the trainer at
    the start of step s), ``snapshots[v]`` [S, A] the behaviour versions. See the module
    docstring. With ``on_policy_tokens`` every token is sampled by theta (detached)."""
    _check_exact(cfg)
    if not problem.bernoulli:
        raise ValueError("reward_noise='none' is not valid for the exact step gradient; accepted: bernoulli")
    k, t_max = group_size, problem.horizon
    n_tokens = k * sum(int(problem.horizons[g.prompt]) for g in plan.groups)
    n_seqs = k * len(plan.groups)
    adv_tab = advantage_table(cfg, k)  # [2, K]
    binom = torch.tensor([math.comb(k - 1, s) for s in range(k)], dtype=torch.float64)
    cur = theta[None]  # [1, S, A]
    parts = {"w": [], "lp": [], "lb": [], "lx": [], "adv": [], "mask": []}
    for g in plan.groups:
        p, h = g.prompt, int(problem.horizons[g.prompt])
        if on_policy_tokens:
            tok_b = behaviour_token_logp(problem, {0: cur.detach()}, p, [0] * h)[0]
        else:
            tok_b = behaviour_token_logp(problem, {v: snapshots[v][None] for v in set(g.token_versions)}, p,
                                         g.token_versions[:h])[0]  # [M_p, H]
        n_out = tok_b.shape[0]
        tok_x = behaviour_token_logp(problem, {0: cur.detach()}, p, [0] * h)[0]
        tok_p = behaviour_token_logp(problem, {0: cur}, p, [0] * h)[0]  # with grad
        mu = tok_b.sum(-1).exp()  # [M_p]
        rbar = problem.reward_means[0, p, :n_out]
        p_g = (mu * rbar).sum()
        p_others = binom * p_g ** torch.arange(k) * (1 - p_g) ** (k - 1 - torch.arange(k))  # [K]
        p_r = torch.stack([1 - rbar, rbar], -1)  # [M_p, 2]
        w = k * mu[:, None, None] * p_r[:, :, None] * p_others[None, None, :]  # [M_p, 2, K]
        combos = 2 * k

        def rep(x: Tensor) -> Tensor:  # [M_p, H] -> [M_p * 2K, T], padded
            x = x[:, None, :].expand(n_out, combos, h).reshape(n_out * combos, h)
            return torch.nn.functional.pad(x, (0, t_max - h))

        parts["w"].append(w.reshape(-1))
        parts["lp"].append(rep(tok_p))
        parts["lb"].append(rep(tok_b))
        parts["lx"].append(rep(tok_x))
        parts["adv"].append(adv_tab.reshape(1, combos).expand(n_out, combos).reshape(-1))
        parts["mask"].append(rep(torch.ones(n_out, h, dtype=torch.bool)))
    cat = {key: torch.cat(v) for key, v in parts.items()}
    shape = (-1, 1, 1, t_max)

    def one(lp: Tensor, lb: Tensor, a: Tensor, m: Tensor, lx: Tensor) -> Tensor:
        return policy_loss(lp, lb, a, m, cfg, logp_prox=lx if cfg.needs_proximal else None, num_tokens=n_tokens,
                           num_seqs=n_seqs, num_samples=n_seqs, norm_length=t_max)[0]

    losses = vmap(one)(cat["lp"].view(shape), cat["lb"].view(shape), cat["adv"].view(-1, 1, 1),
                       cat["mask"].view(shape), cat["lx"].view(shape))
    return (cat["w"] * losses).sum()


def expected_step_gradient(problem: PromptedProblem, plan: StepPlan, theta: Tensor, snapshots: Sequence[Tensor],
                           cfg: AlgorithmConfig, group_size: int, *, on_policy_tokens: bool = False) -> Tensor:
    """grad_theta of :func:`expected_step_loss` at ``theta`` [S, A]. Returns [S, A]."""
    theta = theta.detach().clone().requires_grad_(True)
    loss = expected_step_loss(problem, plan, theta, snapshots, cfg, group_size, on_policy_tokens=on_policy_tokens)
    return torch.autograd.grad(loss, theta)[0]


def window_gradient(problem: PromptedProblem, plans: Sequence[StepPlan], trajectory: Sequence[Tensor],
                    window: range, cfg: AlgorithmConfig, group_size: int, *,
                    on_policy_tokens: bool = False) -> tuple[Tensor, list[Tensor]]:
    """sum over steps s in ``window`` of E[grad L_s] at theta_s = ``trajectory[s]`` (behaviour
    versions ``trajectory[v]``), and the per-step gradients."""
    steps = [expected_step_gradient(problem, plans[s], trajectory[s], trajectory, cfg, group_size,
                                    on_policy_tokens=on_policy_tokens) for s in window]
    return torch.stack(steps).sum(0), steps


def compare(g: Tensor, ref: Tensor) -> tuple[float, float]:
    """(cosine, relative error ||g - ref|| / ||ref||) of flattened gradients."""
    g, ref = g.flatten(), ref.flatten()
    return (torch.dot(g, ref) / (g.norm() * ref.norm())).item(), ((g - ref).norm() / ref.norm()).item()


def exact_async_table(problem: PromptedProblem, plans: dict[str, Sequence[StepPlan]], trained: Sequence[Tensor],
                      window: range, group_size: int) -> list[dict]:
    """Rows schedule x loss: cosine and relative error of the window's expected gradient against
    the synchronous loop's (``plans["sync"]``), with every snapshot = theta_0 (``fixed``: the
    prompt selection alone) and with the trained synchronous run's snapshots (``trained``)."""
    fixed = [trained[0]] * len(trained)
    plain = CORRECTIONS["plain (rec_oneside_nois)"]
    refs = {name: window_gradient(problem, plans["sync"], traj, window, plain, group_size)[0]
            for name, traj in (("fixed", fixed), ("trained", trained))}
    rows = []
    for sched, sched_plans in plans.items():
        losses = [(name, cfg, False) for name, cfg in CORRECTIONS.items()] + [(ON_POLICY_TOKENS, plain, True)]
        for loss_name, cfg, on_tokens in losses:
            row = {"schedule": sched, "loss": loss_name}
            for name, traj in (("fixed", fixed), ("trained", trained)):
                total, _ = window_gradient(problem, sched_plans, traj, window, cfg, group_size,
                                           on_policy_tokens=on_tokens)
                row[f"cos_{name}"], row[f"relerr_{name}"] = compare(total, refs[name])
            rows.append(row)
    return rows


AGGREGATIONS = ("token_mean", "seq_mean_token_sum")
"""The normalizers of the selection table: per token of the batch (length-dependent), or a fixed
number of sequences."""


def selection_table(problem: PromptedProblem, plans: dict[str, Sequence[StepPlan]], theta: Tensor, window: range,
                    group_size: int) -> list[dict]:
    """The prompt selection alone (every version = ``theta``, on-policy tokens): per schedule, the
    window's trained groups per prompt and mean batch tokens, and for the plain loss under each
    normalizer of ``AGGREGATIONS`` the cosine and relative error against the synchronous loop.
    With ``seq_mean_token_sum`` every sample weighs the same in every batch, so only WHICH
    prompts were trained matters; ``token_mean`` also weighs a batch of short responses more."""
    traj = [theta] * (max(window) + 1)
    rows = []
    refs = {}
    for agg in AGGREGATIONS:
        cfg = CORRECTIONS["plain (rec_oneside_nois)"].replace(loss_agg=agg)
        refs[agg] = (cfg, window_gradient(problem, plans["sync"], traj, window, cfg, group_size)[0])
    for sched, sched_plans in plans.items():
        counts = [0] * problem.n_prompts
        tokens = []
        for s in window:
            for g in sched_plans[s].groups:
                counts[g.prompt] += 1
            tokens.append(group_size * sum(int(problem.horizons[g.prompt]) for g in sched_plans[s].groups))
        row = {"schedule": sched, "trained_by_prompt": counts, "batch_tokens_min": min(tokens),
               "batch_tokens_max": max(tokens)}
        for agg, (cfg, ref) in refs.items():
            total, _ = window_gradient(problem, sched_plans, traj, window, cfg, group_size)
            row[f"cos_{agg}"], row[f"relerr_{agg}"] = compare(total, ref)
        rows.append(row)
    return rows


def selection_table_markdown(rows: list[dict], horizons: Sequence[int]) -> list[str]:
    head = " / ".join(f"H={h}" for h in horizons)
    lines = [f"| schedule | trained groups ({head}) | batch tokens (min-max) | token_mean: cos | rel. error | "
             "seq_mean_token_sum: cos | rel. error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {' / '.join(map(str, r['trained_by_prompt']))} | "
                     f"{r['batch_tokens_min']}-{r['batch_tokens_max']} | {r['cos_token_mean']:+.4f} | "
                     f"{r['relerr_token_mean']:.4f} | {r['cos_seq_mean_token_sum']:+.4f} | "
                     f"{r['relerr_seq_mean_token_sum']:.4f} |")
    return lines


def exact_table_markdown(rows: list[dict]) -> list[str]:
    lines = ["| schedule | loss | fixed policy: cos | rel. error | trained snapshots: cos | rel. error |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['loss']} | {r['cos_fixed']:+.4f} | {r['relerr_fixed']:.4f} | "
                     f"{r['cos_trained']:+.4f} | {r['relerr_trained']:.4f} |")
    return lines
