"""A resume never silently restarts, trains something else, or loses logs (issue #17, item 1).

Through the real ``reclight fit`` entry point (in process): ``--ckpt_path last`` with
auto-versioned log folders continues the newest run (or fails naming where it looked); a change
of a setting that voids exactness is refused naming the field, the saved and the new value,
unless ``--allow_changes`` lists it; a checkpoint of another model size is a ``CheckpointError``
naming the tensors; a second live run into a folder in use is refused (and a SIGKILLed run's
lock does not stay stuck); a fresh run never overwrites a folder holding another run. The
bitwise equality of resumed runs, and their metric history, is ``test_resume.py``'s.

Issue #25: ``--ckpt_path best`` and ``--allow_changes`` naming no setting are refused; a full disk
during a checkpoint or the metrics, a read-only checkpoint or log folder, are errors naming the
file, the reason and the free space, and a rerun with ``--ckpt_path last`` after the disk is
freed ends bitwise where the straight run does (the errors are injected at the write:
``disk_helpers``).
"""

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from disk_helpers import disk_full_at, read_only
from reclight.trainer.checkpoint import CheckpointError, DiskWriteError
from reclight.trainer.cli import main
from reclight.trainer.resume import RunFolderInUse, RunLock, _rows_to_keep

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke_test.yaml"
CHECKPOINTS = ("trainer:\n  enable_checkpointing: true\n  callbacks:\n"
               "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
               "      init_args: {every_n_train_steps: 1, save_top_k: -1, filename: \"{step}\"}\n")


