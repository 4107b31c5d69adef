"""Checkpoint files (issue #5, items 2 and 3 "Checkpoints").

Atomicity: a subprocess saves checkpoint A, then starts saving B over the same path
and is SIGKILLed at a controlled point of that save (half the bytes written; all bytes written and
fsynced but not renamed; renamed but the folder not yet fsynced). The path must then load and
hold exactly A, A and B. The kill point is fixed by patching, so the test is not timing-based.

Validation: every kind of bad ``--ckpt_path`` file gets a ``CheckpointError`` naming the path,
what is wrong and what is accepted.

Disk errors (issue #25): a full disk during the write and a read-only folder are a
``DiskWriteError`` naming the file, the reason, the free space and what to do, the old file kept
(``disk_helpers``: the error injected at the write; through ``reclight fit`` and a resume after
it: ``test_resume_safety.py``).
"""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from disk_helpers import disk_full_at, read_only
from reclight.trainer.checkpoint import (
    ACCEPTED,
    AtomicCheckpointIO,
    CheckpointError,
    DiskWriteError,
    atomic_torch_save,
    validate_checkpoint,
    write_error,
)

KILL_SCRIPT = textwrap.dedent(
    """
    import io, os, signal, sys
    import torch
    from reclight.trainer import checkpoint as C

    path, point = sys.argv[1], sys.argv[2]
    io_plugin = C.AtomicCheckpointIO()
    io_plugin.save_checkpoint({"name": "A", "w": torch.full((50_000,), 1.0)}, path)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid_write":  # the new file holds half its bytes when the process dies
        real_save = torch.save
        def half_then_die(obj, f):
            buf = io.BytesIO()
            real_save(obj, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            die()
        torch.save = half_then_die
    elif point == "before_replace":  # complete and fsynced, not yet renamed
        os.replace = die
    elif point == "after_replace":  # renamed, folder not yet fsynced
        C._fsync_dir = die
    io_plugin.save_checkpoint({"name": "B", "w": torch.full((50_000,), 2.0)}, path)
    print("not killed")
    """
)


@pytest.mark.parametrize("point, expected", [("mid_write", "A"), ("before_replace", "A"), ("after_replace", "B")])
def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path, point, expected):
    # A subprocess, not os.fork(): the test process has threads, and a forked child deadlocked.
    path = tmp_path / "ckpts" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(path), point], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    ckpt = torch.load(path, weights_only=True)
    fill = {"A": 1.0, "B": 2.0}[expected]
    assert ckpt["name"] == expected and torch.equal(ckpt["w"], torch.full((50_000,), fill))
    # The only debris is a hidden temp file beside the target (none once the rename happened).
    debris = sorted(p.name for p in path.parent.iterdir() if p.name != "last.ckpt")
    assert all(name.startswith(".last.ckpt.tmp-") for name in debris)
    assert len(debris) == (0 if point == "after_replace" else 1)


def test_atomic_save_round_trip_and_failed_save_cleans_up(tmp_path):
    path = tmp_path / "x.ckpt"
    atomic_torch_save({"a": torch.arange(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"a": Unpicklable()}, path)
    assert sorted(os.listdir(tmp_path)) == ["x.ckpt"]  # old file kept, temp file removed
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))


def test_full_disk_during_a_save_names_the_file_and_the_free_space_and_keeps_the_old_one(tmp_path, monkeypatch):
    """Before: torch's "enforce fail at inline_container.cc ... unexpected pos" (the ENOSPC lost
    inside its zip writer), naming neither the file nor the disk."""
    path = tmp_path / "step=1.ckpt"
    atomic_torch_save({"a": torch.arange(3)}, path)
    disk_full_at(monkeypatch, 1)
    with pytest.raises(DiskWriteError) as e:
        AtomicCheckpointIO().save_checkpoint({"a": torch.zeros(100_000)}, path)
    msg = str(e.value)
    assert msg.startswith(f"cannot write the checkpoint {str(path)!r}: no space left on the device (")
    assert " free of " in msg and "on that file system now); the checkpoints already there are intact" in msg
    assert "ModelCheckpoint dirpath" in msg and "--ckpt_path last" in msg and e.value.errno == errno.ENOSPC
    assert "inline_container" in str(e.value.__cause__)  # what torch raised, kept as the cause
    assert sorted(os.listdir(tmp_path)) == ["step=1.ckpt"]  # no partial temp file
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))


