"""reclight.stats: the Student-t quantile against closed forms and tabulated values; the tests
behind every verdict against closed-form p-values (df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))),
exact binomial and sign-flip values, and the interval form of each rule; the zero-spread and
n = 3 edges; Holm on the textbook example; the power figures against t tables (shared by the
bandit bench and ``reclight study``)."""

import math
import random

import pytest
import torch

from reclight.stats import (ALPHA, MIN_SEEDS, RULES, adjust_family, binomial_tail, count_line, count_verdicts,
                            detectable, holm, mean_ci, paired_test, rules_table, seeds_needed, t_cdf, t_quantile,
                            verdict)

# Two-sided 95% critical values t_{0.975, df} (standard tables, 6 significant digits), a 99% one,
# and the t_{0.80, df} of the power formula; df = 1 and 2 are also checked against closed forms.
TABLE = [(1, 0.975, 12.7062), (2, 0.975, 4.30265), (3, 0.975, 3.18245), (4, 0.975, 2.77645),
         (5, 0.975, 2.57058), (9, 0.975, 2.26216), (29, 0.975, 2.04523), (31, 0.975, 2.03951),
         (120, 0.975, 1.97993), (10, 0.995, 3.16927), (3, 0.95, 2.35336),
         (2, 0.80, 1.06066), (3, 0.80, 0.978472), (7, 0.80, 0.896030), (8, 0.80, 0.888890), (9, 0.80, 0.883457)]


