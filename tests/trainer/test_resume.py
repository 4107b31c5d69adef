"""Exact resume after SIGKILL and SIGTERM (issues #5 item 1, #17 items 1-2), through the real
``reclight fit`` command.

Per setting (periodic sync after a supervised warm-up; a constant lag with 4 updates per batch), a reference
run of ``tests/configs/resume.yaml`` (7 steps, a checkpoint after every step) goes straight
through (started once per setting, shared by its cases). Each case stops a second run at a
known point: SIGKILL while parked at the start of a step (after ``step=c.ckpt`` is on disk,
``conftest.PauseAtStep``), so no exit handler runs; or SIGTERM sent by the process to itself
during a step's update or when a rollout starts (``conftest.SigtermAt``), which must exit with
status 143 and leave ``interrupted-step=N.ckpt``. The run is then resumed with ``--ckpt_path``
(a file, or ``last``), into a folder of its own or continuing the stopped run's folder.

Asserted bitwise (``torch.equal``, CPU): the final checkpoint's weights, optimizer state,
rollout-engine weights and version, queued rollouts and RNG states are identical; every logged
metric is identical to the reference's (the stopped run's rows before the resumed step plus the
resumed run's, or the continued folder's whole ``metrics.csv``), except the wall-clock ones
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
WARMUP_CFG = "{max_steps: 4, check_every: 2, check_size: 4, batch_size: 8, target_accuracy: 1.0}"


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


# Two settings, each with one straight reference run shared by its cases:
# - periodic sync (k=3, d=0) after a short supervised warm-up (the warm-up must not run again on
#   resume; the engine holds theta_3 at step 4);
# - a constant lag (k=1, d=2: two batches queued at a kill) with 2 epochs x 2 mini-batches = 4
#   updates per batch and one-side IS clipping (its ratio moves from the second update on;
#   issue #13): the kill lands between batches of 4 updates each.
PERIODIC = ("periodic_warmup", ["--model.sync.sync_interval", "3", "--model.warmup", WARMUP_CFG])
LAG = ("lag_updates", ["--model.sync.sync_interval", "1", "--model.sync.sync_offset", "2",
                       "--model.algorithm.preset", "rec_oneside_is", "--model.updates", "{epochs: 2, mini_batches: 2}"])
# The asynchronous schedule (issue #22): in-flight updates and eta = 1 on 6 slots, so the clock,
# the in-flight sequences and their KV cache are checkpoint state at every kill.
ASYNC = ("async", ["--model.clock", "{enabled: true, max_inflight: 6, weight_update: inflight, staleness: pace, "
                   "max_staleness: 1}"])
# LoRA (issue #27) after the warm-up, with grpo_kl's reference KL (the base, adapter disabled): the
# checkpoint holds the adapter only, so the resumed run re-runs the seeded warm-up to rebuild the
# base (checked against the checkpoint's base hash) and must still end bitwise on the straight run.
LORA = ("lora_warmup", ["--model.sync.sync_interval", "3", "--model.warmup", WARMUP_CFG, "--model.policy.lora",
                        "{enabled: true, rank: 4}", "--model.algorithm.preset", "grpo_kl"])
_REFERENCES: dict[str, tuple[subprocess.Popen, Path]] = {}


def start(folder, version, *args, threads=None):
    """A ``reclight fit`` of resume.yaml in ``folder``; output to a file (a full pipe would block it).
    ``threads``: its torch threads (OMP_NUM_THREADS); None: the caller's."""
    out = open(folder / f"{version}.log", "w")
    e = env() if threads is None else {**env(), "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(command(folder, version, *args), env=e, cwd=folder, stdout=out, stderr=subprocess.STDOUT)


def reference(tmp_path_factory, setting):
    """The straight run of a setting, started once and shared by the cases that use it."""
    name, sync = setting
    if name not in _REFERENCES:
        folder = tmp_path_factory.mktemp(f"reference-{name}")
        _REFERENCES[name] = (start(folder, "reference", *sync), folder)
    return _REFERENCES[name]


@pytest.mark.parametrize(
    "setting, stop, at, resume",
    [
        # SIGKILL while parked at the start of step `at` (step=at.ckpt is on disk), resumed with
        # --ckpt_path <file> into a folder of its own: its logs join the killed run's
        (PERIODIC, "sigkill", 4, "own folder"),  # the engine holds theta_3 at step 4; no second warm-up
        (LAG, "sigkill", 3, "last"),  # two batches queued; `--ckpt_path last` continues the killed run's folder
        # SIGTERM during step `at`'s update: the step is finished, then checkpointed (interrupted-step=at+1)
        (PERIODIC, "sigterm update", 4, "interrupted"),
        # SIGTERM when step `at`'s rollout starts: it is abandoned, the checkpoint is step `at`'s start
        (LAG, "sigterm rollout", 3, "interrupted"),
        # the asynchronous schedule, killed mid-flight (groups in flight, completed groups queued)
        (ASYNC, "sigkill", 3, "last"),
        pytest.param(LORA, "sigkill", 4, "own folder", marks=pytest.mark.skipif(
            __import__("importlib").util.find_spec("peft") is None, reason="needs peft (the lora extra)")),
    ],
    ids=["periodic-warmup-sigkill", "lag-updates-2x2-sigkill-last", "periodic-sigterm-update", "lag-sigterm-rollout",
         "async-inflight-sigkill-last", "lora-warmup-sigkill"],
)
def test_killed_and_resumed_run_is_bitwise_the_straight_run(tmp_path, tmp_path_factory, setting, stop, at, resume):
    name, sync = setting
    ref_proc, ref_folder = reference(tmp_path_factory, setting)

    def log(version, folder=tmp_path):
        return (folder / f"{version}.log").read_text()[-4000:]

    if stop == "sigkill":
        marker = tmp_path / "paused"
        killed = start(tmp_path, "killed", *sync, "--trainer.callbacks+=conftest.PauseAtStep",
                       f"--trainer.callbacks.step={at}", f"--trainer.callbacks.marker={marker}")
        while not marker.exists() and killed.poll() is None:
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert killed.returncode == -signal.SIGKILL, log("killed")  # it was parked, not finished
        ckpt = run_dir(tmp_path, "killed") / "checkpoints" / f"step={at}.ckpt"
        resume_step = at
    else:
        where = stop.split()[1]
        killed = start(tmp_path, "killed", *sync, "--trainer.callbacks+=conftest.SigtermAt",
                       f"--trainer.callbacks.step={at}", f"--trainer.callbacks.where={where}")
        assert killed.wait() == 128 + signal.SIGTERM, log("killed")  # stopped early: a scheduler must see it
        resume_step = at + 1 if where == "update" else at  # the update is finished; the rollout abandoned
        ckpt = run_dir(tmp_path, "killed") / "checkpoints" / f"interrupted-step={resume_step}.ckpt"
        assert f"reclight fit: stopped by SIGTERM; checkpoint of step {resume_step}: " in log("killed")
        assert not (run_dir(tmp_path, "killed") / "checkpoints" / f"step={resume_step + 1}.ckpt").exists()
    assert ckpt.is_file(), log("killed")
    assert torch.load(ckpt, weights_only=True)["global_step"] == resume_step

    # "own folder": a new version, --ckpt_path <file>; otherwise the killed run's folder continues
    version = "resumed" if resume == "own folder" else "killed"
    resumed = start(tmp_path, "resumed", *sync, "--ckpt_path", "last" if resume == "last" else str(ckpt),
                    *(["--trainer.logger.init_args.version", version] if version == "killed" else []))
    assert resumed.wait() == 0, log("resumed")
    assert ref_proc.wait() == 0, log("reference", ref_folder)
    if resume == "last":
        assert f"--ckpt_path last: resuming from {ckpt} (step {at})" in log("resumed")
    for version_log in ("killed", "resumed"):  # issue #17, item 7: no noise a user cannot act on
        text = (tmp_path / f"{version_log}.log").read_text()
        assert "manual optimization" not in text and "LeafSpec" not in text and "not resumable" not in text
    if setting is PERIODIC:  # the warm-up ran once, and not again on resume
        assert "warm-up:" in log("reference", ref_folder) and "warm-up" not in log("resumed")

    final = f"step={MAX_STEPS}.ckpt"
    ref = torch.load(run_dir(ref_folder, "reference") / "checkpoints" / final, weights_only=True)
    res = torch.load(run_dir(tmp_path, version) / "checkpoints" / final, weights_only=True)
    assert ref["global_step"] == res["global_step"] == MAX_STEPS
    reference_state = "lora" if setting is LORA else "init_policy"  # LoRA: no frozen copy, the base hash
    assert {"rollouts", reference_state, "rng", "skip_guard", "run_config"} <= set(res["reclight"])
    if setting is LORA:  # the adapter only, in the weights and in the engine's state
        assert res["state_dict"] and all(".lora_" in k for k in res["state_dict"])
        assert "weights" not in res["reclight"]["rollouts"]["engine"]
        assert "LoRA base rebuilt by the warm-up" in log("resumed")
    rollout_state = {"engine", "clock", "batcher", "scored"} if setting is ASYNC else {"engine", "queue", "next_step",
                                                                                       "num_syncs"}
    assert len(res["lr_schedulers"]) == 1 and rollout_state <= set(res["reclight"]["rollouts"])
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "reclight"):
        assert_same(ref[key], res[key], key)
    # The run really trained: the weights moved away from the killed run's checkpoint.
    begin = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(begin[k], v) for k, v in res["state_dict"].items())

    # Logged metrics: the killed run's rows before the resumed step + the resumed run's rows must be
    # exactly the straight run's rows (CSV flushed every step, so the killed run's are on disk).
    # Resumed into the killed run's folder, that folder's metrics.csv alone must hold them all.
    ref_csv = run_dir(ref_folder, "reference") / "metrics.csv"
    ref_rows = metric_rows(ref_csv)
    if version == "resumed":
        joined = metric_rows(run_dir(tmp_path, "killed") / "metrics.csv", max_step=resume_step - 1)
        resumed_rows = metric_rows(run_dir(tmp_path, "resumed") / "metrics.csv")
        assert min(resumed_rows) == resume_step and not set(joined) & set(resumed_rows)
        joined.update(resumed_rows)
        assert metric_rows(run_dir(tmp_path, "killed") / "metrics.csv", warmup=True) == metric_rows(ref_csv, warmup=True)
        assert metric_rows(run_dir(tmp_path, "resumed") / "metrics.csv", warmup=True) == {}
    else:
        joined = metric_rows(run_dir(tmp_path, "killed") / "metrics.csv")
    assert sorted(joined) == sorted(ref_rows) == list(range(MAX_STEPS))
    for step in ref_rows:
        assert joined[step] == ref_rows[step], step
    assert bool(metric_rows(ref_csv, warmup=True)) == (setting in (PERIODIC, LORA))
    columns = set().union(*joined.values())
    assert {"reward/mean", "val/acc", "train/lr", "train/skipped_steps", "grad/norm", "kl/init"} <= columns
