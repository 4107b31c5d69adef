"""Checkpoint files: atomic, durable saves and a clear error for a file that cannot resume a run.

Why not Lightning's default ``TorchCheckpointIO`` (2.6): its ``_atomic_save`` serialises the
whole checkpoint into memory, writes it to ``tempfile.mkstemp()`` in the SYSTEM temp folder
and commits with ``shutil.move``. That is atomic only when the temp folder and the checkpoint
folder share a file system (``os.rename``). When they do not (``/tmp`` on tmpfs or a local
disk, checkpoints on a network or scratch mount, common on clusters), ``shutil.move`` falls back
to copy-then-delete, and a kill during the copy leaves a half-written file under the final
name. It never calls ``fsync`` either, so a node crash can leave a renamed but empty file, and
every killed save leaves a checkpoint-sized orphan in the temp folder.

:class:`AtomicCheckpointIO` instead streams ``torch.save`` into a hidden temp file in the SAME
folder as the target, ``fsync``s it, ``os.replace``s it over the target (atomic on POSIX and
Windows within one file system) and ``fsync``s the folder so the rename itself is durable. A
kill at any point leaves either the previous file or the new one under the final name, never a
mix; the only debris is a ``.<name>.tmp-*`` file in the checkpoint folder (safe to delete).
Remote URLs (``s3://`` ...) go to Lightning's default path unchanged.

A write that the disk refuses (full, over quota, read-only, not writable by this user) becomes
a :class:`DiskWriteError` naming the file, the reason, the free space of its file system and
what to do (:func:`writing`, the one place that turns those errors into a message): before,
a full disk ended in torch's "enforce fail at inline_container.cc" (the ``OSError`` lost inside
torch's zip writer) or a raw ``ENOSPC``, a read-only folder in a raw ``OSError``. The
checkpoint files already there stay intact (the partial temp file is removed), so after
freeing space the same command with ``--ckpt_path last`` resumes exactly. The trainer's other
writes (the metrics, the run lock, the run folder, the CLI's last resort for the rest) go
through :func:`writing` too.

:func:`validate_checkpoint` (and ``AtomicCheckpointIO.load_checkpoint``, which every
``--ckpt_path`` load goes through) turns a missing, truncated, non-checkpoint or foreign file
into a :class:`CheckpointError` that names the path, what is wrong, and what is accepted.

:func:`rng_state` / :func:`set_rng_state`: every global RNG (torch CPU and CUDA, Python's
``random``, NumPy's legacy global one), as plain tensors and tuples the safe loader accepts,
for a bitwise-exact resume.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

# What a checkpoint needs to continue a reclight run exactly (written by Lightning and RLModule).
REQUIRED_TOP_LEVEL = ("state_dict", "optimizer_states", "loops", "reclight")
ACCEPTED = (
    "a checkpoint written by `reclight fit` (a Lightning .ckpt of reclight.trainer.module.RLModule holding "
    "'state_dict', 'optimizer_states', 'loops' and the 'reclight' section with the rollout queue and engine)"
)


CHECKPOINT_FOLDER_SETTING = "a ModelCheckpoint dirpath, or trainer.logger.init_args.save_dir"
"""The options that choose where a run's checkpoints go (named in a disk error's advice)."""


class CheckpointError(ValueError):
    """A file given as a checkpoint cannot be used to resume a reclight run."""


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def _fsync_dir(folder: str) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- writes the disk refuses -------------------------------------------------------------------
class DiskWriteError(OSError):
    """A file of the run could not be written: the disk is full or over quota, or the folder is
    read-only or not writable by this user. The message names the file, the reason, the free
    space and what to do; ``errno`` is the system's (None where torch's writer hid it)."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.errno = code


DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}
NOT_WRITABLE = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied (the folder is not "
                "writable by this user)", errno.EPERM: "operation not permitted (the folder is not writable)"}
RERUN = ("then rerun the same command (with --ckpt_path last where a checkpoint was written: the run continues from it "
         "exactly)")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable


def free_space(path: str | os.PathLike) -> str:
    """``'<free> free of <total>'`` on the file system holding ``path`` (its nearest existing
    folder), or ``'free space unknown'``."""
    probe = os.path.abspath(os.fspath(path))
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return "free space unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def _system_error(e: BaseException) -> OSError | None:
    """The ``OSError`` behind ``e``: itself, or the one torch's zip writer swallowed (its
    ``RuntimeError`` "enforce fail at inline_container.cc" keeps it as the context)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_error(path: str | os.PathLike | None, what: str, e: BaseException, setting: str = "",
                note: str = "the checkpoints already written are intact") -> DiskWriteError | None:
    """The :class:`DiskWriteError` for ``e``, raised while writing ``what`` (``"the checkpoint"``)
    at ``path`` (None: the file the system names), or None if ``e`` is not a write the disk
    refused (or names no file). ``setting`` names the option that
    chooses the folder (``"trainer.logger.init_args.save_dir"``), for the advice; ``note`` says
    what was kept."""
    system = _system_error(e)
    code = system.errno if system is not None else None
    torch_writer = isinstance(e, RuntimeError) and ("inline_container" in str(e) or "file write failed" in str(e))
    if code not in DISK_FULL and code not in NOT_WRITABLE and not (torch_writer and system is None):
        return None
    named = path if path is not None else getattr(system, "filename", None)
    if named is None:
        return None
    target = os.path.abspath(os.fspath(named))
    folder = target if os.path.isdir(target) else os.path.dirname(target)
    elsewhere = f"another folder ({setting})" if setting else "another folder"
    if code in NOT_WRITABLE:
        reason = f"{NOT_WRITABLE[code]} in {folder!r}"
        fix = f"make {folder!r} writable, or write to {elsewhere}"
    else:
        reason = DISK_FULL.get(code) or (f"torch's writer failed ({str(e).strip().splitlines()[0][:120]}), usually "
                                         "because the disk is full")
        reason += f" ({free_space(folder)} on that file system now)"
        fix = f"free space on that disk, or write to {elsewhere} on another disk"
    # Where the file was not named by the caller, a permission error may come from a read: say "open".
    verb = "open" if path is None and code in (errno.EACCES, errno.EPERM) and os.path.exists(target) else "write"
    what = f"{what} " if what else ""
    return DiskWriteError(f"cannot {verb} {what}{target!r}: {reason}; {note}; {fix}, {RERUN}", code)


@contextlib.contextmanager
def writing(path: str | os.PathLike | None, what: str, setting: str = "",
            note: str = "the checkpoints already written are intact") -> Iterator[None]:
    """Turn a write the disk refuses inside the block into a :class:`DiskWriteError` naming
    ``path`` (None: the file the system names), the reason, the free space and what to do
    (:func:`write_error`); any other error passes unchanged."""
    try:
        yield
    except DiskWriteError:
        raise
    except (OSError, RuntimeError) as e:
        err = write_error(path, what, e, setting, note)
        if err is None:
            raise
        raise err from e


def atomic_torch_save(obj: Any, path: str | os.PathLike, setting: str = "") -> None:
    """``torch.save(obj, path)`` such that ``path`` always holds either its previous content or
    the complete new content, even if the process is killed at any point (see module doc). A
    write the disk refuses raises :class:`DiskWriteError` (``setting``: the option that chooses
    the folder, for its advice)."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    with writing(path, "the checkpoint", setting, "the checkpoints already there are intact (each is replaced "
                 "atomically; the partial file was removed)"):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)  # streamed: no second in-memory copy of the checkpoint
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; match what a plain open() would make
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    _fsync_dir(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin: atomic + durable local saves, validated loads.

    Use it with ``trainer.plugins`` (the ``reclight`` CLI adds it by default).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or _is_remote(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path, CHECKPOINT_FOLDER_SETTING)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if _is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        check_checkpoint_file(path)
        try:
            ckpt = torch.load(
                path, map_location=map_location if map_location is not None else "cpu",
                weights_only=True if weights_only is None else weights_only,
            )
        except Exception as e:  # noqa: BLE001 - re-raised with the path and what is accepted
            raise _load_error(path, e) from e
        check_checkpoint_contents(ckpt, path)
        return ckpt


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Cheap checks of the file itself (exists, is a complete torch zip archive)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--ckpt_path={str(path)!r} is not valid: no such file; accepted: {ACCEPTED}")
    if p.is_dir():
        raise CheckpointError(
            f"--ckpt_path={str(path)!r} is not valid: it is a directory (sharded/distributed checkpoints are "
            f"not supported); accepted: {ACCEPTED}"
        )
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"--ckpt_path={str(path)!r} is not valid: the file is empty (0 bytes); accepted: {ACCEPTED}")
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as f:
            head = f.read(4)
        what = (
            f"the file is truncated ({size} bytes, the zip archive's central directory at its end is missing)"
            if head == b"PK\x03\x04"
            else f"it is not a torch checkpoint (not a zip archive; first bytes {head!r})"
        )
        raise CheckpointError(f"--ckpt_path={str(path)!r} is not valid: {what}; accepted: {ACCEPTED}")
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"--ckpt_path={str(path)!r} is not valid: the zip archive is damaged ({e}); accepted: {ACCEPTED}"
        ) from e
    if not any(n.endswith("/data.pkl") for n in names):
        raise CheckpointError(
            f"--ckpt_path={str(path)!r} is not valid: it is a zip archive but not a torch checkpoint (no data.pkl "
            f"among {names[:5]}); accepted: {ACCEPTED}"
        )