def t2_cdf(t):
    """Student's t cdf, df = 2, in closed form (independent of the series in t_cdf)."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


@pytest.mark.parametrize("df,p,expected", TABLE)
def test_t_quantile_matches_the_tables(df, p, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=6e-5)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_closed_forms_df1_df2(p):
    """df = 1 is the Cauchy: F^-1(p) = tan(pi (p - 1/2)). df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
    so F^-1(p) = (2p - 1) / sqrt(2 p (1 - p))."""
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)


def test_t_cdf_symmetry_and_normal_limit():
    for df in (1, 2, 3, 4, 7, 8):
        for t in (0.0, 0.3, 1.7, 5.0):
            assert t_cdf(t, df) + t_cdf(-t, df) == pytest.approx(1.0, abs=1e-15)
    assert t_cdf(0.0, 5) == 0.5 and t_cdf(math.inf, 3) == 1.0 and t_cdf(-math.inf, 3) == 0.0
    # as df grows the quantile falls to the normal 1.959964; never below it
    assert 1.959964 < t_quantile(0.975, 2000) < 1.9612
    assert t_quantile(0.025, 4) == -t_quantile(0.975, 4)


def test_t_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"df=0 is not valid; accepted: an integer >= 1"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match=r"p=1.0 is not valid; accepted: 0 < p < 1"):
        t_quantile(1.0, 3)


def test_mean_ci_by_hand():
    """x = [1, 2, 3]: mean 2, sd 1, half-width t_{0.975,2} / sqrt(3) = 4.302653 / 1.732051 = 2.484138."""
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.30265273 / math.sqrt(3), rel=1e-8)
    assert mean - lo == pytest.approx(hi - mean, rel=1e-15)
    assert mean_ci(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)) == (mean, lo, hi)  # tensors too
    m1, lo1, hi1 = mean_ci([0.5])
    assert m1 == 0.5 and math.isnan(lo1) and math.isnan(hi1)


def test_two_seeds_give_no_verdict_however_large_the_effect():
    """Below MIN_SEEDS = 3 no test is made (p = 1); the t interval of 2 values, mean +- 12.7 se with
    se = |x1 - x2| / 2, is still shown."""
    row = paired_test("greater", [0.30, 0.31], margin=0.02)
    assert MIN_SEEDS == 3 and row["seeds"] == 2 and row["verdict"] == "inconclusive" and row["test"] == "none"
    assert "minimum" in row["why"] and row["p_holds"] == 1.0 == row["p_contradicted"]
    assert row["lo"] == pytest.approx(0.305 - 12.7062047 * 0.005, rel=1e-6)


# df = 2 (three seeds) in closed form, F = t2_cdf, se = sd / sqrt(3):
#   [0.01, 0.04, 0.07] greater 0.02: m = 0.04, sd = 0.03, t = 0.02 / (0.03 / sqrt 3) = 2 / sqrt 3;
#       t / (2 sqrt(2 + 4/3)) = 1 / sqrt 10, so p_holds = 1/2 - 1/sqrt(10) = 0.18377.
#   [0.10, 0.11, 0.12] greater 0.02: t = 0.09 sqrt(3) / 0.01 = 9 sqrt 3, sqrt(2 + 243) = 7 sqrt 5,
#       p_holds = 1/2 - (9/14) sqrt(3/5) = 0.0020449.
#   [-0.01, 0, 0.01] alike 0.05: each side t = 5 sqrt 3, p = 1/2 - 5 sqrt(3) / (2 sqrt 77) = 0.0065362.
#   [-0.01, 0.02, 0.05] not_worse 0.03: t = 0.05 / (0.03 / sqrt 3) = 5 / sqrt 3,
#       p_holds = 1/2 - 5 / (2 sqrt 31) = 0.0509867.
CLOSED = [
    ("greater", [0.01, 0.04, 0.07], 0.02, 0.5 - 1 / math.sqrt(10), 0.5 + 1 / math.sqrt(10), "inconclusive"),
    ("greater", [0.10, 0.11, 0.12], 0.02, 0.5 - 9 / 14 * math.sqrt(3 / 5), 0.5 + 9 / 14 * math.sqrt(3 / 5), "yes"),
    ("less", [-0.10, -0.11, -0.12], 0.02, 0.5 - 9 / 14 * math.sqrt(3 / 5), 0.5 + 9 / 14 * math.sqrt(3 / 5), "yes"),
    ("less", [0.10, 0.11, 0.12], 0.02, 1 - t2_cdf(-0.13 * math.sqrt(3) / 0.01), t2_cdf(-0.13 * math.sqrt(3) / 0.01),
     "no"),
    ("alike", [-0.01, 0.0, 0.01], 0.05, 0.5 - 5 * math.sqrt(3) / (2 * math.sqrt(77)), 1.0, "yes"),
    ("alike", [0.10, 0.11, 0.12], 0.02, t2_cdf(9 * math.sqrt(3)), 2 * t2_cdf(-9 * math.sqrt(3)), "no"),
    ("not_worse", [-0.01, 0.02, 0.05], 0.03, 0.5 - 5 / (2 * math.sqrt(31)), 0.5 + 5 / (2 * math.sqrt(31)),
     "inconclusive"),
]


@pytest.mark.parametrize("rule,deltas,margin,p_holds,p_contra,expected", CLOSED, ids=[f"{c[0]}-{c[5]}-{i}" for i, c in
                                                                                      enumerate(CLOSED)])
def test_p_values_match_the_df2_closed_form(rule, deltas, margin, p_holds, p_contra, expected):
    row = paired_test(rule, deltas, margin)
    assert row["test"] == "t" and row["seeds"] == 3
    assert row["p_holds"] == pytest.approx(p_holds, rel=1e-9, abs=1e-15)
    assert row["p_contradicted"] == pytest.approx(p_contra, rel=1e-9, abs=1e-15)
    assert row["verdict"] == expected
    assert row["half_width"] == pytest.approx(4.30265273 * row["sd"] / math.sqrt(3), rel=1e-8)
    assert row["hi"] - row["mean"] == pytest.approx(row["half_width"], rel=1e-12)


def test_the_hand_values_themselves():
    """The closed forms above, as numbers (so a slip in the algebra cannot hide)."""
    assert 0.5 - 1 / math.sqrt(10) == pytest.approx(0.1837722, abs=1e-7)
    assert 0.5 - 9 / 14 * math.sqrt(3 / 5) == pytest.approx(0.0020449, abs=1e-7)
    assert 0.5 - 5 * math.sqrt(3) / (2 * math.sqrt(77)) == pytest.approx(0.0065362, abs=1e-7)
    assert 0.5 - 5 / (2 * math.sqrt(31)) == pytest.approx(0.0509867, abs=1e-7)


def test_alike_contradicted_is_a_2_5_percent_test():
    """Deltas m -+ a with a = 0.01 sqrt(3), m = 0.07 (sd = a, se = 0.01), margin 0.02: (m - delta) / se
    = 5 and the one-sided p above the band is 1/2 - 5 / (2 sqrt 27) = 0.018875. 'greater' holds
    (0.0189 < 0.025), and the 95% interval [0.027, 0.113] lies wholly above the band, yet 'alike' is
    not contradicted: its p doubles to 0.0377 (Bonferroni over the two sides), keeping its error at
    2.5% like every other verdict."""
    a = 0.01 * math.sqrt(3)
    deltas = [0.07 - a, 0.07, 0.07 + a]
    one_sided = 0.5 - 5 / (2 * math.sqrt(27))
    greater, alike = paired_test("greater", deltas, 0.02), paired_test("alike", deltas, 0.02)
    assert greater["p_holds"] == pytest.approx(one_sided, rel=1e-9) and greater["verdict"] == "yes"
    assert alike["lo"] > 0.02 and alike["p_contradicted"] == pytest.approx(2 * one_sided, rel=1e-9)
    assert alike["verdict"] == "inconclusive"


@pytest.mark.parametrize("rule", RULES)
def test_verdicts_match_the_interval_form_and_mirror(rule):
    """On 300 random samples (n = 3..10): the verdict from the p-values equals the interval form of
    the rules table, computed here from the 95% (alike contradicted: 97.5%) t interval; and
    mirroring the data (Delta -> -Delta) swaps less and greater with the same p-values."""
    rng = random.Random(0)
    delta = 0.25
    mirror = {"less": "greater", "greater": "less"}
    for _ in range(300):
        n = rng.randint(3, 10)
        d = [rng.gauss(rng.uniform(-1, 1), rng.uniform(0.05, 1)) for _ in range(n)]
        row = paired_test(rule, d, delta)
        m, se = row["mean"], row["sd"] / math.sqrt(n)
        lo, hi = m - t_quantile(0.975, n - 1) * se, m + t_quantile(0.975, n - 1) * se
        lo2, hi2 = m - t_quantile(0.9875, n - 1) * se, m + t_quantile(0.9875, n - 1) * se
        holds = {"less": hi < -delta, "greater": lo > delta, "alike": -delta < lo and hi < delta,
                 "not_worse": lo > -delta}[rule]
        contra = {"less": lo > -delta, "greater": hi < delta, "alike": hi2 < -delta or lo2 > delta,
                  "not_worse": hi < -delta}[rule]
        assert not (holds and contra)
        assert row["verdict"] == ("yes" if holds else "no" if contra else "inconclusive")
        if rule in mirror:
            other = paired_test(mirror[rule], [-x for x in d], delta)
            assert other["verdict"] == row["verdict"]
            assert other["p_holds"] == pytest.approx(row["p_holds"], rel=1e-12, abs=1e-300)


def test_p_values_against_scipy():
    """Cross-check with scipy's one-sample t-test where scipy is installed."""
    stats = pytest.importorskip("scipy.stats")
    d = [0.03, 0.11, 0.07, 0.02, 0.09]
    row = paired_test("greater", d, 0.02)
    assert row["p_holds"] == pytest.approx(stats.ttest_1samp([x - 0.02 for x in d], 0, alternative="greater").pvalue,
                                           rel=1e-9)
    row = paired_test("less", d, 0.02)
    assert row["p_contradicted"] == pytest.approx(
        stats.ttest_1samp([x + 0.02 for x in d], 0, alternative="greater").pvalue, rel=1e-9)


