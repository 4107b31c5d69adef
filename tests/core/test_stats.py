"""reclight.stats: the Student-t quantile against closed forms and tabulated values, the
interval on hand data, and the three-way verdict rules on hand intervals at every boundary
(shared by the bandit bench and ``reclight study``)."""

import math

import pytest
import torch

from reclight.stats import (MIN_SEEDS, RULES, contradicted, count_line, count_verdicts, decide, mean_ci,
                            paired_verdict, t_cdf, t_quantile, verdict)

# Two-sided 95% critical values t_{0.975, df} (standard tables, 6 significant digits) and a
# 99% one; df = 1 and 2 are also checked against their closed forms below.
TABLE = [(1, 0.975, 12.7062), (2, 0.975, 4.30265), (3, 0.975, 3.18245), (4, 0.975, 2.77645),
         (5, 0.975, 2.57058), (9, 0.975, 2.26216), (29, 0.975, 2.04523), (31, 0.975, 2.03951),
         (120, 0.975, 1.97993), (10, 0.995, 3.16927), (3, 0.95, 2.35336)]


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
    assert t_cdf(0.0, 5) == 0.5
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
    """Issue #17 item 6: two seeds used to give 'yes' from a 1.96-sem interval. The t interval
    of 2 values is mean +- 12.7 |x1 - x2| / 2, and below MIN_SEEDS = 3 no verdict is given."""
    row = paired_verdict("greater", [0.30, 0.31], margin=0.02)
    assert MIN_SEEDS == 3 and row["seeds"] == 2 and row["verdict"] == "inconclusive"
    assert "minimum" in row["why"]
    assert row["lo"] == pytest.approx(0.305 - 12.7062047 * 0.005, rel=1e-6)
    assert paired_verdict("greater", [0.30, 0.31, 0.32], margin=0.02)["verdict"] == "yes"
    assert paired_verdict("greater", [0.30, 0.31, 0.32], margin=0.02)["why"] == ""


def test_decision_rules():
    """Hand cases of the four rules with delta = 0.02."""
    assert decide("less", -0.05, -0.07, -0.03, 0.02) and not decide("less", -0.01, -0.02, -0.001, 0.02)
    assert not decide("less", -0.05, -0.1, 0.01, 0.02)  # interval crosses 0
    assert decide("greater", 0.05, 0.01, 0.09, 0.02)
    assert decide("alike", 0.0, -0.015, 0.015, 0.02) and not decide("alike", 0.0, -0.03, 0.01, 0.02)
    assert decide("not_worse", -0.01, -0.019, 0.0, 0.02) and not decide("not_worse", 0.0, -0.021, 0.02, 0.02)
