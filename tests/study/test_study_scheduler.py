"""A study beyond the local pool (reclight/study/scheduler.py) and its replication on fresh
seeds (reclight/study/replicate.py).

- The runs of submitit's local executor are the local pool's: the same metrics, the same
  report (``extended``: two passes of a 1-seed micro study, about a minute on 2 cores).
- The SLURM options become the sbatch lines submitit writes (fake ``sbatch``/``srun``: no cluster).
- Bad options are refused before anything is written, naming the option and its value.
- ``replicate`` plans only the primary claims' cells on the new seeds in a folder of its own, and
  its agreement table on synthetic run folders carries hand-computed means and intervals.
"""

import json
import math
import shutil
import sys

import pytest
from study_helpers import micro_study, report_lines, run_metrics, run_micro_study, write_run, write_study

from reclight.study.cli import _run_parser, main
from reclight.study.config import load_study, study_from_dict
from reclight.study.plan import run_folder

def _code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors (an unknown --scheduler choice)
        return e.code


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "pbs"], "argument --scheduler: invalid choice: 'pbs' (choose from 'local', 'slurm', "
                             "'submitit-local')"),
    (["--slurm_partition", "cpu"], "--slurm_partition='cpu' is not valid; accepted: a --slurm_* option only with "
                                   "--scheduler slurm (got --scheduler local)"),
    (["--scheduler", "submitit-local", "--slurm_mem_gb", "8"], "--slurm_mem_gb=8.0 is not valid; accepted: a "
                                                               "--slurm_* option only with --scheduler slurm"),
    (["--scheduler", "slurm", "--workers", "3"], "--workers=3 is not valid; accepted: --workers only with --scheduler "
                                                 "local or submitit-local"),
    (["--scheduler", "slurm", "--slurm_time_min", "0"], "--slurm_time_min=0 is not valid; accepted: an integer >= 1"),
    (["--scheduler", "slurm", "--slurm_extra", "account"], "--slurm_extra='account' is not valid; accepted: KEY=VALUE"),
])
def test_bad_scheduler_options_name_the_option(tmp_path, capsys, args, message):
    path = write_study(tmp_path / "micro.yaml", micro_study(tmp_path))
    assert _code(["--config", str(path), *args, "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()  # refused before anything is written


def test_a_scheduler_needs_submitit_and_sbatch(tmp_path, capsys, monkeypatch):
    path = write_study(tmp_path / "micro.yaml", micro_study(tmp_path))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "submitit", None)  # not installed
        assert main(["--config", str(path), "--scheduler", "submitit-local"]) == 2
    assert ("--scheduler='submitit-local' is not valid; accepted: local, or install submitit first: pip install "
            "'reclight[cluster]'") in capsys.readouterr().err
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["--config", str(path), "--scheduler", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "--scheduler='slurm' is not valid; accepted: a machine with SLURM's sbatch and srun" in err
    assert not (tmp_path / "study").exists()


def test_slurm_options_become_the_sbatch_lines(tmp_path, monkeypatch):
    """What `--scheduler slurm` submits for a 5-job array, read from the sbatch text submitit writes."""
    pytest.importorskip("submitit")
    from submitit.slurm.slurm import _make_sbatch_string

    from reclight.study.scheduler import from_args, make_executor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):  # submitit's SLURM executor looks for them; nothing is submitted
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    args = _run_parser().parse_args(["--config", "x.yaml", "--scheduler", "slurm", "--slurm_partition", "cpu",
                                     "--slurm_time_min", "30", "--slurm_mem_gb", "8", "--slurm_array_parallelism", "3",
                                     "--slurm_extra", "account=proj42"])
    executor = make_executor(from_args(args), tmp_path / "study", "micro", threads=2)
    text = _make_sbatch_string(command="CMD", folder=executor._executor.folder, map_count=5,
                               **executor._executor.parameters)
    lines = set(text.splitlines())
    assert {"#SBATCH --partition=cpu", "#SBATCH --time=30", "#SBATCH --mem=8GB", "#SBATCH --cpus-per-task=2",
            "#SBATCH --array=0-4%3", "#SBATCH --account=proj42", "#SBATCH --job-name=reclight-micro",
            "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1"} <= lines
    assert f"#SBATCH --output={tmp_path}/study/submitit/%A_%a/%A_%a_0_log.out" in lines


@pytest.mark.extended
def test_submitit_local_runs_are_the_local_pool_runs(tmp_path, capsys):
    """One micro study, run by the local pool, then its runs deleted and run again through
    submitit's local executor (the warm-up is kept: skipped as finished, as locally): every
    metric but the wall-clock ones is identical, and so are the report and its summary.json.
    Then `replicate` on seed 1 runs end to end (a warm-up and 2 runs) and writes its agreement."""
    pytest.importorskip("submitit")
    path, cfg, folders, pool = run_micro_study(tmp_path)
    out = tmp_path / "study"
    summary, report = (out / "summary.json").read_text(), report_lines(out)
    for f in folders:
        shutil.rmtree(f)

    capsys.readouterr()
    assert main(["--config", str(path), "--scheduler", "submitit-local"]) == 0
    err = capsys.readouterr().err
    assert "3 commands: 1 already finished (skipped), 2 to run, 2 at a time through submitit's local executor" in err
    for f in folders:
        assert (run_metrics(f), (f / "run.json").read_text()) == pool[f], f
        assert len(pool[f][0]) > 4  # the start-of-RL evaluation, 3 steps, 3 evaluations
    assert (out / "summary.json").read_text() == summary
    assert report_lines(out) == report
    assert len(list((out / "submitit").glob("*/*_result.pkl"))) == 2  # one submitit job per run

    # the replication of its primary claim on seed 1, through the same executor, in its own folder
    assert main(["replicate", str(out), "--seeds", "1", "--scheduler", "submitit-local"]) == 0
    rep = out / "replicate-1"
    assert "3 commands: 0 already finished (skipped), 3 to run" in capsys.readouterr().err
    assert all((rep / "runs" / s / a / "seed1" / "logs" / "metrics.csv").is_file() for s, a in cfg.cells())
    assert "**1 primary rows: same verdict 1 of 1;" in (rep / "agreement.md").read_text()  # 1 seed: inconclusive
    assert (out / "summary.json").read_text() == summary  # the original's folders only read


def _family_study(tmp_path, **changes):
    """The micro study with a primary and a secondary claim; ``wide @ offline`` is compared by the
    secondary claim only, so a replication does not run it."""
    arms = {"reinforce": "reinforce", "clip": {"preset": "rec_oneside_nois"},
            "wide": {"preset": "rec_oneside_nois_wide", "settings": ["offline"]}}
    claims = [{"text": "clipping not worse", "a": "clip", "b": "reinforce", "statistic": "final", "rule": "not_worse",
               "family": "primary", "settings": ["periodic"]},
              {"text": "clipping faster early", "a": "clip", "b": "reinforce", "statistic": "early",
               "rule": "greater", "family": "primary", "settings": ["periodic"]},
              {"text": "wide faster", "a": "wide", "b": "clip", "statistic": "auc", "rule": "greater",
               "family": "secondary"}]
    return micro_study(tmp_path, arms=arms, settings=["periodic", "offline"], claims=claims, **changes)


def test_replicate_plans_the_primary_cells_on_fresh_seeds(tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    write_study(out / "study.yaml", _family_study(tmp_path))
    assert main(["replicate", str(out), "--seeds", "101", "102", "--dry-run"]) == 0
    rep = out / "replicate-101-102"
    lines = capsys.readouterr().out.strip().splitlines()
    warmup = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 reclight study warmup"
    assert lines[:2] == [f"{warmup} {rep} --seed {s}" for s in (101, 102)]
    runs = [(arm, seed) for arm in ("reinforce", "clip") for seed in (101, 102)]
    assert len(lines) == 2 + len(runs)  # no offline cell, no wide arm: only the secondary claim uses them
    for line, (arm, seed) in zip(lines[2:], runs):
        assert f'"save_dir": "{rep}/runs/periodic/{arm}/seed{seed}"' in line and f"--seed_everything={seed}" in line
    cfg = load_study(rep / "study.yaml")
    assert [c.text for c in cfg.claims] == ["clipping not worse", "clipping faster early"]
    assert cfg.seeds == (101, 102) and [s.name for s in cfg.settings] == ["periodic"]
    assert sorted(p.name for p in out.iterdir()) == ["replicate-101-102", "study.yaml"]  # the original untouched


@pytest.mark.parametrize("args, message", [
    (["--seeds", "1", "101"], "--seeds=[1, 101] is not valid; accepted: fresh seeds, none of the study's [0, 1]"),
    (["--seeds", "101", "--out_dir", "{out}"], "--out_dir='{out}' is not valid; accepted: a folder other than the "
                                               "study's own"),
    (["--seeds", "101", "--slurm_partition", "cpu"], "--slurm_partition='cpu' is not valid"),
])
def test_replicate_refuses_bad_input(tmp_path, capsys, args, message):
    out = tmp_path / "study"
    out.mkdir()
    write_study(out / "study.yaml", _family_study(tmp_path))
    assert main(["replicate", str(out), *[a.format(out=out) for a in args]]) == 2
    assert message.format(out=out) in capsys.readouterr().err
    assert main(["replicate", str(tmp_path / "nothing"), "--seeds", "101"]) == 2
    assert (f"DIR='{tmp_path / 'nothing'}' is not valid; accepted: a study folder holding study.yaml"
            in capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["study.yaml"]


def test_replicate_keeps_a_learning_rate_setting(tmp_path):
    """A study with an lrs axis: the replication runs the primary claim's cells under the same
    setting names, folders and --model.optim.lr, its study.yaml written setting by setting."""
    from reclight.study.plan import Shape, make_plan
    from reclight.study.replicate import replicate_config

    claims = [{"text": "clipping beats REINFORCE offline at lr 1e-3", "a": "clip@offline_lr1e-3",
               "b": "reinforce@offline_lr1e-3", "statistic": "final", "rule": "greater", "family": "primary"},
              {"text": "clipping not worse", "a": "clip", "b": "reinforce", "statistic": "final",
               "rule": "not_worse", "family": "secondary"}]
    original = study_from_dict(micro_study(tmp_path, settings=["periodic", "offline"], lrs=[1.0e-4, 1.0e-3],
                                           claims=claims))
    replica = replicate_config(original, [7])
    assert [(s.name, s.lr, s.offline) for s in replica.settings] == [("offline_lr1e-3", 1e-3, True)]
    assert study_from_dict(replica.to_dict()) == replica  # what study.yaml holds reads back
    runs = [j for j in make_plan(replica, Shape(max_steps=3, val_check_interval=1, warmup=True)) if not j.is_warmup]
    assert [(j.arm, j.setting) for j in runs] == [("reinforce", "offline_lr1e-3"), ("clip", "offline_lr1e-3")]
    assert all("--model.optim.lr=0.001" in j.argv for j in runs)


T_975_2 = 4.302652729911275
"""t_{0.975, 2}: the 95% two-sided quantile with 3 seeds (tables: 4.303)."""


def test_agreement_on_synthetic_runs(tmp_path):
    """Synthetic run folders with known differences (reinforce flat at 0.5; `final` = mean of the 3
    evaluations, `early` = the first one, as max_steps / 4 < 1).

    Original seeds 0, 1, 2: final Delta = early Delta = +0.10, +0.12, +0.14: mean +0.12, sd 0.02,
    95% interval +0.12 -+ 4.3027 x 0.02 / sqrt(3) = [+0.0703, +0.1697].
    Replication seeds 101-103: final Delta +0.08, +0.10, +0.12: [+0.0503, +0.1497], same sign,
    covers +0.12; early Delta -0.03, -0.02, -0.01 (first evaluation 0.47, 0.48, 0.49, the other
    two chosen to keep `final`): mean -0.02, [-0.0448, +0.0048]: opposite sign, misses +0.12."""
    from reclight.study.replicate import agreement, replicate_config, write_agreement
    from reclight.study.report import claim_rows, collect

    original = study_from_dict(_family_study(tmp_path, seeds=[0, 1, 2]))
    replica = replicate_config(original, [101, 102, 103])
    finals = {0: 0.10, 1: 0.12, 2: 0.14, 101: 0.08, 102: 0.10, 103: 0.12}
    firsts = {0: 0.60, 1: 0.62, 2: 0.64, 101: 0.47, 102: 0.48, 103: 0.49}
    for cfg in (original, replica):
        for seed in cfg.seeds:
            rest = (3 * (0.5 + finals[seed]) - firsts[seed]) / 2
            write_run(run_folder(cfg, "periodic", "clip", seed), [0.5, firsts[seed], rest, rest], max_steps=3, every=1)
            write_run(run_folder(cfg, "periodic", "reinforce", seed), [0.5] * 4, max_steps=3, every=1)
    rows = agreement(original, replica)
    assert [(r["claim"], r["setting"]) for r in rows] == [("clipping not worse", "periodic"),
                                                          ("clipping faster early", "periodic")]
    half = T_975_2 * 0.02 / math.sqrt(3)
    expected = [((0.12, 0.12 - half, 0.12 + half), (0.10, 0.10 - half, 0.10 + half)),
                ((0.12, 0.12 - half, 0.12 + half), (-0.02, -0.02 - half / 2, -0.02 + half / 2))]
    for r, (orig, rep) in zip(rows, expected):
        for side, values in (("original", orig), ("replicated", rep)):
            assert [r[side][k] for k in ("mean", "lo", "hi")] == pytest.approx(values, abs=1e-9)
            assert r[side]["seeds"] == 3
    assert [(r["same_sign"], r["covers_original_mean"]) for r in rows] == [(True, True), (False, False)]
    # the verdicts are the two reports' own rows, each study's primary family adjusted alone
    for r, o, n in zip(rows, claim_rows(original, collect(original)), claim_rows(replica, collect(replica))):
        assert (r["original"]["verdict"], r["replicated"]["verdict"]) == (o["verdict"], n["verdict"])
        assert r["same_verdict"] == (o.get("adjusted_verdict", o["verdict"]) == n.get("adjusted_verdict", n["verdict"]))
    assert rows[0]["same_verdict"] and not rows[1]["same_verdict"]  # holds both times; holds, then contradicted
    text = write_agreement(original, replica, log=lambda line: None).read_text()
    assert ("**2 primary rows: same verdict 1 of 2; same sign of the mean Delta 1 of 2; the replication's interval "
            "covers the original mean 1 of 2.**") in text
    assert "| clipping faster early | periodic | greater |" in text and "| **no** | **no** |" in text
    assert json.loads((tmp_path / "study" / "replicate-101-102-103" / "agreement.json").read_text())["rows"][1][
        "same_sign"] is False


def test_a_commands_environment_sleeps_idle_openmp_threads_and_keeps_the_users_choice(monkeypatch, tmp_path):
    """Each command's environment: the study's thread count, the scheduler's variables gone, and
    OMP_WAIT_POLICY=PASSIVE unless the user set one (`python -m reclight.study` does not pass
    through the `reclight` launcher that sets it; spinning idle threads of two runs steal each
    other's cores)."""
    from reclight.study.plan import Job
    from reclight.study.runner import child_env

    job = Job(0, tmp_path, ("fit",), threads=3)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    env = child_env(job)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert "SLURM_JOB_ID" not in env
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert child_env(job)["OMP_WAIT_POLICY"] == "ACTIVE"
