"""Aggregation, tests and verdicts on synthetic run folders with known differences: each verdict
is reached (holds, contradicted, inconclusive), the p-values and power figures equal closed-form
values, the primary family's Holm adjustment changes the one verdict it should, a degenerate and a
binary row are reported as such, an incomplete run is left out, and ``reclight study report DIR``
writes the report, the summary JSON, the forest plot and one PNG per setting; a corrupt or
outdated study.yaml is a clear error naming the file."""

import json
import math
import statistics

import pytest
import yaml
from study_helpers import micro_study, write_run

from reclight.study.cli import main
from reclight.study.config import study_from_dict
from reclight.study.plots import ARM_COLORS, PALETTE, arm_colors
from reclight.study.report import read_run, run_statistics

T975_3 = 3.182446305284263  # t_{0.975, 3}: 4 paired seeds (tables: 3.18245)
T80_3 = 0.978472312  # t_{0.80, 3} (tables: 0.978472)
BASE = [0.40, 0.50, 0.60, 0.50, 0.60]  # step 0 (start of RL), then after steps 1..4
D_BETTER = [0.10, 0.12, 0.14, 0.11]  # per seed: added to every periodic evaluation
D_EDGE = [0.07, 0.10, 0.13, 0.08]  # holds alone (p = 0.021), not after Holm
D_NOISY = [0.20, -0.20, 0.10, -0.10]
FLAT = 0.01  # the same difference on every seed: a degenerate sample
DEAD = [0.10, 0.10, 0.10, 0.60]  # final below the 0.2 floor on seeds 0, 1, 2 (base never collapses)
MARGIN = 0.05


def t3_cdf(t):
    """Student's t cdf with 3 degrees of freedom in closed form: 1/2 + (atan x + x / (1 + x^2)) / pi,
    x = t / sqrt(3)."""
    x = t / math.sqrt(3)
    return 0.5 + (math.atan(x) + x / (1 + x * x)) / math.pi


def _claim(text, a, rule, family, statistic="final"):
    return {"text": text, "a": a, "b": "base", "statistic": statistic, "rule": rule, "family": family}


def _study(tmp_path):
    arms = {"base": "rec_oneside_nois", "better": "rec_oneside_nois_wide", "edge": "rec_ring_nois",
            "noisy": "reinforce", "flat": "rec_twoside_nois", "dead": "grpo"}
    claims = [
        _claim("better is better", "better", "greater", "primary"),
        _claim("better is worse", "better", "less", "primary"),
        _claim("edge is better", "edge", "greater", "primary"),
        _claim("noisy is alike", "noisy", "alike", "primary"),
        _claim("dead collapses more", "dead", "greater", "primary", statistic="collapsed"),
        _claim("flat is alike", "flat", "alike", "secondary"),
    ]
    return micro_study(tmp_path, arms=arms, claims=claims, settings=["offline"], seeds=[0, 1, 2, 3], margin=MARGIN,
                       last_evals=2)


@pytest.fixture
def folder(tmp_path):
    study = _study(tmp_path)
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    for seed in range(4):
        curves = {"base": BASE,
                  "better": [BASE[0]] + [a + D_BETTER[seed] for a in BASE[1:]],
                  "edge": [BASE[0]] + [a + D_EDGE[seed] for a in BASE[1:]],
                  "noisy": [BASE[0]] + [a + D_NOISY[seed] for a in BASE[1:]],
                  "flat": [BASE[0]] + [a + FLAT for a in BASE[1:]],
                  "dead": [BASE[0], 0.3, 0.2, DEAD[seed], DEAD[seed]]}
        for arm, accs in curves.items():
            write_run(out / "runs" / "offline" / arm / f"seed{seed}", accs, max_steps=4, every=1, clip=0.25)
    return out