def _load_error(path: Any, e: Exception) -> CheckpointError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        what = f"it holds Python objects that a checkpoint never needs (refused by the safe loader: {msg})"
    else:
        what = f"torch.load failed ({type(e).__name__}: {msg}); the file is damaged or truncated"
    return CheckpointError(f"--ckpt_path={str(path)!r} is not valid: {what}; accepted: {ACCEPTED}")


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        if keys and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"a plain state dict of {len(keys)} tensors (e.g. {keys[0]!r}), not a training checkpoint"
        return f"a dict with keys {[str(k) for k in keys[:8]]}"
    return f"a {type(obj).__name__}"


def check_checkpoint_contents(ckpt: Any, path: str | os.PathLike) -> None:
    """Whether a loaded object is a reclight training checkpoint (see ``ACCEPTED``)."""
    where = f"--ckpt_path={str(path)!r} is not valid"
    if not isinstance(ckpt, Mapping) or "pytorch-lightning_version" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{where}: it is {_describe(ckpt)}, not a Lightning checkpoint; accepted: {ACCEPTED}")
    missing = [k for k in REQUIRED_TOP_LEVEL if k not in ckpt]
    if "reclight" in missing:
        owner = ckpt.get("hparams_name") or "unknown"
        keys = list(ckpt["state_dict"])[:3]
        raise CheckpointError(
            f"{where}: it is a Lightning checkpoint of another module (no 'reclight' section; hparams_name="
            f"{owner!r}, state_dict keys {keys}); accepted: {ACCEPTED}"
        )
    if missing:
        hint = " (a weights-only checkpoint cannot resume training exactly)" if "optimizer_states" in missing else ""
        raise CheckpointError(f"{where}: it lacks the sections {missing}{hint}; accepted: {ACCEPTED}")
    if "rollouts" not in ckpt["reclight"]:
        raise CheckpointError(
            f"{where}: its 'reclight' section has no 'rollouts' state (the engine, the queued rollouts and the "
            f"sync phase; a checkpoint of reclight before the rollout queue was one class keeps them elsewhere); "
            f"accepted: {ACCEPTED}"
        )


def check_state_dict_matches(saved: Mapping[str, Any], expected: Mapping[str, Any], path: Any) -> None:
    """The checkpoint's ``state_dict`` must have this model's tensors with this model's shapes
    (a checkpoint of another model size fails here, named, instead of torch's raw list of
    size-mismatch lines)."""
    shape = lambda t: list(getattr(t, "shape", []))  # noqa: E731
    mismatched = [f"{k}: checkpoint {shape(saved[k])}, this model {shape(v)}" for k, v in expected.items()
                  if k in saved and shape(saved[k]) != shape(v)]
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if not (mismatched or missing or unexpected):
        return
    parts = []
    for what, items in (("shape mismatches", mismatched), ("tensors missing from the checkpoint", missing),
                        ("tensors this model does not have", unexpected)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{len(items)} {what} ({'; '.join(items[:3])}{more})")
    raise CheckpointError(
        f"--ckpt_path={str(path)!r} is not valid for this model: " + ", ".join(parts) + "; accepted: a checkpoint "
        "of the same model (model.policy: name_or_path or tiny shape) as this run's"
    )


def validate_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` can resume a reclight run. Loads lazily
    (``mmap``) with the safe loader, so it is cheap even for a large checkpoint."""
    if _is_remote(path):
        return
    check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise _load_error(path, e) from e
    check_checkpoint_contents(ckpt, path)


# -- RNG state ----------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """All global RNG states of this process (the ones a checkpoint must carry)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (entries absent from ``state`` are left alone)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))
