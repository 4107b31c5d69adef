"""Paired-seed hypothesis tests of pre-registered claims, their verdicts, and family-wise
control, shared by the bandit bench (``python -m bandits claims``) and ``reclight study``.

A claim compares two cells (an algorithm under a setting) on one per-seed figure. Seeds are
paired, so the data are the n per-seed differences Delta_i = figure_i(a) - figure_i(b). With the
claim's margin delta (fixed before running), each rule names the region of the true mean
difference Delta where the claim is TRUE:

==============  =========================  ===================================================
rule            claim true when            p_holds: one-sided test of H0 "claim false"
==============  =========================  ===================================================
``less``        Delta < -delta             lower(-delta)
``greater``     Delta > +delta             upper(+delta)
``alike``       -delta <= Delta <= +delta  max(upper(-delta), lower(+delta))   (TOST)
``not_worse``   Delta > -delta             upper(-delta)
==============  =========================  ===================================================

and ``p_contradicted`` tests H0 "claim true" the other way: ``upper(-delta)``, ``lower(+delta)``,
``min(1, 2 min(lower(-delta), upper(+delta)))``, ``lower(-delta)``. Here ``lower(c)`` is the
one-sided p-value of H0 "Delta >= c" (small when the data lie below c) and ``upper(c)`` that of
H0 "Delta <= c". A row **holds** iff ``p_holds < ALPHA``, is **contradicted** iff
``p_contradicted < ALPHA`` (the two cannot both happen), else **inconclusive**. ALPHA = 2.5%:
each verdict is a one-sided test at 2.5%, and since exactly one of its two null hypotheses is
true whatever Delta is, a false "holds" and a false "contradicted" have the same bound, 2.5%.

The test behind ``lower``/``upper`` (``test`` in a row):

- ``t`` (a continuous statistic): the one-sample t-test of the differences, normal differences
  assumed: with mean m, sample sd s, se = s / sqrt(n), F = Student's t cdf with n - 1 degrees of
  freedom (:func:`t_cdf`, an exact finite series), ``lower(c) = F((m - c) / se)`` and
  ``upper(c) = F((c - m) / se)``. In interval form, with the two-sided 95% t interval
  [lo, hi] = m -+ t_{0.975, n-1} se: less holds iff hi < -delta, is contradicted iff lo > -delta;
  greater: lo > +delta / hi < +delta; not_worse: lo > -delta / hi < -delta; alike holds iff
  -delta < lo and hi < +delta.
- ``sign-flip`` (a degenerate sample: all n differences equal X, to 1e-12 relative): the t
  statistic is infinite and the 95% interval has zero width, which would claim certainty from
  n numbers. No interval is given; the exact, distribution-free sign-flip test decides: the
  observed sum of (Delta_i - c) is the most extreme of the 2^n sign patterns, so
  ``lower(c) = 2^-n`` if X < c, else 1 (``upper`` mirrored). n <= 5 can never decide
  (2^-5 = 3.1% >= 2.5%): with 3 seeds a unanimous 3 of 3 is p = 1/8.
- ``exact McNemar`` (a binary statistic, 0/1 per seed, such as ``collapsed``): no t interval on an
  indicator. Of the n seeds, n10 have a = 1, b = 0 and n01 the reverse; given N = n10 + n01
  discordant seeds, n10 ~ Binomial(N, 1/2) at Delta = 0, so ``lower(0) = P(X <= n10)`` and
  ``upper(0) = P(X >= n10)``. Only ``less``/``greater`` apply, with margin 0 (an exact paired test
  of a margin on a difference of proportions does not exist in this form): the claim is "a is 1
  more often than b". Reported as counts.

Fewer than ``MIN_SEEDS`` paired seeds: no test (p = 1, ``inconclusive``, with the reason).

Departures from the textbook, and why:

1. ``alike`` contradicted doubles the smaller one-sided p (Bonferroni over the two sides of the
   band): "the 95% interval lies wholly outside the band" would be a two-sided 5% test whose
   error reaches 5% when delta is small against se. With the doubling its error is <= 2.5% like
   every other verdict; in interval form, the 97.5% interval lies wholly outside the band.
2. Every verdict is strict (p < ALPHA): an interval that touches the margin is inconclusive.

Power, per row (``half_width``, ``detectable``, ``seeds_needed``): the achieved half-width
t_{0.975, n-1} s / sqrt(n), and, by the t-quantile formula (the normal approximation of the
noncentral t, the observed s taken as the true sd), ``detectable`` = (t_{0.975, n-1} +
t_{0.80, n-1}) s / sqrt(n): a true Delta that far inside the claim's region, beyond the margin,
holds with about 80% power (``alike``: that far inside the nearer edge of the band).
``seeds_needed`` is the smallest n at which the same formula reaches the observed mean's distance
from the margin (the seeds to decide this row if the true Delta were the observed mean).

Family-wise control (:func:`adjust_family`): the rows of a study's primary claims are one family
of m rows (a claim tested under several settings contributes one row per setting). Each row
carries two null hypotheses ("claim false", tested by p_holds; "claim true", by p_contradicted),
exactly one of them true. Holm's step-down procedure is applied to the m ``p_holds`` and, apart,
to the m ``p_contradicted``, each at ALPHA: P(any primary row falsely holds) <= 2.5% and
P(any primary row falsely contradicted) <= 2.5%, under any dependence between rows (rows share
cells); so P(any false adjusted verdict in the family) <= 5%, and a family of one row keeps its
per-row verdict. (One Holm over all 2m p-values would be needlessly strict: every row keeps one
true hypothesis, so a rejection never lowers the count of possibly true ones and the logically
constrained step-down is Bonferroni at ALPHA / m for every step.) Secondary rows are not
adjusted. Untested rows (too few seeds) enter with p = 1: a pre-registered row counts in m.

Imports only the standard library (values may be any sequence of numbers, or a tensor).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from reclight.checks import check_float, check_int, invalid

RULES = ("less", "greater", "alike", "not_worse")
BINARY_RULES = ("less", "greater")
"""The rules a binary (0/1 per seed) statistic may take: the exact test has no margin."""
VERDICTS = ("yes", "no", "inconclusive")
"""Holds (p_holds < ALPHA) / contradicted (p_contradicted < ALPHA) / neither."""
FAMILIES = ("primary", "secondary")
"""Primary rows are Holm-adjusted as one family; secondary rows keep the per-row verdict."""
NOT_ADJUSTED = "not adjusted"
"""The ``adjusted_verdict`` of a secondary row."""
ALPHA = 0.025
"""Level of each one-sided test, i.e. of each verdict (per row, and per direction in a family)."""
LEVEL = 0.95
"""Two-sided confidence level of every reported interval (= 1 - 2 ALPHA)."""
POWER = 0.80
"""The power at which ``detectable`` and ``seeds_needed`` are stated."""
MIN_SEEDS = 3
"""Fewest paired seeds for a test; below it every row is ``inconclusive``."""
DEGENERATE_RTOL = 1e-12
"""Differences whose range is within this (relative to max(1, |X|)) count as all equal."""
MAX_SEEDS_SEARCHED = 1000
"""``seeds_needed`` above this is reported as None (not decidable at any practical scale)."""


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` (an integer >= 1) degrees of freedom.

    Exact finite series for integer df, with theta = atan(t / sqrt(df)) and A = P(|T| < |t|):

    - df = 1:        A = 2 theta / pi
    - df odd >= 3:   A = (2 / pi) (theta + sin(theta) cos(theta) S),
                     S = 1 + (2/3) c^2 + (2*4)/(3*5) c^4 + ... (df - 3)/2 terms after the 1
    - df even:       A = sin(theta) S,
                     S = 1 + (1/2) c^2 + (1*3)/(2*4) c^4 + ... (df - 2)/2 terms after the 1

    (c = cos(theta)); each term is the previous one times c^2 (j - 1) / j for j = 2, 4, ...
    (odd df) or j = 1, 3, ... (even df). Then P(T <= t) = (1 + sign(t) A) / 2. An infinite t
    gives 0 or 1.
    """
    df = check_int("df", df, minimum=1)
    if isinstance(t, (int, float)) and math.isinf(t):
        return 1.0 if t > 0 else 0.0
    return _t_cdf(check_float("t", t), df)


