"""The paper's claims as pre-registered, paired statistical rules, plus exact theory checks.

Every claim compares two (preset, setting) cells of one environment on one per-seed figure of
the exact expected-reward curve R_t (t = 0..steps):

- ``final``:    R at the last step.
- ``auc``:      mean of R_t over all steps (how fast, and how far, it learned).
- ``early``:    R at step steps // 4.
- ``drawdown``: max_t R_t - R_final (how much of its best it lost: instability).

The seeds are paired (same environment and initial policy in both cells), so the statistic
is the per-seed difference Delta = figure(a) - figure(b), reported as mean and a 95% normal
interval [lo, hi] = mean +- 1.96 * sem. With delta = ``margin`` (one number for every claim,
fixed before running), each row gets one of three verdicts (``VERDICTS``):

============  ===================================  ======================================
rule          ``yes`` (holds)                      ``no`` (contradicted)
============  ===================================  ======================================
``less``      mean < -delta and hi < 0             lo > -delta
``greater``   mean > +delta and lo > 0             hi < +delta
``alike``     -delta <= lo and hi <= +delta        hi < -delta or lo > +delta
``not_worse`` lo > -delta                          hi < -delta
============  ===================================  ======================================

and ``inconclusive`` otherwise. Each rule states a region of the true Delta where the claim is
true (``less``: Delta < -delta, a practically relevant drop; ``greater``: Delta > +delta;
``alike``: -delta <= Delta <= +delta; ``not_worse``: Delta > -delta). ``yes`` is the rule as
pre-registered; ``no`` means the WHOLE interval lies in the complement of that region, i.e. the
data exclude every effect the claim allows (for ``less``/``greater``: even the smallest relevant
effect, delta, lies outside the interval). The two verdicts are disjoint by construction.
Boundaries: ``yes`` keeps its pre-registered (in)equalities (``alike`` inclusive, the others
strict); ``no`` is always strict, so an interval that merely touches the margin (hi == +delta
for ``greater``, lo == -delta for ``less``, hi == -delta for ``not_worse``, lo == +delta or
hi == -delta for ``alike``) is ``inconclusive``, never evidence against. A NaN interval (one
seed) is ``inconclusive``. Exact rows have no interval: a failed exact check is ``no``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bandits import exact
from bandits.simulate import RunResult
from reclight.algorithms import get_algorithm

FIGURES: dict[str, Callable[[Tensor], Tensor]] = {
    "final": lambda r: r[-1],
    "auc": lambda r: r.mean(0),
    "early": lambda r: r[(r.shape[0] - 1) // 4],
    "drawdown": lambda r: r.max(0).values - r[-1],
}
"""Per-seed figures of a reward curve ``[steps + 1, seeds] -> [seeds]``."""
RULES = ("less", "greater", "alike", "not_worse")
VERDICTS = ("yes", "no", "inconclusive")
"""Holds by the rule / contradicted (interval wholly where the claim is false) / neither."""
Z95 = 1.96


@dataclass(frozen=True)
class Claim:
    """``figure(preset_a @ setting_a) - figure(preset_b @ setting_b)`` on ``env`` obeys ``rule``."""

    text: str
    env: str
    preset_a: str
    setting_a: str
    preset_b: str
    setting_b: str
    figure: str
    rule: str

    @property
    def setting(self) -> str:
        if self.setting_a == self.setting_b:
            return f"{self.env} / {self.setting_a}"
        return f"{self.env} / {self.setting_a} vs {self.setting_b}"

    @property
    def measured(self) -> str:
        a = self.preset_a if self.preset_a != self.preset_b else self.setting_a
        b = self.preset_b if self.preset_a != self.preset_b else self.setting_b
        return f"{self.figure}({a}) - {self.figure}({b})"


def paper_claims(envs: list[str], settings: list[str], presets: list[str]) -> list[Claim]:
    """The claims of ALGORITHMS.md section 5 that the given runs can test."""
    claims: list[Claim] = []
    have = set(presets)
    off = [s for s in settings if s != "on_policy"]
    for env in envs:
        if "reinforce" in have and "on_policy" in settings:
            for s in off:
                claims.append(Claim("REINFORCE (no regularizer) degrades off-policy", env,
                                    "reinforce", s, "reinforce", "on_policy", "final", "less"))
        for is_, nois in (("rec_oneside_is", "rec_oneside_nois"), ("rec_twoside_is", "rec_twoside_nois"),
                          ("rec_ring_is", "rec_ring_nois"), ("rec_oneside_is_wide", "rec_oneside_nois_wide")):
            if {is_, nois} <= have:
                for s in settings:
                    claims.append(Claim("IS and NoIS with the same clipping behave alike", env,
                                        is_, s, nois, s, "auc", "alike"))
        for wide, narrow in (("rec_oneside_nois_wide", "rec_oneside_nois"),
                             ("rec_oneside_is_wide", "rec_oneside_is")):
            if not {wide, narrow} <= have:
                continue
            for s in ("on_policy", "periodic"):
                if s in settings:
                    claims.append(Claim("Enlarged clipping (0.6, 2.0) learns faster", env,
                                        wide, s, narrow, s, "auc", "greater"))
            if "offline" in settings:
                claims.append(Claim("Enlarged clipping offline: faster early", env,
                                    wide, "offline", narrow, "offline", "early", "greater"))
                claims.append(Claim("Enlarged clipping offline: less stable (larger drawdown)", env,
                                    wide, "offline", narrow, "offline", "drawdown", "greater"))
        for red in ("red_drop", "red_weight"):
            if {red, "rec_oneside_nois"} <= have:
                for s in settings:
                    claims.append(Claim(f"{red} matches or beats REC-OneSide-NoIS", env,
                                        red, s, "rec_oneside_nois", s, "final", "not_worse"))
    return claims


def decide(rule: str, mean: float, lo: float, hi: float, margin: float) -> bool:
    """Apply one of ``RULES`` to a paired difference's mean and 95% interval [lo, hi]."""
    if rule == "less":
        return mean < -margin and hi < 0
    if rule == "greater":
        return mean > margin and lo > 0
    if rule == "alike":
        return -margin <= lo and hi <= margin
    if rule == "not_worse":
        return lo > -margin
    raise ValueError(f"rule={rule!r} is not valid; accepted: {', '.join(RULES)}")