def test_zero_spread_is_degenerate_and_decided_by_the_sign_flip_test():
    """All n differences equal X: no zero-width interval. The sign-flip p is 2^-n when X lies
    strictly in the region: n = 3 gives 1/8 and can never reach 2.5% (inconclusive, with why);
    n = 6 gives 1/64 < 0.025. X on the margin: p = 1 both ways. Alike contradicted doubles:
    2 / 64 = 0.03125 at n = 6, decided only from n = 7 (2 / 128)."""
    three = paired_test("greater", [0.1, 0.1, 0.1], 0.05)
    assert three["test"] == "sign-flip" and three["sd"] == 0.0 and math.isnan(three["lo"]) and math.isnan(three["hi"])
    assert math.isnan(three["half_width"]) and three["p_holds"] == 0.125 and three["p_contradicted"] == 1.0
    assert three["verdict"] == "inconclusive"
    assert three["why"] == ("degenerate: all 3 differences equal +0.1; exact sign-flip test, p >= 2^-3, never < 0.025 "
                            "below 6 seeds")
    assert paired_test("greater", [0.1] * 5, 0.05)["p_holds"] == 1 / 32 > ALPHA
    six = paired_test("greater", [0.1] * 6, 0.05)
    assert six["p_holds"] == 1 / 64 and six["verdict"] == "yes" and six["why"].startswith("degenerate: all 6")
    assert paired_test("less", [0.1] * 6, 0.05)["verdict"] == "no"
    assert paired_test("alike", [0.0] * 6, 0.05)["verdict"] == "yes"
    assert paired_test("alike", [0.1] * 6, 0.05)["p_contradicted"] == 2 / 64
    assert paired_test("alike", [0.1] * 6, 0.05)["verdict"] == "inconclusive"
    assert paired_test("alike", [0.1] * 7, 0.05)["verdict"] == "no"
    on_margin = paired_test("greater", [0.25] * 8, 0.25)
    assert on_margin["p_holds"] == 1.0 == on_margin["p_contradicted"] and on_margin["verdict"] == "inconclusive"
    # equal up to rounding ((0.5 + 0.1) - 0.5 != 0.1 in floats) is still all equal
    assert paired_test("greater", [(0.5 + 0.1) - 0.5, 0.1, 0.1], 0.05)["test"] == "sign-flip"