def fit_args(folder, *extra, steps=2):
    cfg = folder / "checkpoints.yaml"
    cfg.write_text(CHECKPOINTS)
    return ["fit", "--config", str(SMOKE), "--config", str(cfg), "--model.policy.tiny_dir", str(folder.parent / "tiny"),
            "--trainer.logger.init_args.save_dir", str(folder / "logs"), "--data.task", "conftest.DigitTask",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1", *extra]


def run_folder(folder, version=0):
    return folder / "logs" / "smoke" / f"version_{version}"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One finished 2-step run (version_0, checkpoints after steps 1 and 2); tests copy it."""
    folder = tmp_path_factory.mktemp("first")
    main(fit_args(folder))
    return folder


# The `run` fixture copies the first run's folder into each test's own: Lightning then notes that
# its best-k bookkeeping of the old folder is not reloaded, which is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:The dirpath has changed from")


@pytest.fixture
def run(first_run, tmp_path):
    import shutil

    shutil.copytree(first_run / "logs", tmp_path / "logs")
    (tmp_path.parent / "tiny").exists() or shutil.copytree(first_run.parent / "tiny", tmp_path.parent / "tiny")
    return tmp_path


def test_ckpt_path_last_continues_the_newest_run_folder(run, caplog):
    """Before: Lightning looked for `last` in the NEW run's folder (version_1), found nothing,
    warned once and trained from step 0."""
    caplog.set_level("INFO")
    cli = main(fit_args(run, "--ckpt_path", "last", steps=3))
    folder = run_folder(run)
    assert cli.trainer.global_step == 3 and not run_folder(run, 1).exists()  # no new folder, continued
    assert f"--ckpt_path last: resuming from {folder / 'checkpoints' / 'step=2.ckpt'} (step 2)" in caplog.text
    assert torch.load(folder / "checkpoints" / "step=3.ckpt", weights_only=True)["global_step"] == 3
    with open(folder / "metrics.csv") as f:  # the first run's rows are kept, the third step appended
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["reward/mean"]]
    assert steps == [0, 1, 2]


def test_ckpt_path_last_fails_naming_where_it_looked(run, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CheckpointError, match=r"--ckpt_path=last: no earlier run under '.*empty\d*/logs/smoke' \(no "
                                              r"version_\* folder\)"):
        main(fit_args(empty, "--ckpt_path", "last"))
    run_folder(run, 1).mkdir()  # a newer run that was stopped before its first checkpoint
    with pytest.raises(CheckpointError) as e:
        main(fit_args(run, "--ckpt_path", "last"))
    assert (f"--ckpt_path=last found no readable checkpoint (*.ckpt) in '{run_folder(run, 1) / 'checkpoints'}' (the "
            "newest run folder under") in str(e.value)
    assert "older runs there: version_0, resumable with --ckpt_path <file>" in str(e.value)


@pytest.mark.parametrize("change, expected", [
    (["--model.algorithm.preset", "grpo"], "model.algorithm.preset: the checkpoint has 'rec_oneside_nois', this run 'grpo'"),
    (["--model.policy.tiny.hidden_size", "64"], "model.policy.tiny.hidden_size: the checkpoint has 32, this run 64"),
    (["--seed_everything", "7"], "model.seed (the run seed; null takes seed_everything): the checkpoint has 0, this run 7"),
    (["--data.prompts_per_step", "2"], "data.prompts_per_step: the checkpoint has 4, this run 2"),
    (["--model.sync.sync_interval", "2"], "model.sync.sync_interval: the checkpoint has 1, this run 2"),
], ids=["algorithm", "model size", "seed_everything", "prompts_per_step", "sync"])
def test_a_setting_that_voids_exactness_is_refused(run, change, expected):
    """Before: LightningCLI overrode model.* with the checkpoint's hyper-parameters (grpo and the
    hidden size were silently ignored) and took seed_everything and data.* as given."""
    with pytest.raises(CheckpointError) as e:
        main(fit_args(run, "--ckpt_path", "last", *change, steps=3))
    msg = str(e.value)
    assert msg.startswith(f"--ckpt_path='{run_folder(run) / 'checkpoints' / 'step=2.ckpt'}': this run's settings "
                          "differ from the checkpoint's, which voids an exact resume: ")
    assert expected in msg and "accepted: the checkpoint's settings" in msg and "--allow_changes" in msg
    assert not (run_folder(run) / "checkpoints" / "step=3.ckpt").exists()


def test_allowed_changes_are_taken_and_model_sync_never(run):
    with pytest.warns(UserWarning, match=r"resuming with changed settings \(--allow_changes\): model.optim.lr: the "
                                         r"checkpoint has 0.001, this run 0.01"):
        cli = main(fit_args(run, "--ckpt_path", "last", "--model.optim.lr", "0.01", "--allow_changes",
                            "[model.optim.lr]", steps=3))
    assert cli.trainer.global_step == 3 and cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.01
    saved = torch.load(run_folder(run) / "checkpoints" / "step=3.ckpt", weights_only=True)
    assert saved["reclight"]["run_config"]["model.optim.lr"] == 0.01  # the record follows the run
    with pytest.raises(ValueError, match=r"--allow_changes=\['model.sync'\] is not valid: 'model.sync' covers "
                                         r"model.sync, which a resumed run cannot change"):
        main(fit_args(run, "--ckpt_path", "last", "--model.sync.sync_interval", "2", "--allow_changes", "[model.sync]"))


def test_a_checkpoint_of_another_model_size_names_the_tensors(run):
    """Before: torch's raw `Error(s) in loading state_dict` with 21 size-mismatch lines."""
    with pytest.raises(CheckpointError) as e, pytest.warns(UserWarning, match="resuming with changed settings"):
        main(fit_args(run, "--ckpt_path", "last", "--model.policy.tiny.hidden_size", "64",
                      "--allow_changes", "[model.policy]", steps=3))
    msg = str(e.value)
    assert msg.startswith(f"--ckpt_path='{run_folder(run) / 'checkpoints' / 'step=2.ckpt'}' is not valid for this model: "
                          "21 shape mismatches (policy.model.embed_tokens.weight: checkpoint [101, 32], this model "
                          "[101, 64]; ")
    assert msg.endswith("and 18 more); accepted: a checkpoint of the same model (model.policy: name_or_path or tiny "
                        "shape) as this run's")


def test_a_fresh_run_never_overwrites_a_folder_holding_a_run(run):
    with pytest.raises(ValueError, match=r"trainer.logger version='version_0' is not valid for this run: its folder "
                                         r"'.*version_0' holds another run \(metrics.csv, 2 checkpoint\(s\)\)"):
        main(fit_args(run, "--trainer.logger.init_args.version", "version_0"))