def contradicted(rule: str, mean: float, lo: float, hi: float, margin: float) -> bool:
    """Whether the whole 95% interval [lo, hi] lies where ``rule``'s claim is false (strict:
    touching the margin is not enough). ``mean`` is unused (lo <= mean <= hi) but kept so the
    signature matches :func:`decide`."""
    if rule == "less":
        return lo > -margin
    if rule == "greater":
        return hi < margin
    if rule == "alike":
        return hi < -margin or lo > margin
    if rule == "not_worse":
        return hi < -margin
    raise ValueError(f"rule={rule!r} is not valid; accepted: {', '.join(RULES)}")


def verdict(rule: str, mean: float, lo: float, hi: float, margin: float) -> str:
    """``"yes"`` if :func:`decide` holds, ``"no"`` if :func:`contradicted`, else ``"inconclusive"``."""
    if decide(rule, mean, lo, hi, margin):
        return "yes"
    if contradicted(rule, mean, lo, hi, margin):
        return "no"
    return "inconclusive"


def count_verdicts(rows: list[dict]) -> dict[str, int]:
    """``{"yes": n, "no": n, "inconclusive": n}`` over report rows."""
    return {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}


def count_line(rows: list[dict]) -> str:
    """``holds 50 / contradicted 3 / inconclusive 22 of 75``."""
    c = count_verdicts(rows)
    return f"holds {c['yes']} / contradicted {c['no']} / inconclusive {c['inconclusive']} of {len(rows)}"


def mean_ci(x: Tensor) -> tuple[float, float, float]:
    """Mean and 95% normal interval over seeds of ``x`` [seeds]."""
    mean = x.mean().item()
    half = Z95 * x.std().item() / math.sqrt(x.numel()) if x.numel() > 1 else math.nan
    return mean, mean - half, mean + half