def test_read_only_checkpoint_folder_is_named(tmp_path, monkeypatch, request):
    folder = tmp_path / "ro"
    read_only(folder, monkeypatch, request)
    with pytest.raises(DiskWriteError) as e:
        atomic_torch_save({"a": torch.arange(3)}, folder / "x.ckpt")
    assert str(e.value).startswith(f"cannot write the checkpoint {str(folder / 'x.ckpt')!r}: permission denied (the "
                                   f"folder is not writable by this user) in {str(folder)!r};")
    assert f"make {str(folder)!r} writable, or write to another folder" in str(e.value)


def test_write_error_leaves_other_errors_alone(tmp_path):
    assert write_error(tmp_path, "x", OSError(errno.ENOENT, "no such file")) is None
    assert write_error(tmp_path, "x", RuntimeError("cannot pickle")) is None
    ro = write_error(None, "", OSError(errno.EROFS, "Read-only file system", str(tmp_path / "f")))
    assert str(ro).startswith(f"cannot write {str(tmp_path / 'f')!r}: the file system is read-only in "
                              f"{str(tmp_path)!r}")


# -- validation -------------------------------------------------------------------------------
def reclight_like(**drop):
    """The top-level shape of a reclight checkpoint (the real one is checked by test_resume)."""
    ckpt = {
        "pytorch-lightning_version": "2.6.6",
        "epoch": 0,
        "global_step": 3,
        "state_dict": {"policy.lm_head.weight": torch.zeros(2, 2)},
        "optimizer_states": [{}],
        "loops": {},
        "callbacks": {},
        "hparams_name": "kwargs",
        "reclight": {"rollouts": {}},
    }
    for k in drop:
        ckpt.pop(k)
    return ckpt


def assert_error(path, *parts):
    with pytest.raises(CheckpointError) as e:
        validate_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"--ckpt_path={str(path)!r} is not valid: "), msg
    assert msg.endswith(f"; accepted: {ACCEPTED}"), msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


def test_valid_shape_passes(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save(reclight_like(), path)
    validate_checkpoint(path)  # no error
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 3


def test_missing_directory_and_empty(tmp_path):
    assert_error(tmp_path / "nope.ckpt", "no such file")
    assert_error(tmp_path, "it is a directory")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert_error(tmp_path / "empty.ckpt", "the file is empty (0 bytes)")


def test_truncated_checkpoint(tmp_path):
    """What a plain (non-atomic) torch.save killed half-way leaves behind."""
    full, cut = tmp_path / "full.ckpt", tmp_path / "cut.ckpt"
    torch.save(reclight_like(), full)
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert_error(cut, f"the file is truncated ({len(data) // 2} bytes")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    assert_error(text, "it is not a torch checkpoint (not a zip archive; first bytes b'hell')")
    z = tmp_path / "archive.ckpt"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("readme.txt", "x")
    assert_error(z, "it is a zip archive but not a torch checkpoint")


def test_plain_state_dict(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 3).state_dict(), path)
    assert_error(path, "a plain state dict of 2 tensors (e.g. 'weight'), not a training checkpoint",
                 "not a Lightning checkpoint")


def test_arbitrary_pickle_is_refused_by_the_safe_loader(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": ValueError("x")}, path)
    assert_error(path, "it holds Python objects that a checkpoint never needs")


def test_foreign_lightning_checkpoint(tmp_path):
    """A real Lightning checkpoint of another LightningModule."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    path = tmp_path / "boring.ckpt"
    trainer.save_checkpoint(path)
    assert_error(path, "it is a Lightning checkpoint of another module (no 'reclight' section",
                 "'layer.weight'")


def test_weights_only_reclight_checkpoint(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save(reclight_like(optimizer_states=1, loops=1), path)
    assert_error(path, "it lacks the sections ['optimizer_states', 'loops']",
                 "a weights-only checkpoint cannot resume training exactly")


def test_missing_rollout_queue_state(tmp_path):
    path = tmp_path / "noqueue.ckpt"
    ckpt = reclight_like()
    ckpt["reclight"] = {"engine": {}}  # the layout before the rollout queue owned the engine
    torch.save(ckpt, path)
    assert_error(path, "its 'reclight' section has no 'rollouts' state")


def test_load_checkpoint_validates_too(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_the_cli_writes_checkpoints_through_the_atomic_plugin(tmp_path):
    from pathlib import Path

    from reclight.trainer.cli import main

    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke_test.yaml"
    cli = main(["--config", str(smoke), "--trainer.logger", "false", "--model.policy.tiny_dir", str(tmp_path / "tiny")],
               run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
