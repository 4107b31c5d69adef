"""Paired-seed statistics and the three-way claim verdicts, shared by the bandit bench
(``python -m bandits claims``) and ``reclight study``: one implementation, imported by both.

A claim compares two cells (an algorithm under a setting) on one per-seed figure. Seeds are
paired (seed n starts from the same initial policy in both cells), so the statistic is the
per-seed difference Delta = figure(a) - figure(b), summarised by its mean and a two-sided 95%
**Student-t** interval over the n seeds::

    [lo, hi] = mean -+ t_{0.975, n-1} * sd / sqrt(n)        (sd: sample standard deviation)

(t_{0.975, n-1} is 12.71 for 2 seeds, 4.30 for 3, 2.78 for 5, 2.04 for 32, 1.96 only in the
limit: a normal 1.96 interval over 2 seeds would claim far more than two numbers can show.)
Below ``MIN_SEEDS`` paired seeds no verdict is given at all (``inconclusive``), whatever the
interval: the report states that minimum.

With delta = the claim's margin (one number fixed before running), each claim gets one of
three verdicts (``VERDICTS``):

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
data exclude every effect the claim allows. The two verdicts are disjoint by construction.
Boundaries: ``yes`` keeps its (in)equalities (``alike`` inclusive, the others strict); ``no`` is
always strict, so an interval that merely touches the margin is ``inconclusive``, never
evidence against. A NaN interval (one seed) is ``inconclusive``.

Imports only the standard library (values may be any sequence of numbers, or a tensor).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from reclight.checks import check_float, check_int, invalid

RULES = ("less", "greater", "alike", "not_worse")
VERDICTS = ("yes", "no", "inconclusive")
"""Holds by the rule / contradicted (interval wholly where the claim is false) / neither."""
LEVEL = 0.95
"""Two-sided confidence level of every interval."""
MIN_SEEDS = 3
"""Fewest paired seeds for a yes/no verdict; below it every row is ``inconclusive``."""


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` (an integer >= 1) degrees of freedom.

    Exact finite series for integer df, with theta = atan(t / sqrt(df)) and A = P(|T| < |t|):

    - df = 1:        A = 2 theta / pi
    - df odd >= 3:   A = (2 / pi) (theta + sin(theta) cos(theta) S),
                     S = 1 + (2/3) c^2 + (2*4)/(3*5) c^4 + ... (df - 3)/2 terms after the 1
    - df even:       A = sin(theta) S,
                     S = 1 + (1/2) c^2 + (1*3)/(2*4) c^4 + ... (df - 2)/2 terms after the 1

    (c = cos(theta)); each term is the previous one times c^2 (j - 1) / j for j = 2, 4, ...
    (odd df) or j = 1, 3, ... (even df). Then P(T <= t) = (1 + sign(t) A) / 2.
    """
    df = check_int("df", df, minimum=1)
    t = check_float("t", t)
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    series, term = 1.0, 1.0
    if df % 2:
        for j in range(2, df - 1, 2):  # (df - 3) / 2 terms
            term *= c2 * j / (j + 1)
            series += term
        a = 2 / math.pi * (theta + (s * math.cos(theta) * series if df > 1 else 0.0))
    else:
        for j in range(1, df - 2, 2):  # (df - 2) / 2 terms
            term *= c2 * j / (j + 1)
            series += term
        a = s * series
    return 0.5 + math.copysign(min(a, 1.0), t) / 2


def t_quantile(p: float, df: int) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (0 < p < 1), by
    bisection on :func:`t_cdf` to float precision (``t_quantile(0.975, 2)`` = 4.3027)."""
    p = check_float("p", p, gt=0, lt=1)
    df = check_int("df", df, minimum=1)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def _floats(values: Iterable[Any]) -> list[float]:
    if hasattr(values, "tolist"):  # a tensor or array
        values = values.tolist()
    return [float(v) for v in values]


def mean_ci(values: Iterable[Any], level: float = LEVEL) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` and its two-sided Student-t interval at
    ``level`` (NaN bounds for a single value; ``(nan, nan, nan)`` for none)."""
    x = _floats(values)
    if not x:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(x)
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = t_quantile((1 + level) / 2, len(x) - 1) * statistics.stdev(x) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def check_rule(field: str, rule: Any) -> str:
    if rule not in RULES:
        raise invalid(field, rule, ", ".join(RULES))
    return rule


def decide(rule: str, mean: float, lo: float, hi: float, margin: float) -> bool:
    """Whether one of ``RULES`` holds for a paired difference's mean and interval [lo, hi]."""
    if rule == "less":
        return mean < -margin and hi < 0
    if rule == "greater":
        return mean > margin and lo > 0
    if rule == "alike":
        return -margin <= lo and hi <= margin
    if rule == "not_worse":
        return lo > -margin
    raise invalid("rule", rule, ", ".join(RULES))


def contradicted(rule: str, mean: float, lo: float, hi: float, margin: float) -> bool:
    """Whether the whole interval [lo, hi] lies where ``rule``'s claim is false (strict:
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
    raise invalid("rule", rule, ", ".join(RULES))


def verdict(rule: str, mean: float, lo: float, hi: float, margin: float) -> str:
    """``"yes"`` if :func:`decide` holds, ``"no"`` if :func:`contradicted`, else ``"inconclusive"``."""
    if decide(rule, mean, lo, hi, margin):
        return "yes"
    if contradicted(rule, mean, lo, hi, margin):
        return "no"
    return "inconclusive"


def paired_verdict(rule: str, deltas: Sequence[Any], margin: float, min_seeds: int = MIN_SEEDS) -> dict[str, Any]:
    """Mean, interval, seed count and verdict of per-seed paired differences ``deltas``:
    ``{"mean", "lo", "hi", "seeds", "verdict", "why"}`` (``why`` says why a row got no
    verdict: too few seeds). Fewer than ``min_seeds`` differences give ``inconclusive``."""
    check_rule("rule", rule)
    d = _floats(deltas)
    mean, lo, hi = mean_ci(d)
    if len(d) < min_seeds:
        return {"mean": mean, "lo": lo, "hi": hi, "seeds": len(d), "verdict": "inconclusive",
                "why": f"{len(d)} paired seed(s) < {min_seeds}, the minimum for a verdict"}
    return {"mean": mean, "lo": lo, "hi": hi, "seeds": len(d), "verdict": verdict(rule, mean, lo, hi, margin),
            "why": ""}


def count_verdicts(rows: Iterable[dict]) -> dict[str, int]:
    """``{"yes": n, "no": n, "inconclusive": n}`` over report rows (each with a ``verdict``)."""
    rows = list(rows)
    return {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}


def count_line(rows: Iterable[dict]) -> str:
    """``holds 50 / contradicted 3 / inconclusive 22 of 75``."""
    rows = list(rows)
    c = count_verdicts(rows)
    return f"holds {c['yes']} / contradicted {c['no']} / inconclusive {c['inconclusive']} of {len(rows)}"


def rules_table() -> list[str]:
    """The markdown table of the rules (the reports print it above their claims)."""
    return [
        "| rule | claim true when (true Delta) | yes (holds) | no (contradicted) |",
        "|---|---|---|---|",
        "| less | Delta < -delta | mean < -delta and hi < 0 | lo > -delta |",
        "| greater | Delta > +delta | mean > +delta and lo > 0 | hi < +delta |",
        "| alike | -delta ≤ Delta ≤ +delta | -delta ≤ lo and hi ≤ +delta | hi < -delta or lo > +delta |",
        "| not_worse | Delta > -delta | lo > -delta | hi < -delta |",
    ]
