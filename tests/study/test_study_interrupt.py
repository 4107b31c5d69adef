"""Ctrl-C during a study (issue #25): one line saying it was interrupted and how to resume, exit
status 130 (128 + SIGINT), instead of a raw KeyboardInterrupt traceback. That the rerun resumes
(finished runs skipped) is ``test_study_cli.py``'s SIGKILL test; here the pool is replaced by one
that is interrupted, so the test takes no run."""

from study_helpers import micro_study, write_study

import reclight.study.plan as plan
import reclight.study.runner as runner
from reclight.study.cli import main


def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path / "micro.yaml", micro_study(tmp_path))
    shape = plan.Shape(max_steps=3, val_check_interval=1, warmup=True)
    monkeypatch.setattr(plan, "validate_commands", lambda cfg: shape)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_jobs", interrupted)
    assert main(["--config", str(path), "--workers", "1"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("reclight study: interrupted (Ctrl-C); rerun the same command to resume: finished runs and "
                       "warm-ups are kept and skipped, unfinished ones start again from step 0: reclight study "
                       f"--config {path} --workers 1")
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in err)