def reward_curve(results: dict[tuple[str, str], RunResult], env: str, preset: str, setting: str) -> Tensor:
    """The exact expected-reward curve [steps + 1, seeds] of one cell."""
    res = results[(env, preset)]
    return res.history["reward/expected"][:, res.settings.index(setting)]


def evaluate(claim: Claim, results: dict[tuple[str, str], RunResult], margin: float) -> dict:
    """One report row: the measured mean difference, its interval, its verdict (yes / no /
    inconclusive) and ``holds`` (= verdict is yes)."""
    fig = FIGURES[claim.figure]
    delta = fig(reward_curve(results, claim.env, claim.preset_a, claim.setting_a)) - fig(
        reward_curve(results, claim.env, claim.preset_b, claim.setting_b)
    )
    mean, lo, hi = mean_ci(delta)
    return {
        "claim": claim.text, "setting": claim.setting, "measured": claim.measured,
        "rule": claim.rule, "mean": mean, "lo": lo, "hi": hi, "seeds": delta.numel(),
        "verdict": (v := verdict(claim.rule, mean, lo, hi, margin)), "holds": v == "yes",
    }


def theory_checks() -> list[dict]:
    """Exact (enumerated, float64) checks of ALGORITHMS.md section 5 on the 3-arm
    counterexample mu = [0.3, 0.6, 0.1], r = [0, 0.8, 1], K = 2. No seeds: exact."""
    dtype = torch.float64
    mu = torch.tensor([0.3, 0.6, 0.1], dtype=dtype)
    r = torch.tensor([0.0, 0.8, 1.0], dtype=dtype)
    k, tau, lr, iters = 2, 0.1, 5.0, 200
    rows = []

    def row(claim: str, measured: str, value: float, holds: bool) -> None:
        rows.append({"claim": claim, "setting": "exact, 3-arm counterexample", "measured": measured,
                     "rule": "exact", "mean": value, "lo": math.nan, "hi": math.nan,
                     "seeds": "exact", "verdict": "yes" if holds else "no", "holds": bool(holds)})

    pi_off = exact.iterate_expected_reinforce(mu.log(), r, k, lr, iters, mu=mu)
    row("Expected REINFORCE on data from a fixed mu converges to arm 2",
        f"pi(arm 2) after {iters} steps", pi_off[1].item(), int(pi_off.argmax()) == 1 and pi_off[1] > 0.99)
    pi_on = exact.iterate_expected_reinforce(mu.log(), r, k, lr, iters)
    row("On-policy expected REINFORCE converges to arm 3",
        f"pi(arm 3) after {iters} steps", pi_on[2].item(), int(pi_on.argmax()) == 2 and pi_on[2] > 0.99)
    iterates = exact.iterate_surrogate_minimisers(mu, r, tau, k, 4)
    row("Iterated surrogate minimisers (data from mu) converge to arm 3",
        "pi_4(arm 3), tau = 0.1", iterates[-1, 2].item(), int(iterates[-1].argmax()) == 2 and iterates[-1, 2] > 0.99)
    closed = exact.kl_regularized_optimum(mu.expand(5, 3), torch.arange(5, dtype=dtype)[:, None] * r, tau)
    err = (iterates - closed).abs().max().item()
    row("Surrogate minimiser = pi_t exp(r/tau)/Z (off-policy data)",
        "max abs(pi_n - pi_n*), n = 1..4", err, err < 1e-5)
    logits = torch.tensor([0.2, -0.4, 0.1], dtype=dtype, requires_grad=True)
    grad_pl = torch.autograd.grad(
        exact.expected_policy_loss(logits, mu.log(), r, k, get_algorithm("reinforce")), logits)[0]
    gap = (2 * tau * grad_pl - exact.expected_surrogate_grad_at_reference(mu, r, tau, k)).abs().max().item()
    row("E grad L(theta_t) = 2 tau * E grad policy_loss(reinforce), any sampling mu",
        "max abs difference", gap, gap < 1e-12)
    return rows
