"""The real entry point of the bench: every shipped YAML parses, bad values are named, and a
tiny claims suite writes the report with the expected rows and one PNG per setting."""

import json
import math
from pathlib import Path

import pytest

from bandits.claims import (RULES, contradicted, count_line, count_verdicts, decide, paper_claims,
                            theory_checks, verdict)
from bandits.cli import build_parser, config_from_namespace, main

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "bandits").glob("*.yaml"))
BASE = str(CONFIGS[0].parent / "claims.yaml")


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"claims.yaml", "quick.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_parses_through_the_cli(path):
    args = build_parser().parse_args(["claims", "--config", BASE, "--config", str(path)])
    cfg = config_from_namespace(args.claims)
    assert cfg.seeds >= 2 and cfg.steps >= 4


def test_field_override_and_nested():
    args = build_parser().parse_args(["claims", "--config", BASE, "--seeds", "64", "--chain.horizon", "5"])
    cfg = config_from_namespace(args.claims)
    assert cfg.seeds == 64 and cfg.chain.horizon == 5


@pytest.mark.parametrize("flag,value,needle", [
    ("--optimizer", "rmsprop", "optimizer='rmsprop' is not valid; accepted: adam, sgd"),
    ("--presets", "[reinforce,ppo]", "presets='ppo' is not valid; accepted: reinforce"),
    ("--settings", "[weekly]", "settings='weekly' is not valid; accepted: on_policy"),
    ("--chain.start", "0", "chain.start=0 is not valid"),
    ("--group_size", "1", "group_size=1 is not valid; accepted: an integer >= 2"),
])
def test_bad_values_name_field_value_and_accepted(flag, value, needle, capsys):
    with pytest.raises(SystemExit):
        main(["claims", "--config", BASE, flag, value])
    assert needle in capsys.readouterr().err


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
    with pytest.raises(ValueError, match="rule='most' is not valid"):
        verdict("most", 0.0, 0.0, 0.0, 0.02)


def test_count_line():
    rows = [{"verdict": v} for v in ["yes"] * 3 + ["no"] + ["inconclusive"] * 2]
    assert count_verdicts(rows) == {"yes": 3, "no": 1, "inconclusive": 2}
    assert count_line(rows) == "holds 3 / contradicted 1 / inconclusive 2 of 6"


def test_exact_rows_are_yes_or_no():
    rows = theory_checks()
    assert all(r["verdict"] == ("yes" if r["holds"] else "no") for r in rows)
    assert all(isinstance(r["holds"], bool) for r in rows)


def test_tiny_claims_suite_end_to_end(tmp_path, capsys):
    """The real command on a tiny problem: report rows = exact checks + every testable claim,
    one PNG per setting, summary.json, and progress lines on stderr."""
    presets = ["reinforce", "rec_oneside_nois", "rec_oneside_nois_wide", "red_drop"]
    settings = ["on_policy", "periodic", "lag", "offline"]
    assert main(["claims", "--config", BASE, "--seeds", "3", "--steps", "8",
                 "--presets", json.dumps(presets), "--settings", json.dumps(settings),
                 "--bandit.n_contexts", "2", "--bandit.n_arms", "3", "--chain.horizon", "3",
                 "--out_dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "[ 8/8] chain  red_drop" in err
    report = (tmp_path / "claims.md").read_text()
    n_claims = len(paper_claims(["bandit", "chain"], settings, presets))
    n_exact = len(theory_checks())
    table = [l for l in report.splitlines()
             if l.startswith("| ") and l.endswith((" yes |", " **no** |", " inconclusive |"))]
    assert len(table) == n_exact + n_claims
    assert "| seeds | verdict |" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    counts = summary["counts"]
    assert sum(counts.values()) == len(table) and set(counts) == {"yes", "no", "inconclusive"}
    line = f"holds {counts['yes']} / contradicted {counts['no']} / inconclusive {counts['inconclusive']} of {len(table)}"
    assert summary["counts_line"] == line and f"**Verdicts: {line}.**" in report and line in err
    for v, cell in (("yes", " yes |"), ("no", " **no** |"), ("inconclusive", " inconclusive |")):
        assert sum(l.endswith(cell) for l in table) == counts[v]
    assert all(r["verdict"] in ("yes", "no", "inconclusive") and r["holds"] == (r["verdict"] == "yes")
               for r in summary["rows"])
    assert "| greater | Delta > +delta | mean > +delta and lo > 0 | hi < +delta |" in report
    assert n_claims == 2 * (3 + 2 + 2 + 4)  # degrade x3, wide faster x2 + offline x2, red_drop x4
    assert "REINFORCE (no regularizer) degrades off-policy | bandit / offline vs on_policy" in report
    for s in settings:
        png = tmp_path / f"reward_{s}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(summary["rows"]) == len(table) and summary["config"]["seeds"] == 3