def test_statistics_by_hand(tmp_path):
    """a = [0.4, 0.6, 0.3, 0.5, 0.2] at steps 0..4 (max_steps 4), last_evals 2: final = (0.5 + 0.2)/2 = 0.35,
    auc = mean(0.6, 0.3, 0.5, 0.2) = 0.4, early = the evaluations at steps <= 4/4 = [0.6], drawdown =
    max(best so far - a) = 0.6 - 0.2 = 0.4, collapsed = [0.35 < floor]."""
    write_run(tmp_path / "r", [0.4, 0.6, 0.3, 0.5, 0.2], max_steps=4, every=1)
    run = read_run(tmp_path / "r")
    assert run.complete and [s for s, _ in run.evals] == [0, 1, 2, 3, 4]
    for floor, collapsed in ((0.2, 0.0), (0.4, 1.0)):
        cfg = study_from_dict(micro_study(tmp_path, last_evals=2, collapse_floor=floor), check_files=False)
        s = run_statistics(run, cfg)
        assert s["final"] == pytest.approx(0.35, abs=1e-12) and s["auc"] == pytest.approx(0.4, abs=1e-12)
        assert s["early"] == pytest.approx(0.6) and s["drawdown"] == pytest.approx(0.4, abs=1e-12)
        assert s["collapsed"] == collapsed and s["before"] == pytest.approx(0.4)


def test_evaluation_steps_follow_val_check_interval(tmp_path):
    """The k-th periodic val/acc row is the evaluation after k * val_check_interval steps; a run
    with fewer evaluations than 1 + max_steps / interval is incomplete."""
    write_run(tmp_path / "r", [0.1, 0.2, 0.3], max_steps=6, every=3)
    run = read_run(tmp_path / "r")
    assert run.evals == [(0, 0.1), (3, 0.2), (6, 0.3)] and run.complete
    write_run(tmp_path / "k", [0.1, 0.2], max_steps=6, every=3)  # killed after the first evaluation
    assert not read_run(tmp_path / "k").complete
    assert not read_run(tmp_path / "missing").complete


def _t_row(deltas):
    """mean, se and the closed-form df = 3 p-values of a `greater` row (margin MARGIN)."""
    mean, sd = statistics.fmean(deltas), statistics.stdev(deltas)
    se = sd / 2
    return mean, sd, se, 1 - t3_cdf((mean - MARGIN) / se), t3_cdf((mean - MARGIN) / se)