def _t_cdf(t: float, df: int) -> float:
    """:func:`t_cdf` without the argument checks (the inner loop of the quantile and the tests)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
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
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (0 < p < 1), to float
    precision (``t_quantile(0.975, 2)`` = 4.3027): Newton's method on :func:`t_cdf` with the t
    density f(t) = Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + t^2/df)^(-(df+1)/2), kept inside
    a bracket that bisection shrinks whenever a Newton step would leave it."""
    p = check_float("p", p, gt=0, lt=1)
    df = check_int("df", df, minimum=1)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = (lo + hi) / 2
    for _ in range(200):
        f = _t_cdf(x, df) - p
        if f == 0:
            return x
        lo, hi = (x, hi) if f < 0 else (lo, x)
        step = f / math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))
        new = x - step if lo < x - step < hi else (lo + hi) / 2
        if abs(new - x) <= 4 * math.ulp(x) or hi - lo <= 4 * math.ulp(hi):
            return new
        x = new
    return x


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly (integer sums; 1 for k <= 0, 0 for k > n)."""
    n = check_int("n", n, minimum=0)
    if k <= 0:
        return 1.0
    return sum(math.comb(n, j) for j in range(k, n + 1)) / 2**n


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


Tail = Callable[[float], float]
"""``lower(c)`` or ``upper(c)``: a one-sided p-value against the boundary c."""


def rule_pvalues(rule: str, lower: Tail, upper: Tail, margin: float) -> tuple[float, float]:
    """``(p_holds, p_contradicted)`` of ``rule`` from one test's one-sided p-values (the table in
    the module docstring): ``lower(c)`` tests H0 "Delta >= c", ``upper(c)`` H0 "Delta <= c"."""
    if rule == "less":
        return lower(-margin), upper(-margin)
    if rule == "greater":
        return upper(margin), lower(margin)
    if rule == "not_worse":
        return upper(-margin), lower(-margin)
    if rule == "alike":
        return max(upper(-margin), lower(margin)), min(1.0, 2 * min(lower(-margin), upper(margin)))
    raise invalid("rule", rule, ", ".join(RULES))


def verdict(p_holds: float, p_contradicted: float, alpha: float = ALPHA) -> str:
    """``"yes"`` if p_holds < alpha, ``"no"`` if p_contradicted < alpha, else ``"inconclusive"``
    (NaN p-values: inconclusive)."""
    if p_holds < alpha:
        return "yes"
    if p_contradicted < alpha:
        return "no"
    return "inconclusive"


def detectable(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """(t_{1-alpha, n-1} + t_{power, n-1}) sd / sqrt(n): how far inside the claim's region (beyond
    the margin) a true Delta must lie to be confirmed with about ``power`` (NaN for n < 2)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (t_quantile(1 - alpha, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def seeds_needed(distance: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The smallest n >= 2 with ``detectable(n, sd) <= distance`` (None: a distance <= 0, i.e. a
    mean on the margin, or more than ``MAX_SEEDS_SEARCHED`` seeds). The search starts at the
    normal-quantile answer ((z_{1-alpha} + z_{power}) sd / distance)^2, a lower bound (t quantiles
    exceed normal ones), and walks up: a few t quantiles instead of one per n."""
    if not (distance > 0 and math.isfinite(sd)):
        return None
    z = statistics.NormalDist()
    start = ((z.inv_cdf(1 - alpha) + z.inv_cdf(power)) * sd / distance) ** 2
    if start > MAX_SEEDS_SEARCHED:
        return None
    for n in range(max(2, math.floor(start)), MAX_SEEDS_SEARCHED + 1):
        if detectable(n, sd, alpha, power) <= distance:
            return n
    return None


def _distance(rule: str, mean: float, margin: float) -> tuple[float, float]:
    """The observed mean's distance from the nearest boundary of the claim's region, and the
    level of the test that would decide it there (alike contradicted: ALPHA / 2 per side)."""
    if rule == "alike":
        inside = margin - abs(mean)
        return abs(inside), (ALPHA if inside > 0 else ALPHA / 2)
    edge = margin if rule == "greater" else -margin
    return abs(mean - edge), ALPHA


def _pair(d: list[float]) -> tuple[int, int]:
    """``(n10, n01)``: seeds with Delta = +1 (a = 1, b = 0) and Delta = -1 (a = 0, b = 1)."""
    bad = [x for x in d if x not in (-1.0, 0.0, 1.0)]
    if bad:
        raise invalid("deltas", bad[0], "differences of a binary statistic: -1, 0 or +1 per seed")
    return sum(x == 1.0 for x in d), sum(x == -1.0 for x in d)


def paired_test(rule: str, deltas: Sequence[Any], margin: float, *, binary: bool = False,
                min_seeds: int = MIN_SEEDS) -> dict[str, Any]:
    """Test ``rule`` on per-seed paired differences ``deltas`` (module docstring). Returns::

        mean, lo, hi          mean Delta and its 95% t interval (NaN: degenerate, binary, n < 2)
        seeds, sd             n and the sample sd of the differences
        half_width            t_{0.975, n-1} sd / sqrt(n) (NaN where there is no interval)
        detectable            (t_{0.975, n-1} + t_{0.80, n-1}) sd / sqrt(n) (NaN: no t test)
        seeds_needed          seeds to decide at the observed mean with 80% power (None: cannot)
        test                  "t", "sign-flip", "exact McNemar" or "none"
        p_holds, p_contradicted, verdict, why (the reason for no t interval or no test; "" else)
        discordant            binary only: [n10, n01]
    """
    check_rule("rule", rule)
    margin = check_float("margin", margin, ge=0)
    d = _floats(deltas)
    n = len(d)
    mean = statistics.fmean(d) if d else math.nan
    sd = statistics.stdev(d) if n >= 2 else math.nan
    row: dict[str, Any] = {"mean": mean, "lo": math.nan, "hi": math.nan, "seeds": n, "sd": sd,
                           "half_width": math.nan, "detectable": math.nan, "seeds_needed": None, "test": "none",
                           "p_holds": 1.0, "p_contradicted": 1.0, "verdict": "inconclusive", "why": ""}
    if binary:
        if rule not in BINARY_RULES:
            raise invalid("rule", rule, f"{' or '.join(BINARY_RULES)} for a binary statistic (exact test, margin 0)")
        n10, n01 = _pair(d)
        row.update(discordant=[n10, n01], sd=math.nan)  # no sd, no t interval on an indicator
    if n < min_seeds:
        if not binary and n >= 2 and sd > 0:  # the (wide) interval is shown; no test is made
            row["half_width"] = t_quantile(1 - ALPHA, n - 1) * sd / math.sqrt(n)
            row["lo"], row["hi"] = mean - row["half_width"], mean + row["half_width"]
        row["why"] = f"{n} paired seed(s) < {min_seeds}, the minimum for a verdict"
        return row
    if binary:
        big = n10 + n01
        row["test"] = "exact McNemar"
        row["p_holds"], row["p_contradicted"] = rule_pvalues(
            rule, lambda c: 1 - binomial_tail(n10 + 1, big), lambda c: binomial_tail(n10, big), 0.0)
        if big < 6:
            row["why"] = f"{big} discordant seed(s): the exact p is at least 2^-{big}, never < {ALPHA:g} below 6"
    elif max(d) - min(d) <= DEGENERATE_RTOL * max(1.0, max(abs(x) for x in d)):
        x, tail = d[0], 2.0 ** -n
        row.update(sd=0.0, test="sign-flip")
        row["p_holds"], row["p_contradicted"] = rule_pvalues(
            rule, lambda c: tail if x < c else 1.0, lambda c: tail if x > c else 1.0, margin)
        row["why"] = (f"degenerate: all {n} differences equal {x:+.4g}; exact sign-flip test, p >= 2^-{n}"
                      + (f", never < {ALPHA:g} below 6 seeds" if n < 6 else ""))
    else:
        se, df = sd / math.sqrt(n), n - 1
        row.update(test="t", half_width=t_quantile(1 - ALPHA, df) * se, detectable=detectable(n, sd))
        row["lo"], row["hi"] = mean - row["half_width"], mean + row["half_width"]
        row["p_holds"], row["p_contradicted"] = rule_pvalues(
            rule, lambda c: _t_cdf((mean - c) / se, df), lambda c: _t_cdf((c - mean) / se, df), margin)
        distance, alpha = _distance(rule, mean, margin)
        row["seeds_needed"] = seeds_needed(distance, sd, alpha)
    row["verdict"] = verdict(row["p_holds"], row["p_contradicted"])
    return row


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: with p_(1) <= ... <= p_(m),
    adj_(k) = max_{j <= k} min(1, (m - j + 1) p_(j)); H_(k) is rejected at level alpha iff
    adj_(k) < alpha (the step-down: p_(j) < alpha / (m - j + 1) for every j <= k). A NaN p-value
    counts as 1."""
    p = [1.0 if math.isnan(x) else float(x) for x in pvalues]
    order = sorted(range(len(p)), key=lambda i: p[i])
    adjusted, running = [1.0] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        adjusted[i] = running
    return adjusted


def adjust_family(rows: list[dict[str, Any]], alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Add ``p_holds_adjusted``, ``p_contradicted_adjusted`` and ``adjusted_verdict`` to every row
    (in place; returned): rows with ``family == "primary"`` are one Holm family per direction
    (module docstring); the others get ``adjusted_verdict = "not adjusted"`` and None p-values."""
    primary = [r for r in rows if r["family"] == "primary"]
    for key in ("p_holds", "p_contradicted"):
        for r, adj in zip(primary, holm([r[key] for r in primary])):
            r[f"{key}_adjusted"] = adj
    for r in rows:
        if r["family"] == "primary":
            r["adjusted_verdict"] = verdict(r["p_holds_adjusted"], r["p_contradicted_adjusted"], alpha)
        else:
            r.update(p_holds_adjusted=None, p_contradicted_adjusted=None, adjusted_verdict=NOT_ADJUSTED)
    return rows


def count_verdicts(rows: Iterable[dict], key: str = "verdict") -> dict[str, int]:
    """``{"yes": n, "no": n, "inconclusive": n}`` over report rows (their ``key``)."""
    rows = list(rows)
    return {v: sum(r[key] == v for r in rows) for v in VERDICTS}


def count_line(rows: Iterable[dict], key: str = "verdict") -> str:
    """``holds 50 / contradicted 3 / inconclusive 22 of 75``."""
    rows = list(rows)
    c = count_verdicts(rows, key)
    return f"holds {c['yes']} / contradicted {c['no']} / inconclusive {c['inconclusive']} of {len(rows)}"


def rules_table() -> list[str]:
    """The markdown table of the rules and their tests (the reports print it above their claims)."""
    a = f"{100 * ALPHA:g}%"
    return [
        f"Each verdict is a one-sided test at {a}: **holds** rejects H0 \"claim false\" (p_holds < {ALPHA:g}), "
        f"**contradicted** rejects H0 \"claim true\" (p_contradicted < {ALPHA:g}), else **inconclusive**. Exactly one "
        f"of the two H0 is true, so a false holds and a false contradicted are each at most {a} likely. Continuous "
        "statistics: paired one-sample t-test (normal differences assumed), interval form below with the 95% t "
        "interval [lo, hi]; strict inequalities: touching the margin is inconclusive.",
        "",
        "| rule | claim true when (true Delta) | holds (p_holds < 0.025) | contradicted (p_contradicted < 0.025) |",
        "|---|---|---|---|",
        "| less | Delta < -delta | hi < -delta | lo > -delta |",
        "| greater | Delta > +delta | lo > +delta | hi < +delta |",
        "| alike | -delta ≤ Delta ≤ +delta | -delta < lo and hi < +delta (TOST: both one-sided p < 0.025) | "
        "2 x the smaller one-sided p < 0.025: the 97.5% interval lies wholly above +delta or below -delta |",
        "| not_worse | Delta > -delta | lo > -delta | hi < -delta |",
        "| binary statistic (`collapsed`; less / greater only) | greater: a is 1 on more seeds than b; less: on "
        "fewer (margin 0) | "
        "exact one-sided McNemar: binomial(N, 1/2) tail of the N discordant seeds | the same test, other tail |",
        "| degenerate (all n differences equal X) | as the rule | exact sign-flip: p = 2^-n if X lies strictly in "
        "the region, else 1 | 2^-n if X lies strictly outside (alike: 2 x 2^-n); n ≤ 5 never decides |",
    ]