def test_binary_statistic_exact_mcnemar():
    """Collapsed (0/1 per seed), Delta in {-1, 0, +1}: n10 seeds with a = 1, b = 0; the one-sided
    exact p is the Binomial(n10 + n01, 1/2) tail: 5 of 8 one way and 0 back: 2^-5 = 0.03125
    (inconclusive); 6 and 0: 1/64 (holds); 6 and 1: P(X >= 6 | 7) = 8/128 = 0.0625, the other tail
    P(X <= 6) = 127/128. No t interval, no sd."""
    five = paired_test("greater", [1, 1, 1, 1, 1, 0, 0, 0], 0.03, binary=True)
    assert five["test"] == "exact McNemar" and five["discordant"] == [5, 0] and five["p_holds"] == 1 / 32
    assert five["verdict"] == "inconclusive" and "never < 0.025 below 6" in five["why"]
    assert math.isnan(five["lo"]) and math.isnan(five["sd"]) and math.isnan(five["half_width"])
    assert paired_test("greater", [1] * 6 + [0, 0], 0.03, binary=True)["verdict"] == "yes"
    mixed = paired_test("greater", [1, 1, 1, 1, 1, 1, -1, 0], 0.03, binary=True)
    assert mixed["discordant"] == [6, 1] and mixed["p_holds"] == 8 / 128 and mixed["p_contradicted"] == 127 / 128
    assert paired_test("less", [-1] * 7, 0.03, binary=True)["p_holds"] == 1 / 128
    assert paired_test("greater", [-1] * 7, 0.03, binary=True)["verdict"] == "no"
    assert paired_test("greater", [0, 0, 0], 0.03, binary=True)["p_holds"] == 1.0  # no discordant seed
    assert binomial_tail(6, 7) == 8 / 128 and binomial_tail(0, 3) == 1.0 and binomial_tail(4, 3) == 0.0
    with pytest.raises(ValueError, match=r"rule='alike' is not valid; accepted: less or greater for a binary"):
        paired_test("alike", [1, 0, 0], 0.03, binary=True)
    with pytest.raises(ValueError, match=r"deltas=0.5 is not valid; accepted: differences of a binary statistic"):
        paired_test("greater", [1, 0.5, 0], 0.03, binary=True)


