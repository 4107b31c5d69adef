"""Exact resume after SIGKILL (issue #5, item 1), through the real ``reclight fit`` command.

Per setting (periodic sync, constant lag, on-policy after a supervised warm-up), three runs of ``tests/configs/resume.yaml`` (7 steps, a checkpoint after every
step): a reference run straight through; a run that parks at the start of step ``c`` (after
``step=c.ckpt`` is on disk, see ``conftest.PauseAtStep``) and is killed there with
SIGKILL, so no exit handler runs; and a run resumed from that checkpoint with ``--ckpt_path``.
The reference and the run to kill run at the same time (two processes, two cores).

Asserted bitwise (``torch.equal``, CPU): the final checkpoint's weights, optimizer state,
rollout-engine weights and version, queued rollouts and RNG states are identical; every logged
metric of the resumed steps is identical to the reference's, except the wall-clock ones
(``*_s``, ``throughput/*``), which measure time, not the run.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "tests" / "configs" / "resume.yaml"
MAX_STEPS = 7
WARMUP = "{max_steps: 4, check_every: 2, check_size: 4, batch_size: 8, target_accuracy: 1.0}"


def command(tmp_path, version, *extra):
    return [
        sys.executable, "-m", "reclight", "fit", "--config", str(CFG),
        "--model.policy.tiny_dir", str(tmp_path.parent / "tiny"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--trainer.logger.init_args.version", version, *extra,
    ]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), e.get("PYTHONPATH", "")])
    return e


def run_dir(tmp_path, version):
    return tmp_path / "logs" / "resume" / version


def wall_clock(column):
    return column.startswith("throughput/") or column.endswith("_s")


def metric_rows(path, max_step=None, warmup=False):
    """``{step: {column: value}}`` of the logged metrics (non-empty, non-wall-clock columns): the
    RL ones, or with ``warmup`` the supervised warm-up's (logged on their own step axis)."""
    rows: dict[int, dict[str, str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            keep = {k: v for k, v in row.items()
                    if v != "" and not wall_clock(k) and k != "step" and k.startswith("warmup/") == warmup}
            if keep and (max_step is None or step <= max_step):
                rows.setdefault(step, {}).update(keep)
    return rows


def assert_same(a, b, where=""):
    """Recursive bitwise equality of checkpoint content."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and where.endswith("gen_seconds"):
        pass  # wall-clock time of generating a queued batch
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize(
    "name, sync, kill_at",
    [
        ("periodic", ["--model.sync.sync_interval", "3"], 4),  # k=3, d=0: engine holds theta_3 at step 4
        ("lag", ["--model.sync.sync_interval", "1", "--model.sync.sync_offset", "2"], 3),  # k=1, d=2: 2 queued batches
        # on-policy (k=1, d=0) after a short supervised warm-up, which must not run again on resume
        ("on_policy_warmup", ["--model.warmup", WARMUP], 2),
    ],
)
def test_sigkill_and_resume_is_bitwise_identical(tmp_path, name, sync, kill_at):
    marker = tmp_path / "paused"
    pause = ["--trainer.callbacks+=conftest.PauseAtStep",
             f"--trainer.callbacks.step={kill_at}", f"--trainer.callbacks.marker={marker}"]
    def start(version, *args):  # output to a file: a full pipe would block the process
        out = open(tmp_path / f"{version}.log", "w")
        return subprocess.Popen(command(tmp_path, version, *sync, *args), env=env(), cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)

    def log(version):
        return (tmp_path / f"{version}.log").read_text()[-4000:]

    reference = start("reference")
    killed = start("killed", *pause)
    while not marker.exists() and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, log("killed")  # it was parked, not finished
    ckpt = run_dir(tmp_path, "killed") / "checkpoints" / f"step={kill_at}.ckpt"
    assert ckpt.is_file(), log("killed")

    resumed = start("resumed", "--ckpt_path", str(ckpt))
    assert resumed.wait() == 0, log("resumed")
    assert reference.wait() == 0, log("reference")
    if "--model.warmup" in sync:  # the warm-up ran once, and not again on resume
        assert "warm-up:" in log("reference") and "warm-up" not in log("resumed")

    final = f"step={MAX_STEPS}.ckpt"
    ref = torch.load(run_dir(tmp_path, "reference") / "checkpoints" / final, weights_only=True)
    res = torch.load(run_dir(tmp_path, "resumed") / "checkpoints" / final, weights_only=True)
    assert ref["global_step"] == res["global_step"] == MAX_STEPS
    assert {"rollouts", "init_policy", "rng", "skip_guard"} <= set(res["reclight"]) and len(res["lr_schedulers"]) == 1
    assert {"engine", "queue", "next_step", "num_syncs"} <= set(res["reclight"]["rollouts"])
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "reclight"):
        assert_same(ref[key], res[key], key)
    # The run really trained: the weights moved away from the killed run's checkpoint.
    start = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(start[k], v) for k, v in res["state_dict"].items())

    # Logged metrics: the killed run's rows before the kill point + the resumed run's rows must be
    # exactly the straight run's rows (CSV flushed every step, so the killed run's are on disk).
    ref_rows = metric_rows(run_dir(tmp_path, "reference") / "metrics.csv")
    joined = metric_rows(run_dir(tmp_path, "killed") / "metrics.csv", max_step=kill_at - 1)
    resumed_rows = metric_rows(run_dir(tmp_path, "resumed") / "metrics.csv")
    assert min(resumed_rows) == kill_at and not set(joined) & set(resumed_rows)
    joined.update(resumed_rows)
    assert sorted(joined) == sorted(ref_rows) == list(range(MAX_STEPS))
    for step in ref_rows:
        assert joined[step] == ref_rows[step], step
    columns = set().union(*resumed_rows.values())
    warm = metric_rows(run_dir(tmp_path, "reference") / "metrics.csv", warmup=True)
    assert metric_rows(run_dir(tmp_path, "killed") / "metrics.csv", warmup=True) == warm
    assert metric_rows(run_dir(tmp_path, "resumed") / "metrics.csv", warmup=True) == {}
    assert bool(warm) == ("--model.warmup" in sync)
    assert {"reward/mean", "val/acc", "train/lr", "train/skipped_steps", "grad/norm", "kl/init"} <= columns