def test_a_second_live_run_in_a_folder_is_refused(run):
    """Before: two runs wrote the same folder at once (interleaved metrics.csv, step=N.ckpt and
    step=N-v1.ckpt). The folder lock is held here, as a live run holds it."""
    lock = RunLock([run_folder(run)]).acquire()
    try:
        with pytest.raises(RunFolderInUse) as e:
            main(fit_args(run, "--ckpt_path", "last", steps=3))
    finally:
        lock.release()
    assert f"folder '{run_folder(run)}' is in use by another live reclight run (pid and command: {os.getpid()} " in str(e.value)
    assert "accepted: a folder no live run writes" in str(e.value)


def test_a_sigkilled_runs_lock_does_not_stay_stuck(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from reclight.trainer.resume import RunLock
        RunLock([{str(tmp_path)!r}]).acquire()
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and "locked" in out
    assert RunLock.path(tmp_path).read_text().startswith(f"{proc.pid} ")  # the file is left behind...
    RunLock([tmp_path]).acquire().release()  # ...but not held: the kernel dropped the lock with the process


def test_fresh_runs_claim_distinct_versions(run):
    """Auto-versioned fresh runs take version_N by mkdir, so two started at once never share one."""
    from reclight.trainer.resume import _claim_next_version

    class Logger:
        _version = None

    a, b = Logger(), Logger()
    root = run / "logs" / "smoke"
    _claim_next_version(a, root)
    _claim_next_version(b, root)
    assert (a._version, b._version) == (1, 2) and (root / "version_2").is_dir()


def test_rows_past_the_checkpoint_are_superseded_and_kept_aside(tmp_path):
    """A run killed after logging steps 0-4 but checkpointed at step 3: the resumed run keeps rows
    0-2, the warm-up's (its own step axis) and the start-of-RL row; the old file is kept aside."""
    path = tmp_path / "metrics.csv"
    rows = [{"step": "0", "warmup/acc": "0.1", "reward/mean": ""}, {"step": "7", "warmup/acc": "0.5", "reward/mean": ""}]
    rows += [{"step": str(s), "warmup/acc": "", "reward/mean": str(s / 10)} for s in range(5)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "warmup/acc", "reward/mean"])
        w.writeheader()
        w.writerows(rows)
    kept = _rows_to_keep(path, resume_step=3)
    assert kept == [{"step": "0", "warmup/acc": "0.1"}, {"step": "7", "warmup/acc": "0.5"},
                    {"step": "0", "reward/mean": "0.0"}, {"step": "1", "reward/mean": "0.1"},
                    {"step": "2", "reward/mean": "0.2"}]
    assert not path.exists() and (tmp_path / "metrics.before-resume-at-step=3.csv").read_text().count("\n") == 8


# -- issue #25: resume arguments, a full disk, read-only folders --------------------------------------
@pytest.mark.parametrize("checkpoints", [True, False], ids=["checkpoint callback", "none"])
def test_ckpt_path_best_is_refused_for_fit(tmp_path, checkpoints):
    """Before: a raw FileNotFoundError: 'best' (the pre-resume check opened the word as a file)."""
    args = fit_args(tmp_path, "--ckpt_path", "best")
    if not checkpoints:  # without the ModelCheckpoint config
        i = args.index(str(tmp_path / "checkpoints.yaml"))
        del args[i - 1 : i + 1]
    with pytest.raises(CheckpointError, match=r"--ckpt_path='best' is not valid for fit: it is not a checkpoint to "
                                              r"resume \('best' is the checkpoint a monitoring ModelCheckpoint kept .*"
                                              r"accepted: a checkpoint file .*, or last"):
        main(args)
    assert not (tmp_path / "logs").exists()  # refused when parsed: no run folder, no model


def test_allow_changes_must_name_settings_of_the_run(run):
    """Before: a misspelt field allowed nothing, silently (and then the real change was refused
    without saying why the list did not cover it)."""
    with pytest.raises(ValueError) as e:
        main(fit_args(run, "--ckpt_path", "last", "--model.optim.lr", "0.01", "--allow_changes",
                      "[model.optim.lrr]", steps=3))
    msg = str(e.value)
    assert msg.startswith("--allow_changes=['model.optim.lrr'] is not valid; accepted: 'all', or settings of this "
                          "run's record and their groups (")
    assert "'model.optim.lrr' names none (closest: model.optim.lr" in msg
    assert not (run_folder(run) / "checkpoints" / "step=3.ckpt").exists()