def test_power_figures_against_t_tables():
    """detectable(n, sd) = (t_{0.975,n-1} + t_{0.80,n-1}) sd / sqrt(n): n = 4, sd = 2: (3.182446 +
    0.978472) = 4.160918. seeds_needed(distance 1, sd 1): n = 9 gives (2.306004 + 0.888890) / 3 =
    1.06496 > 1, n = 10 gives (2.262157 + 0.883457) / sqrt(10) = 0.99473: 10."""
    assert detectable(4, 2.0) == pytest.approx(3.182446 + 0.978472, abs=2e-6)
    assert math.isnan(detectable(1, 1.0))
    assert seeds_needed(1.0, 1.0) == 10 and seeds_needed(0.0, 1.0) is None and seeds_needed(-1.0, 1.0) is None
    assert seeds_needed(1e-9, 1.0) is None  # beyond MAX_SEEDS_SEARCHED
    row = paired_test("greater", [0.01, 0.04, 0.07], 0.02)  # sd 0.03, n 3: observed mean 0.02 beyond the margin
    assert row["detectable"] == pytest.approx((4.302653 + 1.060660) * 0.03 / math.sqrt(3), rel=1e-6)
    assert row["seeds_needed"] == seeds_needed(0.02, 0.03)
    assert detectable(row["seeds_needed"], 0.03) <= 0.02 < detectable(row["seeds_needed"] - 1, 0.03)


def test_holm_on_the_textbook_example():
    """Holm (1979), the usual worked example: p = (0.01, 0.04, 0.03, 0.005), m = 4. Sorted: 0.005 x 4 =
    0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 -> max(0.06, 0.04) = 0.06. At alpha = 0.05 H1 and
    H4 are rejected (0.005 < 0.0125, 0.01 < 0.0167, then 0.03 > 0.025 stops)."""
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert [a < 0.05 for a in adjusted] == [True, False, False, True]
    assert holm([0.5, math.nan]) == [1.0, 1.0] and holm([]) == [] and holm([0.01]) == [0.01]
    assert holm([0.01, 0.01]) == [0.02, 0.02]


def test_family_adjustment():
    """Three primary one-sided rows (p_contradicted = 1 - p_holds). p_holds (0.001, 0.02, 0.996):
    Holm 0.001 x 3 = 0.003, 0.02 x 2 = 0.04, max(0.04, 0.996) = 0.996: the first holds, the second
    holds alone but not in the family. p_contradicted (0.999, 0.98, 0.004): 0.004 x 3 = 0.012, then
    min(1, 2 x 0.98) = 1 and 1: the third is contradicted. A secondary row is not adjusted; a family
    of one keeps its verdict."""
    rows = [{"family": "primary", "p_holds": 0.001, "p_contradicted": 0.999},
            {"family": "primary", "p_holds": 0.02, "p_contradicted": 0.98},
            {"family": "primary", "p_holds": 0.996, "p_contradicted": 0.004},
            {"family": "secondary", "p_holds": 0.001, "p_contradicted": 0.999}]
    adjust_family(rows)
    assert [r["p_holds_adjusted"] for r in rows[:3]] == pytest.approx([0.003, 0.04, 0.996], abs=1e-15)
    assert [r["p_contradicted_adjusted"] for r in rows[:3]] == pytest.approx([1.0, 1.0, 0.012], abs=1e-15)
    assert [verdict(r["p_holds"], r["p_contradicted"]) for r in rows[:3]] == ["yes", "yes", "no"]
    assert [r["adjusted_verdict"] for r in rows] == ["yes", "inconclusive", "no", "not adjusted"]
    assert rows[3]["p_holds_adjusted"] is None and rows[3]["p_contradicted_adjusted"] is None
    alone = adjust_family([{"family": "primary", "p_holds": 0.02, "p_contradicted": 0.98}])[0]
    assert alone["adjusted_verdict"] == verdict(0.02, 0.98) == "yes"


def test_count_line_and_rules_table():
    rows = [{"verdict": v, "adjusted_verdict": "inconclusive"} for v in ["yes"] * 3 + ["no"] + ["inconclusive"] * 2]
    assert count_verdicts(rows) == {"yes": 3, "no": 1, "inconclusive": 2}
    assert count_line(rows) == "holds 3 / contradicted 1 / inconclusive 2 of 6"
    assert count_line(rows, "adjusted_verdict") == "holds 0 / contradicted 0 / inconclusive 6 of 6"
    table = rules_table()
    assert "| less | Delta < -delta | hi < -delta | lo > -delta |" in table
    assert "| not_worse | Delta > -delta | lo > -delta | hi < -delta |" in table


def test_bad_rule_named():
    with pytest.raises(ValueError, match="rule='most' is not valid; accepted: less, greater, alike, not_worse"):
        paired_test("most", [0.0, 0.1, 0.2], 0.02)