# Margins and boundaries are exact binary fractions (delta = 0.25) so "==" at a boundary is
# exactly representable and the inclusive/strict choice is what is tested, not rounding.
D = 0.25
VERDICT_CASES = [
    # rule, (mean, lo, hi), verdict, why
    ("less", (-0.5, -0.75, -0.25), "yes", "mean < -delta, interval below 0"),
    ("less", (-0.5, -0.75, -0.125), "yes", "interval need only exclude 0, not -delta"),
    ("less", (-0.25, -0.5, -0.125), "inconclusive", "boundary: mean == -delta is not beyond it"),
    ("less", (-0.5, -1.0, 0.0), "inconclusive", "boundary: hi == 0 does not exclude 0"),
    ("less", (-0.5, -1.0, 0.5), "inconclusive", "wide: crosses 0 and -delta"),
    ("less", (-0.125, -0.25, 0.0), "inconclusive", "boundary: lo == -delta touches the claim region"),
    ("less", (-0.125, -0.1875, -0.0625), "no", "significant drop, but the whole interval above -delta"),
    ("less", (0.5, 0.25, 0.75), "no", "interval on the wrong side of 0"),
    ("greater", (0.5, 0.25, 0.75), "yes", "mean > delta, interval above 0"),
    ("greater", (0.5, 0.125, 0.875), "yes", "interval need only exclude 0"),
    ("greater", (0.25, 0.125, 0.5), "inconclusive", "boundary: mean == +delta is not beyond it"),
    ("greater", (0.5, 0.0, 1.0), "inconclusive", "boundary: lo == 0 does not exclude 0"),
    ("greater", (0.0, -0.5, 0.5), "inconclusive", "wide"),
    ("greater", (0.125, 0.0, 0.25), "inconclusive", "boundary: hi == +delta touches the claim region"),
    ("greater", (0.125, 0.0625, 0.1875), "no", "significant gain, but the whole interval below +delta"),
    ("greater", (-0.5, -0.75, -0.25), "no", "interval on the wrong side of 0"),
    ("alike", (0.0, -0.125, 0.125), "yes", "inside the band"),
    ("alike", (0.0, -0.25, 0.25), "yes", "boundary: inclusive, lo == -delta and hi == +delta"),
    ("alike", (0.25, 0.25, 0.25), "yes", "degenerate interval on the band's edge"),
    ("alike", (0.0, -0.5, 0.5), "inconclusive", "wider than the band"),
    ("alike", (0.25, 0.125, 0.375), "inconclusive", "straddles +delta"),
    ("alike", (0.5, 0.25, 0.75), "inconclusive", "boundary: lo == +delta touches the band"),
    ("alike", (-0.5, -0.75, -0.25), "inconclusive", "boundary: hi == -delta touches the band"),
    ("alike", (0.5, 0.375, 0.625), "no", "whole interval above +delta"),
    ("alike", (-0.5, -0.625, -0.375), "no", "whole interval below -delta"),
    ("not_worse", (0.0, -0.125, 0.125), "yes", "lo above -delta"),
    ("not_worse", (0.5, 0.25, 0.75), "yes", "better"),
    ("not_worse", (0.0, -0.25, 0.25), "inconclusive", "boundary: lo == -delta is not above it"),
    ("not_worse", (-0.25, -0.5, 0.0), "inconclusive", "straddles -delta"),
    ("not_worse", (-0.5, -0.75, -0.25), "inconclusive", "boundary: hi == -delta touches the claim region"),
    ("not_worse", (-0.5, -0.625, -0.375), "no", "whole interval below -delta"),
]


@pytest.mark.parametrize("rule,interval,expected,why", VERDICT_CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(VERDICT_CASES)])
def test_verdict_hand_intervals(rule, interval, expected, why):
    mean, lo, hi = interval
    assert lo <= mean <= hi
    assert verdict(rule, mean, lo, hi, D) == expected, why
    assert decide(rule, mean, lo, hi, D) == (expected == "yes")
    assert contradicted(rule, mean, lo, hi, D) == (expected == "no")


def test_every_rule_reaches_every_verdict():
    reached = {(rule, v) for rule, _, v, _ in VERDICT_CASES}
    assert reached == {(rule, v) for rule in RULES for v in ("yes", "no", "inconclusive")}


@pytest.mark.parametrize("rule", RULES)
def test_verdicts_disjoint_and_mirror_on_a_grid(rule):
    """Holds and contradicted never overlap; mirroring every interval (Delta -> -Delta) swaps
    less and greater, and alike is symmetric."""
    grid = [x / 8 for x in range(-8, 9)]
    mirror = {"less": "greater", "greater": "less", "alike": "alike"}
    for lo in grid:
        for hi in grid:
            if hi < lo:
                continue
            for mean in (lo, (lo + hi) / 2, hi):
                assert not (decide(rule, mean, lo, hi, D) and contradicted(rule, mean, lo, hi, D))
                if rule in mirror:
                    assert verdict(rule, mean, lo, hi, D) == verdict(mirror[rule], -mean, -hi, -lo, D)


@pytest.mark.parametrize("rule", RULES)
def test_nan_interval_is_inconclusive(rule):
    assert verdict(rule, 0.1, math.nan, math.nan, 0.02) == "inconclusive"


def test_bad_rule_named():
    with pytest.raises(ValueError, match="rule=.most. is not valid; accepted: less, greater, alike, not_worse"):
        verdict("most", 0.0, 0.0, 0.0, 0.02)


def test_count_line():
    rows = [{"verdict": v} for v in ["yes"] * 3 + ["no"] + ["inconclusive"] * 2]
    assert count_verdicts(rows) == {"yes": 3, "no": 1, "inconclusive": 2}
    assert count_line(rows) == "holds 3 / contradicted 1 / inconclusive 2 of 6"


