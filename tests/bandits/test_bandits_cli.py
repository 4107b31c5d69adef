"""The real entry point of the bench: every shipped YAML parses, bad values are named, and a
tiny claims suite writes the report with the expected rows and one PNG per setting."""

import json
import re
from pathlib import Path

import pytest

from bandits.claims import paper_claims, theory_checks
from bandits.cli import build_parser, config_from_namespace, main
from reclight.stats import count_line

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
    ("--multi_mini_batches", "3", "multi_mini_batches=3 is not valid; accepted: a divisor of the 8 groups per step of bandit "
     "(bandit.n_contexts)"),
    ("--chain.start", "0", "chain.start=0 is not valid"),
    ("--group_size", "1", "group_size=1 is not valid; accepted: an integer >= 2"),
    # issue #17 item 6: absurd margins against the reward scale, non-finite floats
    ("--margin", "1e9", "margin=1000000000.0 is not valid; accepted: 0 < margin < 1 (reward units"),
    ("--margin", "0", "margin=0.0 is not valid; accepted: 0 < margin < 1"),
    ("--lr", ".inf", "lr=inf is not valid; accepted: a number > 0 (a finite number)"),
    ("--lr", ".nan", "lr=nan is not valid; accepted: a number > 0 (a finite number)"),
    ("--seed", "-1", "seed=-1 is not valid; accepted: an integer >= 0"),
    ("--bandit.init_logit_std", ".inf", "bandit.init_logit_std=inf is not valid"),
    ("--chain.left_reward", ".nan", "chain.left_reward=nan is not valid; accepted: a number in [0, 1]"),
    ("--chain.right_reward", "1.5", "chain.right_reward=1.5 is not valid; accepted: a number in [0, 1]"),
])
def test_bad_values_name_field_value_and_accepted(flag, value, needle, capsys):
    with pytest.raises(SystemExit):
        main(["claims", "--config", BASE, flag, value])
    assert needle in capsys.readouterr().err


def test_lr_inf_from_yaml_is_named(tmp_path, capsys):
    """``lr: .inf`` in a config file used to end in a raw multinomial error one step later."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: .inf\n")
    with pytest.raises(SystemExit):
        main(["claims", "--config", BASE, "--config", str(bad)])
    assert "lr=inf is not valid; accepted: a number > 0 (a finite number)" in capsys.readouterr().err


def test_out_dir_under_a_file_is_named(tmp_path, capsys):
    """Used to be a raw NotADirectoryError after the runs; now refused before any run."""
    (tmp_path / "notes.txt").write_text("x")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "report"):
        with pytest.raises(SystemExit):
            main(["claims", "--config", BASE, "--out_dir", str(out)])
        err = capsys.readouterr().err
        assert f"out_dir={str(out)!r} is not valid; accepted: a folder path" in err
        assert "notes.txt" in err


def test_two_seeds_give_no_verdicts(tmp_path, capsys):
    """Issue #17 item 6: ``--seeds 2`` used to produce 'yes' verdicts from 1.96-sem intervals of
    two seeds. Now every seeded row is inconclusive, says why, and the report states the minimum."""
    assert main(["claims", "--config", BASE, "--seeds", "2", "--steps", "6", "--envs", "[bandit]",
                 "--presets", "[reinforce, rec_oneside_nois_wide, rec_oneside_nois]",
                 "--settings", "[on_policy, offline]", "--bandit.n_contexts", "2", "--bandit.n_arms", "3",
                 "--multi_mini_batches", "2", "--out_dir", str(tmp_path)]) == 0
    capsys.readouterr()
    rows = [r for r in json.loads((tmp_path / "summary.json").read_text())["rows"] if r["seeds"] != "exact"]
    assert rows and all(r["verdict"] == "inconclusive" and r["seeds"] == 2 for r in rows)
    assert all("minimum for a verdict" in r["why"] for r in rows)
    report = (tmp_path / "claims.md").read_text()
    assert "Rows with fewer than 3 seeds get no verdict (inconclusive)" in report
    assert "t_0.975,1 = 12.706" in report


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
                 "--multi_mini_batches", "2", "--out_dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "[ 8/8] chain  red_drop" in err
    report = (tmp_path / "claims.md").read_text()
    n_claims = len(paper_claims(["bandit", "chain"], settings, presets, "on_policy_1x2"))
    n_exact = len(theory_checks())
    # the last cell: the verdict, then why where there is a reason (a degenerate sample: all seeds equal)
    verdict_cell = re.compile(r"\| (yes|\*\*no\*\*|inconclusive)( \([^|]*\))? \|$")
    table = [l for l in report.splitlines() if l.startswith("| ") and verdict_cell.search(l)]
    assert len(table) == n_exact + n_claims
    assert "| seeds | verdict |" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    counts = summary["counts"]
    assert sum(counts.values()) == len(table) and set(counts) == {"yes", "no", "inconclusive"}
    line = f"holds {counts['yes']} / contradicted {counts['no']} / inconclusive {counts['inconclusive']} of {len(table)}"
    assert summary["counts_line"] == line and f"**Verdicts: {line}.**" in report and line in err
    for v, cell in (("yes", "yes"), ("no", "**no**"), ("inconclusive", "inconclusive")):
        assert sum(verdict_cell.search(l).group(1) == cell for l in table) == counts[v]
    assert all(r["verdict"] in ("yes", "no", "inconclusive") and r["holds"] == (r["verdict"] == "yes")
               for r in summary["rows"])
    assert "| greater | Delta > +delta | lo > +delta | hi < +delta |" in report
    seeded = [r for r in summary["rows"] if r["seeds"] != "exact"]
    assert all(r["family"] == "primary" and r["adjusted_verdict"] in ("yes", "no", "inconclusive") for r in seeded)
    assert all(0 <= r["p_holds"] <= r["p_holds_adjusted"] <= 1 for r in seeded)
    adjusted = count_line(seeded, "adjusted_verdict")
    assert f"Holm-adjusted as one family (`adjusted_verdict` in summary.json): {adjusted}" in report
    # degrade x3, wide faster x3 (on-policy with 1 and with 2 updates, periodic) + offline x2, red_drop x4
    assert n_claims == 2 * (3 + 3 + 2 + 4)
    assert "REINFORCE (no regularizer) degrades off-policy | bandit / offline vs on_policy" in report
    # the one-update on-policy row is marked trivial; the 2-update row is not, and its cell differs
    assert "learns faster [trivial: one update per batch, rho = 1] | bandit / on_policy |" in report
    assert "Enlarged clipping (0.6, 2.0) learns faster | bandit / on_policy_1x2 |" in report
    assert "| preset | on_policy | periodic | lag | offline | on_policy_1x2 |" in report
    assert "| k3 | plain | on-policy |" in report  # the exact KL estimator table
    for s in settings + ["on_policy_1x2"]:
        png = tmp_path / f"reward_{s}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(summary["rows"]) == len(table) and summary["config"]["seeds"] == 3