def _tensors_equal(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_tensors_equal, a, b))
    return a == b


def test_full_disk_at_a_checkpoint_then_resume_after_freeing_it_is_exact(first_run, tmp_path, monkeypatch):
    """The disk fills while step 2's checkpoint is written (the second file a run saves): the run
    stops naming the file and the free space, step 1's checkpoint stays loadable, no partial file
    is left; with the disk freed, the same command with --ckpt_path last ends where the straight
    run ended, bitwise (weights and AdamW state)."""
    import shutil

    shutil.copytree(first_run.parent / "tiny", tmp_path / "tiny")
    folder = tmp_path / "run"
    folder.mkdir()
    full = disk_full_at(monkeypatch, 2)
    with pytest.raises(DiskWriteError) as e:
        main(fit_args(folder))
    ckpts = run_folder(folder) / "checkpoints"
    assert str(e.value).startswith(f"cannot write the checkpoint {str(ckpts / 'step=2.ckpt')!r}: no space left on the "
                                   "device (") and " free of " in str(e.value) and "--ckpt_path last" in str(e.value)
    assert len(full) == 2 and sorted(p.name for p in ckpts.iterdir()) == ["step=1.ckpt"]
    assert torch.load(ckpts / "step=1.ckpt", weights_only=True)["global_step"] == 1
    monkeypatch.undo()  # space freed
    cli = main(fit_args(folder, "--ckpt_path", "last"))
    assert cli.trainer.global_step == 2
    resumed = torch.load(ckpts / "step=2.ckpt", weights_only=True)
    straight = torch.load(run_folder(first_run) / "checkpoints" / "step=2.ckpt", weights_only=True)
    assert _tensors_equal(resumed["state_dict"], straight["state_dict"])
    assert _tensors_equal(resumed["optimizer_states"], straight["optimizer_states"])


def test_full_disk_while_writing_the_metrics_names_the_file(tmp_path, monkeypatch):
    """Before: a bare ENOSPC from Lightning's CSV writer, naming no file."""
    import errno

    from lightning.fabric.loggers.csv_logs import _ExperimentWriter

    real_save = _ExperimentWriter.save

    def save(self):
        real_save(self)  # the file is there; the next write does not fit
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_ExperimentWriter, "save", save)
    with pytest.raises(DiskWriteError) as e:
        main(fit_args(tmp_path, steps=1))
    metrics = run_folder(tmp_path) / "metrics.csv"
    assert str(e.value).startswith(f"cannot write the metrics {str(metrics)!r}: no space left on the device (")
    assert "metrics.csv may lack its last rows" in str(e.value)


@pytest.mark.parametrize("where", ["checkpoint folder", "log folder", "model folder"])
def test_read_only_folders_are_named_before_any_work(tmp_path, monkeypatch, request, where):
    """Before: a raw OSError (for the checkpoint folder, on its lock file .ck.reclight.lock). The
    embedded model's folder is not written by a reclight helper: the CLI's last resort names it."""
    ro = tmp_path / "ro"
    read_only(ro, monkeypatch, request)
    if where == "checkpoint folder":
        extra = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 f"--trainer.callbacks.dirpath={ro / 'ck'}"]
        expected = (f"cannot write the run lock {str(ro / '.ck.reclight.lock')!r}: permission denied (the folder is "
                    f"not writable by this user) in {str(ro)!r}; nothing was written yet; make {str(ro)!r} writable, "
                    "or write to another folder (trainer.logger.init_args.save_dir or a ModelCheckpoint dirpath)")
    elif where == "log folder":
        extra = ["--trainer.logger.init_args.save_dir", str(ro)]
        expected = (f"cannot write the run folder under {str(ro / 'smoke')!r}: permission denied (the folder is not "
                    f"writable by this user) in {str(ro)!r}")
    else:
        extra = ["--model.policy.tiny_dir", str(ro / "tiny")]
        expected = f"cannot write {str(ro / 'tiny')!r}: permission denied"
    with pytest.raises(DiskWriteError) as e:
        main(fit_args(tmp_path, *extra))
    assert str(e.value).startswith(expected), str(e.value)
    assert f"permission denied (the folder is not writable by this user) in {str(ro)!r}" in str(e.value)
