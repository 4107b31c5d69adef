"""Aggregation and verdicts on synthetic run folders with known differences: each verdict is
reached (holds, contradicted, inconclusive), the per-seed statistics equal hand values, an
incomplete run is left out, and ``reclight study report DIR`` writes the report, the summary
JSON and one PNG per setting."""

import json
import math
import statistics

import pytest
import yaml
from study_helpers import micro_study, write_run

from reclight.study.cli import main
from reclight.study.config import study_from_dict
from reclight.study.report import read_run, run_statistics

T975_3 = 3.182446305284263  # t_{0.975, 3}: 4 paired seeds
BASE = [0.40, 0.50, 0.60, 0.50, 0.60]  # step 0 (start of RL), then after steps 1..4
D_BETTER = [0.10, 0.12, 0.14, 0.11]  # per seed: added to every periodic evaluation
D_NOISY = [0.20, -0.20, 0.10, -0.10]


def _study(tmp_path):
    arms = {"base": "rec_oneside_nois", "better": "rec_oneside_nois_wide", "noisy": "reinforce"}
    claims = [
        {"text": "better is better", "a": "better", "b": "base", "statistic": "final", "rule": "greater"},
        {"text": "better is worse", "a": "better", "b": "base", "statistic": "final", "rule": "less"},
        {"text": "noisy is alike", "a": "noisy", "b": "base", "statistic": "final", "rule": "alike"},
    ]
    return micro_study(tmp_path, arms=arms, claims=claims, settings=["offline"], seeds=[0, 1, 2, 3], margin=0.05,
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
                  "noisy": [BASE[0]] + [a + D_NOISY[seed] for a in BASE[1:]]}
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


def test_each_verdict_from_known_differences(folder, capsys):
    """better - base = D_BETTER exactly (final statistic), so: greater holds, less is contradicted
    (lo > -delta), and the noisy arm's +-0.2 differences leave alike inconclusive."""
    assert main(["report", str(folder)]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    rows = {r["claim"]: r for r in summary["rows"]}
    mean = statistics.fmean(D_BETTER)
    half = T975_3 * statistics.stdev(D_BETTER) / 2
    greater = rows["better is better"]
    assert greater["deltas"] == pytest.approx(D_BETTER, abs=1e-12) and greater["seeds"] == 4
    assert greater["mean"] == pytest.approx(mean, abs=1e-12)
    assert greater["lo"] == pytest.approx(mean - half, abs=1e-9) and greater["hi"] == pytest.approx(mean + half, abs=1e-9)
    assert greater["verdict"] == "yes"
    assert rows["better is worse"]["verdict"] == "no"
    noisy = rows["noisy is alike"]
    assert noisy["mean"] == pytest.approx(0.0, abs=1e-12) and noisy["verdict"] == "inconclusive"
    assert summary["counts"] == {"yes": 1, "no": 1, "inconclusive": 1}
    report = (folder / "report.md").read_text()
    assert "**Verdicts: holds 1 / contradicted 1 / inconclusive 1 of 3.**" in report
    g = greater  # the table prints the row's own numbers, in accuracy points
    assert (f"| better is better | offline | final(better) - final(base) | greater | {100 * g['mean']:+.1f} | "
            f"[{100 * g['lo']:+.1f}, {100 * g['hi']:+.1f}] | 4 | holds |") in report
    assert "| better is worse | offline | final(better) - final(base) | less |" in report and "**contradicted**" in report
    assert "| base | rec_oneside_nois | 4 | 40.0 | 55.0 ± 0.0 |" in report  # before 0.4, final (0.5 + 0.6)/2
    assert (folder / "offline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "holds 1 / contradicted 1 / inconclusive 1 of 3" in capsys.readouterr().err
    cell = summary["cells"]["offline"]["better"]
    assert cell["clip_frac"] == pytest.approx(0.25) and cell["seeds_complete"] == 4


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
    assert "Runs complete: 10 of 12" in report and "Incomplete or missing (2)" in report
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
