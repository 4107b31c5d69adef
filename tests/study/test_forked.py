"""A study's commands forked from one preloaded process (reclight/study/forked.py): each run is
bitwise the run of its own subprocess, and the forked command holds its lock and writes its log."""

import fcntl
import os
import shutil
from functools import partial

import pytest

from reclight.study import runner, scheduler
from reclight.study.cli import main
from study_helpers import report_lines, run_metrics, run_micro_study


@pytest.mark.slow
def test_forked_runs_are_the_subprocess_runs(tmp_path, capsys, monkeypatch):
    """The micro study (one seed: a warm-up and 2 runs) through the default local pool, whose
    commands are forked; then its runs deleted and run again as subprocesses (the warm-up kept):
    every metric but the wall-clock ones, every run.json and the report are identical."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path, _, folders, forked = run_micro_study(tmp_path)
    out = tmp_path / "study"
    assert "2 at a time, forked from one process that imported the libraries once" in capsys.readouterr().err
    report = report_lines(out)
    for f in folders:
        assert "not forked" not in (f / "log.txt").read_text()
        assert len(forked[f][0]) > 4  # the start-of-RL evaluation, 3 steps, 3 evaluations
        shutil.rmtree(f)

    monkeypatch.setattr(scheduler, "LocalPool", partial(runner.LocalPool, forked=False))
    assert main(["--config", str(path)]) == 0
    assert "2 to run, 2 at a time, subprocesses" in capsys.readouterr().err
    for f in folders:
        assert (run_metrics(f), (f / "run.json").read_text()) == forked[f], f
    assert report_lines(out) == report


def test_a_forked_command_holds_its_lock_and_writes_its_log(tmp_path):
    """The lock's open file description goes to the child: while the command runs, a second
    flock on the lock file fails (the parent's descriptor is closed in between), and the
    command's output and exit status come back."""
    from reclight.study.forked import ForkedCommands

    lock = tmp_path / "run.lock"
    log = tmp_path / "log.txt"
    log.write_text("")
    marker = tmp_path / "started"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    commands = ForkedCommands({**os.environ, "OMP_NUM_THREADS": "1"})
    commands.start()
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "code", commands.run("forked_child", [str(marker)], dict(os.environ), 1, str(log), fd,
                             str(tmp_path))))
    thread.start()
    while not marker.exists():
        thread.join(0.05)
    os.close(fd)  # the parent lets go: the child's copy still holds the lock
    other = os.open(lock, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    thread.join(30)
    assert result["code"] == 7
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the command ended
    os.close(other)
    assert log.read_text() == "child says hi\n"
