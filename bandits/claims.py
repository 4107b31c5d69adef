"""The paper's claims as pre-registered, paired statistical rules, plus exact theory checks.

Every claim compares two (preset, setting) cells of one environment on one per-seed figure of
the exact expected-reward curve R_t (t = 0..steps):

- ``final``:    R at the last step.
- ``auc``:      mean of R_t over all steps (how fast, and how far, it learned).
- ``early``:    R at step steps // 4.
- ``drawdown``: max_t R_t - R_final (how much of its best it lost: instability).

The seeds are paired (same environment and initial policy in both cells), so the statistic
is the per-seed difference Delta = figure(a) - figure(b). Its mean, 95% Student-t interval,
the minimum seed count, the tests (p_holds, p_contradicted, each verdict a one-sided test at
2.5%) and the three-way verdict (yes / no / inconclusive) by the rules ``less``, ``greater``,
``alike`` and ``not_worse`` with one margin fixed before running are those of
:mod:`reclight.stats` (shared with ``reclight study``; its docstring has the table). All seeded
rows are also Holm-adjusted as one family (``adjusted_verdict``); the per-row verdict stays the
bench's headline. Exact rows have no interval and no test: a failed exact check is ``no``.
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
from reclight.stats import paired_test

FIGURES: dict[str, Callable[[Tensor], Tensor]] = {
    "final": lambda r: r[-1],
    "auc": lambda r: r.mean(0),
    "early": lambda r: r[(r.shape[0] - 1) // 4],
    "drawdown": lambda r: r.max(0).values - r[-1],
}
"""Per-seed figures of a reward curve ``[steps + 1, seeds] -> [seeds]``."""


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


TRIVIAL = " [trivial: one update per batch, rho = 1]"
"""Appended to the on-policy clipping claims of one-update runs: there every ratio is exactly 1,
so IS = NoIS and no clipping band can act (the U > 1 cell gives these claims real verdicts)."""


def paper_claims(envs: list[str], settings: list[str], presets: list[str],
                 multi_setting: str | None = None) -> list[Claim]:
    """The claims of docs/algorithms.md section 5 that the given runs can test. ``multi_setting``
    names the extra on-policy cell with several updates per batch, if it was run: the
    clipping claims are then also tested there."""
    claims: list[Claim] = []
    clip_settings = settings + ([multi_setting] if multi_setting else [])

    def text(claim: str, setting: str) -> str:
        return claim + (TRIVIAL if setting == "on_policy" else "")

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
                for s in clip_settings:
                    claims.append(Claim(text("IS and NoIS with the same clipping behave alike", s), env,
                                        is_, s, nois, s, "auc", "alike"))
        for wide, narrow in (("rec_oneside_nois_wide", "rec_oneside_nois"),
                             ("rec_oneside_is_wide", "rec_oneside_is")):
            if not {wide, narrow} <= have:
                continue
            for s in ("on_policy", multi_setting, "periodic"):
                if s in clip_settings:
                    claims.append(Claim(text("Enlarged clipping (0.6, 2.0) learns faster", s), env,
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


def reward_curve(results: dict[tuple[str, str], RunResult], env: str, preset: str, setting: str) -> Tensor:
    """The exact expected-reward curve [steps + 1, seeds] of one cell."""
    res = results[(env, preset)]
    return res.history["reward/expected"][:, res.settings.index(setting)]


def evaluate(claim: Claim, results: dict[tuple[str, str], RunResult], margin: float) -> dict:
    """One report row: the measured mean difference, its 95% t-interval, the seed count, the
    tests and verdict of :func:`reclight.stats.paired_test` (inconclusive below
    ``reclight.stats.MIN_SEEDS`` seeds, with ``why``), ``family`` (every seeded row: primary) and
    ``holds`` (= verdict is yes)."""
    fig = FIGURES[claim.figure]
    delta = fig(reward_curve(results, claim.env, claim.preset_a, claim.setting_a)) - fig(
        reward_curve(results, claim.env, claim.preset_b, claim.setting_b)
    )
    stats = paired_test(claim.rule, delta, margin)
    return {"claim": claim.text, "family": "primary", "setting": claim.setting, "measured": claim.measured,
            "rule": claim.rule, **stats, "holds": stats["verdict"] == "yes"}


def theory_checks() -> list[dict]:
    """Exact (enumerated, float64) checks of docs/algorithms.md section 5 on the 3-arm
    counterexample mu = [0.3, 0.6, 0.1], r = [0, 0.8, 1], K = 2. No seeds: exact."""
    dtype = torch.float64
    mu = torch.tensor([0.3, 0.6, 0.1], dtype=dtype)
    r = torch.tensor([0.0, 0.8, 1.0], dtype=dtype)
    k, tau, lr, iters = 2, 0.1, 5.0, 200
    rows = []

    def row(claim: str, measured: str, value: float, holds: bool) -> None:
        rows.append({"claim": claim, "setting": "exact, 3-arm counterexample", "measured": measured,
                     "rule": "exact", "mean": value, "lo": math.nan, "hi": math.nan,
                     "seeds": "exact", "verdict": "yes" if holds else "no", "why": "", "family": "exact",
                     "holds": bool(holds)})

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