def test_each_verdict_and_the_family_from_known_differences(folder, capsys):
    """The final statistic's differences are the constructed D's exactly. Per row (df = 3, F in
    closed form, delta = 0.05): better - base greater: p_holds = 1 - F((m - delta)/se) = 0.0021
    -> holds; less: contradicted; edge: p_holds = 0.0212 < 0.025 -> holds; noisy alike: TOST
    p = 0.311 -> inconclusive; dead vs base collapsed: 3 discordant seeds, all one way, exact
    p = 2^-3 = 0.125 -> inconclusive; flat (secondary): all four differences +0.01, sign-flip p =
    2^-4 -> inconclusive, degenerate.

    Holm over the 5 primary p_holds: sorted 0.0021 (x5 = 0.0106 < 0.025: holds), 0.0212 (x4 =
    0.085: stop), so edge holds alone but not in the family; over the p_contradicted the less row's
    tiny p x5 stays below 0.025. Headline: holds 1 / contradicted 1 / inconclusive 3 of 5."""
    assert main(["report", str(folder)]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    rows = {r["claim"]: r for r in summary["rows"]}
    mean, sd, se, p_holds, p_contra = _t_row(D_BETTER)
    greater = rows["better is better"]
    assert greater["deltas"] == pytest.approx(D_BETTER, abs=1e-12) and greater["seeds"] == 4
    assert greater["mean"] == pytest.approx(mean, abs=1e-12) and greater["family"] == "primary"
    assert greater["lo"] == pytest.approx(mean - T975_3 * se, abs=1e-9)
    assert greater["hi"] == pytest.approx(mean + T975_3 * se, abs=1e-9)
    assert greater["half_width"] == pytest.approx(T975_3 * se, abs=1e-9)
    assert greater["detectable"] == pytest.approx((T975_3 + T80_3) * se, rel=1e-8)
    assert greater["p_holds"] == pytest.approx(p_holds, rel=1e-9) and p_holds == pytest.approx(0.0021101, rel=1e-4)
    assert greater["p_contradicted"] == pytest.approx(p_contra, rel=1e-12)
    assert greater["verdict"] == "yes" and greater["test"] == "t"
    assert greater["p_holds_adjusted"] == pytest.approx(5 * p_holds, rel=1e-9) and greater["adjusted_verdict"] == "yes"
    less = rows["better is worse"]
    assert less["p_contradicted"] == pytest.approx(t3_cdf((-MARGIN - mean) / se), rel=1e-6)
    assert less["verdict"] == "no" and less["adjusted_verdict"] == "no"
    assert less["p_contradicted_adjusted"] == pytest.approx(5 * less["p_contradicted"], rel=1e-9)
    _, _, _, edge_p, _ = _t_row(D_EDGE)
    edge = rows["edge is better"]
    assert edge["p_holds"] == pytest.approx(edge_p, rel=1e-9) and edge_p == pytest.approx(0.0212045, rel=1e-5)
    assert edge["verdict"] == "yes" and edge["p_holds_adjusted"] == pytest.approx(4 * edge_p, rel=1e-9)
    assert edge["adjusted_verdict"] == "inconclusive"
    noisy = rows["noisy is alike"]  # TOST: max of the two one-sided p's, m = 0: both equal 1 - F(delta / se)
    se_noisy = statistics.stdev(D_NOISY) / 2
    assert noisy["mean"] == pytest.approx(0.0, abs=1e-12)
    assert noisy["p_holds"] == pytest.approx(1 - t3_cdf(MARGIN / se_noisy), rel=1e-9)
    assert noisy["verdict"] == noisy["adjusted_verdict"] == "inconclusive"
    dead = rows["dead collapses more"]
    assert dead["test"] == "exact McNemar" and dead["discordant"] == [3, 0] and dead["p_holds"] == 0.125
    assert dead["lo"] is None and dead["half_width"] is None and dead["margin"] == 0.0
    assert dead["counts"] == "dead collapsed, base not: 3 of 4 seeds; reverse: 0"
    assert dead["p_holds_adjusted"] == pytest.approx(3 * 0.125) and dead["adjusted_verdict"] == "inconclusive"
    flat = rows["flat is alike"]
    assert flat["family"] == "secondary" and flat["test"] == "sign-flip" and flat["p_holds"] == 2.0 ** -4
    assert flat["lo"] is None and flat["hi"] is None and flat["sd"] == 0.0
    assert flat["why"].startswith("degenerate: all 4 differences equal +0.01")
    assert flat["adjusted_verdict"] == "not adjusted" and flat["p_holds_adjusted"] is None
    assert summary["counts"] == {"primary_adjusted": {"yes": 1, "no": 1, "inconclusive": 3},
                                 "primary": {"yes": 2, "no": 1, "inconclusive": 2},
                                 "secondary": {"yes": 0, "no": 0, "inconclusive": 1}}
    report = (folder / "report.md").read_text()
    assert ("**Primary claims, Holm-adjusted: holds 1 / contradicted 1 / inconclusive 3 of 5.** Per row, before "
            "adjustment: primary holds 2 / contradicted 1 / inconclusive 2 of 5; secondary (not adjusted) holds 0 / "
            "contradicted 0 / inconclusive 1 of 1.") in report
    g = greater  # the table prints the row's own numbers, in accuracy points
    assert (f"| better is better | primary | offline | final(better) - final(base) | greater | "
            f"{100 * g['mean']:+.1f} | [{100 * g['lo']:+.1f}, {100 * g['hi']:+.1f}] | 4 | 0.002 | 0.998 | holds | "
            "holds (p 0.011 / 1.000) |") in report
    assert "| edge is better | primary |" in report and "| holds | inconclusive (p 0.085 / 1.000) |" in report
    assert "| dead collapsed, base not: 3 of 4 seeds; reverse: 0 | none (binary: exact test) | 4 | 0.125 |" in report
    assert "| none (degenerate) | 4 | 0.062 | 1.000 | inconclusive (degenerate: all 4 differences" in report
    assert "| flat is alike | secondary |" in report and report.count("| not adjusted |") == 1
    assert "Holm's step-down procedure runs over their 5 p_holds" in report
    # Power: the primary t rows' half-width and detectable effect, and the rows not decided
    assert (f"| better is better | offline | t | 4 | {100 * sd:.1f} | {100 * T975_3 * se:.1f} | "
            f"{100 * (T975_3 + T80_3) * se:.1f} | Delta >= {100 * (MARGIN + (T975_3 + T80_3) * se):+.1f} | holds |"
            ) in report
    assert "Not decided at this scale (3 of 5 primary rows):" in report
    assert "- edge is better (offline): decided per row (holds) but not after the family adjustment." in report
    assert "- dead collapses more (offline): 3 discordant seed(s): the exact p is at least 2^-3" in report
    assert "- noisy is alike (offline): about " in report
    assert "| base | rec_oneside_nois | 4 | 40.0 | 55.0 ± 0.0 |" in report  # before 0.4, final (0.5 + 0.6)/2
    assert "![claims](claims.png)" in report and "![offline](offline.png)" in report
    for png in ("offline.png", "claims.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "primary, Holm-adjusted: holds 1 / contradicted 1 / inconclusive 3 of 5" in capsys.readouterr().err
    assert summary["counts_line"] == "primary, Holm-adjusted: holds 1 / contradicted 1 / inconclusive 3 of 5"
    cell = summary["cells"]["offline"]["better"]
    assert cell["clip_frac"] == pytest.approx(0.25) and cell["seeds_complete"] == 4


def test_forest_plot_of_rows_in_different_units(tmp_path):
    """Rows in accuracy and in tokens (own margin 5) share no axis: x = Delta / delta, the margin at
    +-1 for every row; rows in one unit keep it (accuracy points: x 100, margin at +-delta)."""
    from reclight.stats import adjust_family, paired_test
    from reclight.study.plots import _scale, plot_claims

    def row(unit, margin, deltas, family="primary"):
        return {"claim": f"{unit} claim", "setting": "s", "rule": "greater", "family": family, "unit": unit,
                "statistic": "final" if unit == "accuracy" else "len_trained", "margin": margin,
                **paired_test("greater", deltas, margin)}

    acc = row("accuracy", 0.03, [0.05, 0.07, 0.06])
    tokens = row("tokens", 5.0, [7.0, 9.0, 8.0], "secondary")
    rows = adjust_family([acc, tokens])
    factors, label, normalized = _scale(rows)
    assert factors == [1 / 0.03, 1 / 5.0] and normalized and label.startswith("Delta / delta")
    assert _scale([acc]) == ([100.0], "Delta = a - b (accuracy points)", False)
    path = plot_claims(rows, tmp_path / "claims.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arm_colours_are_fixed_by_name():
    """The main comparison is red vs blue; an arm keeps its colour whatever the other arms; unknown
    names get distinct palette colours chosen by their CRC32, the same on every call."""
    colours = arm_colors(["rec_oneside_nois", "reinforce", "mine", "yours"])
    assert colours["reinforce"] == "#d62728" and colours["rec_oneside_nois"] == "#1f77b4"
    assert arm_colors(["reinforce"])["reinforce"] == colours["reinforce"]
    assert len(set(colours.values())) == 4 and set(colours.values()) <= set(PALETTE)
    assert arm_colors(["mine", "yours"]) == {k: colours[k] for k in ("mine", "yours")}
    assert len(set(ARM_COLORS.values())) == len(ARM_COLORS)  # no two named arms share a colour


def test_incomplete_runs_are_left_out_and_listed(folder):
    """Kill seed 3's noisy run after 2 evaluations and delete seed 2's better run: their claims
    pair only the seeds both cells completed, and the report lists the two folders."""
    write_run(folder / "runs" / "offline" / "noisy" / "seed3", [0.4, 0.5], max_steps=4, every=1)
    import shutil

    shutil.rmtree(folder / "runs" / "offline" / "better" / "seed2")
    assert main(["report", str(folder)]) == 0
    rows = {r["claim"]: r for r in json.loads((folder / "summary.json").read_text())["rows"]}
    assert rows["noisy is alike"]["paired_seeds"] == [0, 1, 2]
    assert rows["better is better"]["paired_seeds"] == [0, 1, 3]
    assert rows["better is better"]["deltas"] == pytest.approx([D_BETTER[i] for i in (0, 1, 3)], abs=1e-12)
    report = (folder / "report.md").read_text()
    assert "Runs complete: 22 of 24" in report and "Incomplete or missing (2)" in report
    assert "noisy/seed3" in report and "better/seed2" in report


def test_below_the_minimum_seeds_no_verdict(folder):
    """Only 2 complete seeds of 'better': the clear +0.1 effect gets no verdict."""
    import shutil

    for seed in (2, 3):
        shutil.rmtree(folder / "runs" / "offline" / "better" / f"seed{seed}")
    assert main(["report", str(folder)]) == 0
    row = next(r for r in json.loads((folder / "summary.json").read_text())["rows"] if r["claim"] == "better is better")
    assert row["seeds"] == 2 and row["verdict"] == "inconclusive" and "minimum" in row["why"]
    assert math.isfinite(row["lo"])


def test_report_of_a_folder_without_a_study(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not valid; accepted: a study folder holding study.yaml" in capsys.readouterr().err


def test_a_corrupt_or_outdated_study_yaml_is_named(folder, capsys):
    """A study.yaml that is not YAML: exit 2 and one line naming the file and the line (no
    traceback); one written before claims had a family: the file, the claim, the field, the
    value and what is accepted."""
    study = folder / "study.yaml"
    text = study.read_text()
    study.write_text(text.replace("settings:", "settings: [offline\nseeds_:", 1))  # an unclosed bracket
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"DIR={str(study)!r} is not valid: line " in err and "Traceback" not in err
    assert "accepted: a YAML mapping of study fields, each key once" in err
    raw = yaml.safe_load(text)
    del raw["claims"][2]["family"]
    study.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["report", str(folder)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"{study}: claims[2].family=None is not valid; accepted: primary or secondary, required for every claim "
            "and fixed before any run (claim 'edge is better';") in err


def _samples(folder, steps, response):
    lines = [json.dumps({"step": t, "group": 0, "sample": k, "prompt": "2+2=", "response": f"{response}{t}.{k}",
                         "reward": 1.0, "advantage": 0.25 * k, "clip_frac": 0.0, "version": t}) + "\n"
             for t in steps for k in range(3)]
    (folder / "logs" / "samples.jsonl").write_text("".join(lines) + '{"step": 9, "pro')  # a killed run's half line


def test_the_report_links_each_arms_samples_and_quotes_two(folder):
    """base's seeds 0 and 1 wrote samples.jsonl (steps 0 and 4, then half a line), the other arms
    none: report.md links both files relative to the study folder and quotes the first 2 samples
    of step 4 from seed 0's file ('|' escaped); the other arms say none; summary.json lists each
    run's file."""
    from reclight.study.report import SAMPLES_FILE as READ
    from reclight.trainer.samples import SAMPLES_FILE

    assert READ == SAMPLES_FILE  # the report's name for the file is the trainer's
    runs = folder / "runs" / "offline"
    for seed in (0, 1):
        _samples(runs / "base" / f"seed{seed}", (0, 4), f"a|b seed{seed} ")
    assert main(["report", str(folder)]) == 0
    report = (folder / "report.md").read_text()
    links = ", ".join(f"[seed{s}](runs/offline/base/seed{s}/logs/samples.jsonl)" for s in (0, 1))
    assert (f"| `offline` | `base` | {links} | seed 0, step 4, group 0 sample 0 | `2+2=` | `a\\|b seed0 4.0` | 1 | "
            "+0.000 | 0.000 |") in report
    assert "| | | | seed 0, step 4, group 0 sample 1 | `2+2=` | `a\\|b seed0 4.1` | 1 | +0.250 | 0.000 |" in report
    assert "sample 2 |" not in report and "step 0, group" not in report
    assert "| `offline` | `better` | none |" in report and "| `offline` | `noisy` | none |" in report
    summary = json.loads((folder / "summary.json").read_text())
    files = {r["folder"].split("runs/")[1]: r["samples"] for r in summary["runs"]}
    assert files["offline/base/seed0"].endswith("runs/offline/base/seed0/logs/samples.jsonl")
    assert files["offline/better/seed0"] is None


def test_a_report_without_samples_says_so(folder):
    assert main(["report", str(folder)]) == 0
    report = (folder / "report.md").read_text()
    assert "## Samples\n\nNo run folder holds a `samples.jsonl`" in report
