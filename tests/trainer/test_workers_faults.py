"""Faults of a run with a rollout worker (``model.rollout.workers: 1``, docs/async.md "Rollout
workers"), through the real ``reclight fit`` command on tests/configs/resume.yaml with the
asynchronous schedule of test_resume.py (in-flight updates, eta = 1, 6 slots):

- a worker killed by SIGTERM stops the run with an error naming it; ``--ckpt_path last`` then
  ends on bitwise the weights, optimizer, rollout state and metrics of the straight IN-PROCESS
  run (paced workers change nothing that is trained on);
- a worker that stops answering (SIGSTOP) stops the run within ``heartbeat_s`` + 0.5 s;
- SIGKILL, SIGTERM and Ctrl-C of the trainer leave no worker behind (checked by pid).
"""

import os
import re
import signal
import subprocess
import time

import pytest
import torch

from test_resume import ASYNC, assert_same, command, env, metric_rows, run_dir, start
from reclight.rollout.workers import alive

WORKER = ["--model.rollout", "{workers: 1, heartbeat_s: 2.0}"]
PID = re.compile(r"rollout worker 0: pid (\d+), log (\S+)")


def log(folder, version):
    return (folder / f"{version}.log").read_text()


def worker_pids(folder, version):
    return [int(m.group(1)) for m in PID.finditer(log(folder, version))]


def gone(pid, within=3.0):
    """The worker ``pid`` is gone (exited or reaped) within ``within`` seconds."""
    end = time.monotonic() + within
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not alive(pid)


def without_worker_columns(rows):
    return {s: {k: v for k, v in r.items() if not k.startswith("rollout/worker_")} for s, r in rows.items()}


@pytest.mark.extended
def test_a_dead_worker_stops_the_run_and_the_last_checkpoint_resumes_exactly(tmp_path):
    """Three runs (~60 s on 2 shared cores): the in-process reference, a worker run whose worker
    gets SIGTERM at step 3, and its resume with ``--ckpt_path last``."""
    (tmp_path / "ref").mkdir()
    # the reference generates at the worker's threads (1): at 2 threads the engine's log-probs
    # differ in the last bit now and then (its reductions split differently), so a reference at
    # the machine's default threads fails on a 2-core CI machine (docs/async.md, "Faults")
    ref = start(tmp_path / "ref", "reference", *ASYNC[1], threads=1)
    killed = start(tmp_path, "killed", *ASYNC[1], *WORKER, "--trainer.callbacks+=conftest.SignalWorkerAt",
                   "--trainer.callbacks.step=3", "--trainer.callbacks.sig=SIGTERM")
    assert killed.wait() != 0, log(tmp_path, "killed")[-3000:]
    (pid,) = worker_pids(tmp_path, "killed")
    text = log(tmp_path, "killed")
    # the worker may have ended step 3's window before the signal: then the checkpoint of step 4
    # (which asks for its state) or step 4's batch finds it dead
    assert re.search(rf"rollout worker 0 \(pid {pid}\) died \(killed by SIGTERM\) while (ending step 3|saving "
                     r"its state|generating step 4's batch); log: ", text), text[-3000:]
    assert not alive(pid)
    ckpts = run_dir(tmp_path, "killed") / "checkpoints"
    assert (ckpts / "step=3.ckpt").is_file() and not (ckpts / "step=5.ckpt").exists()
    worker_log = run_dir(tmp_path, "killed") / "rollout-worker-0.log"
    assert worker_log.read_text().startswith(f"rollout worker: pid {pid}, parent {killed.pid}")

    resumed = start(tmp_path, "resumed", *ASYNC[1], *WORKER, "--ckpt_path", "last",
                    "--trainer.logger.init_args.version", "killed")
    assert resumed.wait() == 0, log(tmp_path, "resumed")[-3000:]
    assert ref.wait() == 0, log(tmp_path / "ref", "reference")[-3000:]
    (pid2,) = worker_pids(tmp_path, "resumed")
    assert pid2 != pid and gone(pid2)
    final = "step=7.ckpt"
    a = torch.load(run_dir(tmp_path / "ref", "reference") / "checkpoints" / final, weights_only=True)
    b = torch.load(ckpts / final, weights_only=True)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "reclight"):
        if key == "reclight":  # the run records differ in model.rollout only (a free setting)
            a[key].pop("run_config"), b[key].pop("run_config")
        assert_same(a[key], b[key], key)
    ref_rows = metric_rows(run_dir(tmp_path / "ref", "reference") / "metrics.csv")
    rows = metric_rows(run_dir(tmp_path, "killed") / "metrics.csv")
    assert sorted(rows) == sorted(ref_rows) == list(range(7))
    assert without_worker_columns(rows) == ref_rows
    assert float(rows[6]["rollout/worker_rss_mib"]) > 10  # the worker's memory is reported


@pytest.mark.extended
def test_a_silent_worker_stops_the_run_within_the_heartbeat(tmp_path):
    run = start(tmp_path, "silent", *ASYNC[1], *WORKER, "--trainer.callbacks+=conftest.SignalWorkerAt",
                "--trainer.callbacks.step=2", "--trainer.callbacks.sig=SIGSTOP")
    assert run.wait(timeout=120) != 0
    (pid,) = worker_pids(tmp_path, "silent")
    text = log(tmp_path, "silent")
    found = re.search(rf"rollout worker 0 \(pid {pid}\) stopped answering while (?:ending step 2|saving its state|"
                      r"generating step 3's batch): no heartbeat for "
                      r"([0-9.]+) s \(model\.rollout\.heartbeat_s=2\.0\); it was killed", text)
    assert found, text[-3000:]
    # past the bound (heartbeat_s) and within one poll (+ beat period) of it; the message rounds to 0.1 s,
    # so a silence of 2.04 s reads 2.0 (a CI run failed on `2.0 < 2.0`)
    assert 2.0 <= float(found.group(1)) <= 2.0 + 0.5 + 0.3
    assert gone(pid)


@pytest.mark.extended
@pytest.mark.parametrize("how", ["sigkill", "sigterm", "ctrl-c"])
def test_stopping_the_trainer_leaves_no_worker(tmp_path, how):
    if how == "sigterm":  # the deferred stop: the step ends, the checkpoint is written, exit 143
        proc = start(tmp_path, "run", *ASYNC[1], *WORKER, "--trainer.callbacks+=conftest.SigtermAt",
                     "--trainer.callbacks.step=2", "--trainer.callbacks.where=update")
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log(tmp_path, "run")[-3000:]
        assert (run_dir(tmp_path, "run") / "checkpoints" / "interrupted-step=3.ckpt").is_file()
    else:
        marker = tmp_path / "paused"
        out = open(tmp_path / "run.log", "w")
        proc = subprocess.Popen(
            command(tmp_path, "run", *ASYNC[1], *WORKER, "--trainer.callbacks+=conftest.PauseAtStep",
                    "--trainer.callbacks.step=2", f"--trainer.callbacks.marker={marker}"),
            env=env(), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            # as from a terminal: a shell's background job (pytest run with &) would pass SIGINT on ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            while not marker.exists() and proc.poll() is None:
                time.sleep(0.05)
            assert proc.poll() is None, log(tmp_path, "run")[-3000:]
            if how == "sigkill":
                proc.send_signal(signal.SIGKILL)
            else:  # a terminal's Ctrl-C: SIGINT to the whole foreground process group, the worker included
                os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    (pid,) = worker_pids(tmp_path, "run")
    assert gone(pid), f"{how}: worker {pid} outlived the trainer"
