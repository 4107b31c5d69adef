"""The exact rollout-correction table (docs/algorithms.md section 6.8): which correction's expected
gradient is the on-policy gradient, under which mismatch between the behaviour policy mu (what
sampled) and the trainer's pi_t?

One chain walk (``reclight/Chain-v0``: 5 positions from 2, T = 4 actions, Bernoulli reward 0.5 at
the left wall and 1 at the right one; 3^4 = 81 trajectories), K = 8 samples per group, the policy
pi_t = softmax(theta_t) a fixed trained point: theta_0 ~ N(0, 1) (seed 0), then 10 Adam steps
(lr 0.1, the claims suite's) on the exact expected on-policy loss. The behaviour policies, all fixed
before any correction is compared (nothing below is tuned toward a row):

- ``on-policy``: mu = pi_t (every correction must give the on-policy gradient exactly);
- ``engine``: mu = softmax(theta_t + c z), z ~ N(0, 1) per logit (seed 0) and c chosen so that
  the mean |log mu - log pi_t| per sampled token is 5e-3, the gap measured between the bf16
  engine and the trainer (docs/llm.md);
- ``lag 1``: mu = pi one update behind (theta_{t-1});
- ``lag 1 + engine``: mu = softmax(theta_{t-1} + c z), the same c and z;
- ``lag 10``: mu = pi at theta_0, ten updates behind (the LLM trainer's ``lag`` setting);
- ``top-p 0.9``: the engine samples pi_t truncated to its top-p nucleus at each state and
  renormalised, while it records the untruncated log pi_t (what reclight records) and the kept mass S.

For each (behaviour, correction) the expected gradient of the group loss at theta_t (a batch's
first update: logp = logp_prox) is computed exactly, by the enumeration of
``bandits/async_exact.py``: every trajectory y, its reward r in {0, 1} and the number S of successes
among the other K - 1 samples (Binomial), with A(r, S) from ``group_advantages`` and every loss
term from ``policy_loss`` (nothing of the loss is re-implemented; the whole-sequence rules decide
per sample, so the sum over samples is exact). Reported against the on-policy gradient g_on (the
plain loss with samples from pi_t): cosine, relative error ||g - g_on|| / ||g_on||, the standard
deviation of one sample's gradient term relative to on-policy's (the square root of
E||g_i||^2 - ||E g_i||^2, exact), and the expected fraction of sequences a rule rejects.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from bandits.async_exact import advantage_table
from bandits.envs import ChainEnv
from bandits.problems import TabularProblem, chain_problem
from reclight.algorithms import PRESETS, AlgorithmConfig, get_algorithm
from reclight.losses import policy_loss

F64 = torch.float64
CHAIN = dict(length=5, start=2, horizon=4, left_reward=0.5, right_reward=1.0, reward_noise="bernoulli")
GROUP_SIZE = 8
ENGINE_GAP = 5e-3
"""Mean |log mu - log pi_t| per sampled token of the ``engine`` behaviour (the bf16 engine's gap)."""
LAG_STEPS, LAG_LR = 10, 0.1
TOP_P = 0.9
SEED = 0

CORRECTIONS: dict[str, AlgorithmConfig] = {
    "reinforce (no correction)": get_algorithm("reinforce"),
    "rec_oneside_nois (mask on pi_t/mu)": get_algorithm("rec_oneside_nois"),
    "rec_oneside_is (token IS factor pi_t/mu)": get_algorithm("rec_oneside_is"),
    "token IS, uncapped (proximal, w_t)": get_algorithm("reinforce", ratio_anchor="proximal"),
    "decoupled_tis (token TIS, cap 2)": PRESETS["decoupled_tis"],
    "sequence IS, uncapped": get_algorithm("reinforce", ratio_anchor="proximal", behavior_correction_level="sequence"),
    "sequence TIS, cap 2": get_algorithm("reinforce", ratio_anchor="proximal", behavior_correction="truncate",
                                         behavior_correction_level="sequence", behavior_correction_cap=2.0),
    "icepop (token mask [0.5, 5])": PRESETS["icepop"],
    "geo_mask (decoupled_tis + geo [0.99, 1.01])": PRESETS["geo_mask"],
    "seq-mask-tis (w_t + geo [0.999, 1.002])": get_algorithm("rec_oneside_is", ratio_anchor="proximal",
                                                             geo_mask=(0.999, 1.002)),
    "token veto [0.5, 2] + decoupled_tis": PRESETS["decoupled_tis"].replace(token_veto=(0.5, 2.0)),
    "opsm 1e-4 + rec_oneside_is": get_algorithm("rec_oneside_is", opsm_threshold=1e-4),
    "decoupled_tis + truncation_correction": PRESETS["decoupled_tis"].replace(truncation_correction=True),
    "sequence IS + truncation_correction": get_algorithm("reinforce", ratio_anchor="proximal",
                                                         behavior_correction_level="sequence",
                                                         truncation_correction=True),
}
"""The rows: every correction on a base without std normalisation (so that the on-policy gradient
is one vector for all), named by what differs."""


@dataclass(frozen=True)
class Behaviour:
    """How the samples were drawn and what the engine recorded, per state of the chain."""

    name: str
    sample_logp: Tensor  # [S, A] log of the distribution actually sampled (-inf where top-p cut)
    recorded_logp: Tensor  # [S, A] the log-probs the engine records as logp_behav
    log_kept: Tensor  # [S] log S of top-p (0 without truncation)


def chain() -> TabularProblem:
    """The table's chain, every trajectory enumerated (one prompt)."""
    return chain_problem(ChainEnv(**CHAIN), 1)


def _combos(problem: TabularProblem, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every (trajectory y, own reward r, successes S among the other K - 1), y outermost:
    returns y [n], r [n], S [n] (long) and the tokens' flat (state, action) [n, T]."""
    n_out = problem.states.shape[1]
    y = torch.arange(n_out).repeat_interleave(2 * k)
    r = torch.arange(2).repeat_interleave(k).repeat(n_out)
    s = torch.arange(k).repeat(2 * n_out)
    return y, r, s, problem.states[0, y], problem.actions[0, y]


def sample_terms(problem: TabularProblem, theta: Tensor, behaviour: Behaviour, cfg: AlgorithmConfig,
                 k: int = GROUP_SIZE) -> dict[str, Tensor]:
    """The exact per-sample decomposition of the expected group-loss gradient at ``theta`` [S, A]
    (the trainer's weights, a batch's first update) with samples from ``behaviour``: ``prob`` [n]
    (P(y) P(r | y) Binom(S; K - 1, p)), ``grad`` [n, S * A] (the gradient of that sample's term of
    the group loss, token_mean over the group's K * T tokens) and ``rejected`` [n] (1 where a rule
    rejects the sample; 0 without rules). E[grad L_group] = K * sum_n prob grad."""
    y, r, succ, states, actions = _combos(problem, k)
    horizon, n_act = problem.horizon, problem.n_actions
    pi = torch.softmax(theta, -1)
    logp_table = torch.log_softmax(theta, -1)
    seq_logq = behaviour.sample_logp[states, actions].sum(-1)  # [n] log P(y) under the sampler
    p_out = torch.zeros(problem.states.shape[1], dtype=F64).index_add(0, y, seq_logq.exp()) / (2 * k)
    rbar = problem.reward_means[0, 0].to(F64)  # [M] mean reward of each trajectory
    p_success = (p_out * rbar).sum()  # P(r = 1) for any other sample of the group
    binom = torch.tensor([math.comb(k - 1, j) for j in range(k)], dtype=F64)
    p_others = binom * p_success ** torch.arange(k) * (1 - p_success) ** (k - 1 - torch.arange(k))
    p_r = torch.where(r == 1, rbar[y], 1 - rbar[y])
    prob = seq_logq.exp() * p_r * p_others[succ]  # [n]
    adv = advantage_table(cfg, k)[r, succ]  # [n]

    logp = logp_table[states, actions].detach().clone().requires_grad_(True)  # [n, T]: pi_theta = pi_t here
    logp_behav = behaviour.recorded_logp[states, actions]
    log_kept = behaviour.log_kept[states]
    shape = (-1, 1, 1, horizon)
    mask = torch.ones(states.shape[0], 1, 1, horizon, dtype=torch.bool)

    def one(lp: Tensor, lb: Tensor, a: Tensor, m: Tensor, lx: Tensor, ls: Tensor) -> tuple[Tensor, dict]:
        return policy_loss(lp, lb, a, m, cfg, logp_prox=lx if cfg.needs_proximal else None,
                           logp_kept_mass=ls if cfg.truncation_correction else None, num_tokens=k * horizon,
                           num_seqs=k, num_samples=k, norm_length=horizon)

    losses, metrics = vmap(one)(logp.view(shape), logp_behav.view(shape), adv.view(-1, 1, 1), mask,
                                logp.detach().view(shape), log_kept.view(shape))
    (coef,) = torch.autograd.grad(losses.sum(), logp)  # [n, T]: d(term) / d log pi(a_t | s_t), rows independent
    # d log pi(a | s) / d theta[s] = onehot(a) - pi(s), scattered into the state of each token
    per_token = coef[..., None] * (torch.nn.functional.one_hot(actions, n_act).to(F64) - pi[states])  # [n, T, A]
    grad = torch.zeros(states.shape[0], problem.n_states, n_act, dtype=F64)
    grad.scatter_add_(1, states[..., None].expand(-1, -1, n_act), per_token)
    rejected = metrics.get("mismatch/reject_seq_frac", torch.zeros_like(prob))
    return {"prob": prob.detach(), "grad": grad.flatten(1), "rejected": rejected.detach()}


def moments(terms: dict[str, Tensor]) -> tuple[Tensor, float, float]:
    """(mean per-sample gradient E g_i [S * A], its variance E||g_i||^2 - ||E g_i||^2, the expected
    rejected fraction) of :func:`sample_terms`."""
    p, g = terms["prob"], terms["grad"]
    mean = (p[:, None] * g).sum(0)
    var = (p * g.square().sum(-1)).sum() - mean.square().sum()
    return mean, var.clamp(min=0).item(), (p * terms["rejected"]).sum().item()


def on_policy(theta: Tensor) -> Behaviour:
    logp = torch.log_softmax(theta, -1)
    return Behaviour("on-policy", logp, logp, torch.zeros(theta.shape[0], dtype=F64))


def per_token_gap(problem: TabularProblem, behaviour: Behaviour, theta: Tensor) -> tuple[float, float]:
    """(mean |log mu - log pi_t| per sampled token, mean log(mu / pi_t) per token = KL(mu || pi_t) / T),
    exact expectations over the trajectories mu samples; mu = the distribution actually sampled."""
    states, actions = problem.states[0], problem.actions[0]  # [M, T]
    lq = behaviour.sample_logp[states, actions]
    p = lq.sum(-1).exp()
    diff = torch.where(p[:, None] > 0, lq - torch.log_softmax(theta, -1)[states, actions], 0.0)
    return (p * diff.abs().mean(-1)).sum().item(), (p * diff.mean(-1)).sum().item()


def engine_noise_scale(problem: TabularProblem, theta: Tensor, z: Tensor, gap: float = ENGINE_GAP) -> float:
    """c such that mu = softmax(theta + c z) has mean |log mu - log pi_t| per sampled token ``gap``
    (bisection, 60 halvings: the gap grows with c over the bracket)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        logp = torch.log_softmax(theta + mid * z, -1)
        got, _ = per_token_gap(problem, Behaviour("", logp, logp, theta.new_zeros(theta.shape[0])), theta)
        lo, hi = (mid, hi) if got < gap else (lo, mid)
    return (lo + hi) / 2


def top_p_behaviour(theta: Tensor, top_p: float = TOP_P) -> Behaviour:
    """pi_t truncated per state to its nucleus (sorted descending, a token is kept while the mass
    ranked above it is < top_p: HF's rule) and renormalised; the engine records log pi_t and log S."""
    logp = torch.log_softmax(theta, -1)
    probs, order = logp.exp().sort(-1, descending=True)
    kept_sorted = (torch.cumsum(probs, -1) - probs) < top_p
    kept = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    log_kept = torch.logsumexp(logp.masked_fill(~kept, -torch.inf), -1)  # [S]
    return Behaviour(f"top-p {top_p}", torch.where(kept, logp - log_kept[:, None], -torch.inf), logp, log_kept)


def trajectory(problem: TabularProblem) -> list[Tensor]:
    """theta_0 .. theta_10: theta_0 ~ N(0, 1) (seed 0), then Adam steps (lr 0.1) on the exact expected
    on-policy reinforce loss; the table's trainer is at theta_t = theta_10."""
    g = torch.Generator().manual_seed(SEED)
    theta = torch.randn(problem.n_states, problem.n_actions, generator=g, dtype=F64).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=LAG_LR)
    cfg = CORRECTIONS["reinforce (no correction)"]
    out = [theta.detach().clone()]
    for _ in range(LAG_STEPS):
        mean, _, _ = moments(sample_terms(problem, theta.detach(), on_policy(theta.detach()), cfg))
        theta.grad = GROUP_SIZE * mean.view_as(theta)
        opt.step()
        out.append(theta.detach().clone())
    return out


def behaviours(problem: TabularProblem, thetas: list[Tensor]) -> tuple[list[Behaviour], float]:
    """The behaviours of the module docstring for the trainer at thetas[-1], and the engine noise
    scale c (fixed once, at theta_t, and reused for the lagged engine)."""
    theta = thetas[-1]
    z = torch.randn(problem.n_states, problem.n_actions, generator=torch.Generator().manual_seed(SEED + 1), dtype=F64)
    c = engine_noise_scale(problem, theta, z)
    zeros = theta.new_zeros(theta.shape[0])

    def sampled(name: str, logits: Tensor) -> Behaviour:
        logp = torch.log_softmax(logits, -1)
        return Behaviour(name, logp, logp, zeros)

    return [on_policy(theta), sampled("engine", theta + c * z), sampled("lag 1", thetas[-2]),
            sampled("lag 1 + engine", thetas[-2] + c * z), sampled(f"lag {LAG_STEPS}", thetas[0]),
            top_p_behaviour(theta)], c


def _compare(g: Tensor, ref: Tensor) -> tuple[float, float]:
    """(cosine, relative error); a zero gradient (every sample rejected) has no direction: NaN."""
    norm = ref.norm()
    cos = (torch.dot(g, ref) / (g.norm() * norm)).item() if g.norm() > 1e-12 * norm else float("nan")
    return cos, ((g - ref).norm() / norm).item()


@functools.lru_cache(maxsize=1)
def correction_table() -> dict:
    """Every (behaviour, correction) cell: cosine and relative error against the on-policy gradient,
    the per-sample gradient sd relative to on-policy's, the expected rejected fraction; plus each
    behaviour's mean per-token gap and KL(mu || pi_t) per token, and the engine noise scale c.
    Deterministic (no seeds beyond the fixed ones); computed once per process (a few seconds)."""
    problem = chain()
    thetas = trajectory(problem)
    theta = thetas[-1]
    behs, c = behaviours(problem, thetas)
    ref_mean, ref_var, _ = moments(sample_terms(problem, theta, behs[0], CORRECTIONS["reinforce (no correction)"]))
    cells, context = [], []
    for b in behs:
        gap, kl = per_token_gap(problem, b, theta)
        context.append({"behaviour": b.name, "gap": gap, "kl_per_token": kl})
        for name, cfg in CORRECTIONS.items():
            mean, var, rejected = moments(sample_terms(problem, theta, b, cfg))
            cos, err = _compare(mean, ref_mean)
            cells.append({"behaviour": b.name, "correction": name, "cos": cos, "relerr": err,
                          "sd_ratio": math.sqrt(var / ref_var), "rejected": rejected})
    return {"cells": cells, "behaviours": context, "engine_noise_scale": c}


def _cos(x: float) -> str:
    return "zero" if x != x else f"{x:+.4f}"


def correction_table_markdown(table: dict) -> list[str]:
    """Two tables (relative error [cosine]; per-sample sd ratio and rejected fraction), one row per
    correction, one column per behaviour, and the behaviours' gaps."""
    names = [b["behaviour"] for b in table["behaviours"]]
    by = {(c["behaviour"], c["correction"]): c for c in table["cells"]}
    head = "| correction | " + " | ".join(names) + " |"
    sep = "|---|" + "---|" * len(names)
    lines = ["Relative error of the expected gradient against the on-policy one [cosine]:", "", head, sep]
    for corr in CORRECTIONS:
        cells = [f"{by[(b, corr)]['relerr']:.3g} [{_cos(by[(b, corr)]['cos'])}]" for b in names]
        lines.append(f"| {corr} | " + " | ".join(cells) + " |")
    lines += ["", "Per-sample gradient sd relative to on-policy's (expected fraction of sequences rejected):", "",
              head, sep]
    for corr in CORRECTIONS:
        cells = []
        for b in names:
            cell = by[(b, corr)]
            cells.append(f"{cell['sd_ratio']:.3f}" + (f" ({cell['rejected']:.3f})" if cell["rejected"] > 0 else ""))
        lines.append(f"| {corr} | " + " | ".join(cells) + " |")
    gaps = "; ".join(f"{b['behaviour']}: {b['gap']:.2e} / {b['kl_per_token']:.2e}" for b in table["behaviours"])
    lines += ["", f"Mean |log mu - log pi_t| / KL(mu || pi_t) per sampled token: {gaps} (engine noise scale "
              f"c = {table['engine_noise_scale']:.4g}; top-p: of the distribution sampled, which the engine does "
              "not record)."]
    return lines


def reading() -> list[str]:
    """How to read the table: what the theory says, and what tests/bandits/test_correction_table.py
    asserts of it."""
    return [
        "Read: only the exact sequence-level weight (`sequence IS, uncapped`: w = pi_t(y) / mu(y)) is unbiased, "
        "and it is unbiased under every mismatch that keeps mu's support: engine noise, staleness, both (relative "
        "error at round-off). With group-relative advantages the other samples' baseline drops out, since "
        "E_mu[w grad log pi] = E_pi[grad log pi] = 0. Its price is variance, which grows with the mismatch. "
        "Token-level weights (`rec_oneside_is`, `decoupled_tis`, `icepop`) correct each token's conditional but "
        "not the distribution of its prefix: biased for T > 1 (exact for T = 1), the bias shrinking with the "
        "mismatch. A cap (TIS) and every rejection rule (`icepop`'s band, `geo_mask`, seq-mask-tis, the token "
        "veto, OPSM) is biased as soon as it acts: they trade bias for a smaller variance or guard against "
        "outliers; they correct nothing, and are exact only while they reject nothing (the on-policy column). "
        "OPSM drops negative-advantage sequences only, so its bias has one sign. Under top-p no row recovers "
        "the untruncated gradient: trajectories through a cut token are never sampled, a support mismatch no "
        "weight can undo; `truncation_correction` makes the weights inside the nucleus exact (its sequence-level "
        "row is the on-policy sum over the trajectories top-p can sample, with the sampled distribution's mean "
        "reward as baseline: tested) and leaves that error in place.",
    ]
