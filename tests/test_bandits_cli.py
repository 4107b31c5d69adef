"""The real entry point of the bench: every shipped YAML parses, bad values are named, and a
tiny claims suite writes the report with the expected rows and one PNG per setting."""

import json
from pathlib import Path

import pytest

from bandits.claims import decide, paper_claims, theory_checks
from bandits.cli import build_parser, config_from_namespace, main

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs", "bandits").glob("*.yaml"))
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
    table = [l for l in report.splitlines() if l.startswith("| ") and ("yes |" in l or "**no** |" in l)]
    assert len(table) == n_exact + n_claims
    assert n_claims == 2 * (3 + 2 + 2 + 4)  # degrade x3, wide faster x2 + offline x2, red_drop x4
    assert "REINFORCE (no regularizer) degrades off-policy | bandit / offline vs on_policy" in report
    for s in settings:
        png = tmp_path / f"reward_{s}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rows"]) == len(table) and summary["config"]["seeds"] == 3
