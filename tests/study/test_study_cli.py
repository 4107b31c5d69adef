"""The study through its real entry points: the dry run prints one command per line; a warmed-up
model is what every arm of its seed starts RL from (bitwise) and what the trainer's own warm-up
reaches; a 2-arm x 1-setting x 2-seed x 3-step study runs through ``reclight study``, is
SIGKILLed half-way, and the resumed study runs only what had not finished (counted)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from study_helpers import ROOT, micro_study, write_study

from reclight.study.cli import main
from reclight.study.config import study_from_dict
from reclight.study.plan import make_plan, validate_commands
from reclight.study.report import read_run
from reclight.study.warmup import warm_up, warmup_finished

RECLIGHT = str(Path(sys.executable).with_name("reclight"))


def test_dry_run_prints_one_command_per_line(tmp_path, capsys):
    path = write_study(tmp_path / "micro.yaml", micro_study(tmp_path))
    assert main(["--config", str(path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 2 * 1 * 2  # one warm-up per seed, then arms x settings x seeds
    out = tmp_path / "study"
    assert lines[0] == f"OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 reclight study warmup {out} --seed 0"
    for line, (arm, seed) in zip(lines[2:], [("reinforce", 0), ("reinforce", 1), ("clip", 0), ("clip", 1)]):
        assert line.startswith("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 reclight fit --config ")
        assert f"--seed_everything={seed}" in line and f"--model.policy.name_or_path={out}/warmup/seed{seed}" in line
        assert "--model.warmup=null" in line and f'"save_dir": "{out}/runs/periodic/{arm}/seed{seed}"' in line
    assert sorted(p.name for p in out.iterdir()) == ["study.yaml"]  # nothing else written, nothing run


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_bitwise(state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    names = set(saved)
    assert names and names <= set(state)
    for name in names:
        assert torch.equal(state[name], saved[name]), name


def test_warmup_once_per_seed_is_the_arms_rl_start_bitwise(tmp_path, monkeypatch):
    """warm_up saves seed 0's warmed-up model; the arm's own command (run in-process, 1 step)
    starts RL from exactly those weights (its frozen RL-start copy, the `kl/init` reference), and
    a plain `reclight fit` that warms up by itself reaches exactly the same weights."""
    from reclight.trainer.cli import main as fit_main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = {**micro_study(tmp_path)["base_overrides"], "trainer.max_steps": 1}
    cfg = study_from_dict(micro_study(tmp_path, base_overrides=overrides))
    jobs = make_plan(cfg, validate_commands(cfg))
    folder = warm_up(cfg, 0, log=lambda line: None)
    assert warmup_finished(folder) and json.loads((folder / "warmup.json").read_text())["warmup/steps"] == 2.0
    saved = _state(folder)
    before = {k: v.clone() for k, v in saved.items()}
    assert warm_up(cfg, 0, log=lambda line: None) == folder  # reused, not redone
    _assert_bitwise(_state(folder), before)

    run = next(j for j in jobs if not j.is_warmup and j.seed == 0 and j.arm == "clip")
    cli = fit_main(list(run.argv))
    _assert_bitwise(cli.model._init_policy.model.state_dict(), saved)
    assert read_run(run.folder).complete

    plain = [a for a in run.argv if not a.startswith(("--model.policy.name_or_path", "--model.warmup=null",
                                                       "--trainer.logger"))]
    cli = fit_main(plain + [f"--trainer.logger.init_args.save_dir={tmp_path / 'plain'}"])
    _assert_bitwise(cli.model._init_policy.model.state_dict(), saved)


def _done(cfg, jobs) -> list:
    return [j for j in jobs if (warmup_finished(j.folder) if j.is_warmup else read_run(j.folder).complete)]


@pytest.mark.slow
def test_study_end_to_end_killed_and_resumed(tmp_path):
    """`reclight study` as a user runs it (a subprocess, its own process group): SIGKILL the whole
    group once the first run has finished, rerun the same command, and count: every command that
    had finished is skipped and left untouched, the others run, and the report covers both runs.
    One seed (one warm-up, two arms): each command is a process that spends most of its time
    importing, and a second seed would only repeat what the first shows. One command at a time:
    two forked runs of the same length finished within one poll of each other, leaving nothing
    to resume (a flaky failure)."""
    study = micro_study(tmp_path, seeds=[0])
    path = write_study(tmp_path / "micro.yaml", study)
    cfg = study_from_dict(study)
    jobs = make_plan(cfg, validate_commands(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([RECLIGHT, "study", "--config", str(path), "--workers", "1"], cwd=ROOT, env=env,
                            start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any(not j.is_warmup and read_run(j.folder).complete for j in jobs):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no run finished in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    finished = _done(cfg, jobs)
    assert 2 <= len(finished) < len(jobs)  # the warm-up and at least one run; not everything
    stamps = {j.folder: (j.folder / ("warmup.json" if j.is_warmup else "logs/metrics.csv")).stat().st_mtime_ns
              for j in finished}

    resumed = subprocess.run([RECLIGHT, "study", "--config", str(path), "--workers", "1"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    err = resumed.stderr
    assert (f"{len(jobs)} commands: {len(finished)} already finished (skipped), {len(jobs) - len(finished)} to run, "
            "1 at a time") in err
    assert err.count(" done in ") == len(jobs) - len(finished)  # one progress line per command run
    assert f"[{len(jobs) - len(finished):>3}/{len(jobs) - len(finished)}]" in err and " left" in err
    for j in finished:  # not rerun
        assert (j.folder / ("warmup.json" if j.is_warmup else "logs/metrics.csv")).stat().st_mtime_ns == stamps[j.folder]
    assert len(_done(cfg, jobs)) == len(jobs)

    out = tmp_path / "study"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["seeds"] for r in summary["rows"]] == [1] and summary["rows"][0]["verdict"] == "inconclusive"
    cells = summary["cells"]["periodic"]
    # paired: both arms of a seed start from the same warm-up
    assert cells["clip"]["per_seed"]["0"]["before"] == cells["reinforce"]["per_seed"]["0"]["before"]
    report = (out / "report.md").read_text()
    assert "Runs complete: 2 of 2" in report and "| clipping not worse | periodic |" in report
    assert (out / "periodic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for j in jobs[1:]:  # every run folder records the command it ran, the one the dry run prints
        assert json.loads((j.folder / "run.json").read_text())["command"] == j.shell()
