"""Resuming a run: what it depends on, where its last checkpoint is, and its run folder.

``reclight fit --ckpt_path <file> | last`` continues a run exactly (``docs/reliability.md``).
Four things here keep a resume from silently doing something else:

- **The run record** (:func:`run_record`): every setting that changes what is trained on (the
  model groups but the guards, the monitor, the warm-up and cache folders; the data but the
  evaluation sizes; the effective seeds; precision and world size) is stored flat in the
  checkpoint (``reclight.run_config``). On resume a difference is refused, naming the field, the
  saved value and the new one (:func:`check_resume_config`), unless ``--allow_changes`` lists it
  (then it is taken, with a warning: the run is no longer the straight one). Why not
  LightningCLI's default: it reads ``hyper_parameters`` from the checkpoint and overrides the
  parsed ``model.*`` with them, so ``--model.algorithm grpo`` silently ran the saved preset,
  while ``data.*`` and ``seed_everything`` were taken as given and silently voided exactness.
  ``reclight fit`` parses the config as given and compares instead. ``trainer.max_steps`` may
  change (extending a run is the common resume).
- **The last checkpoint** (:func:`find_last_checkpoint`): ``--ckpt_path last`` is the newest
  run folder's checkpoint with the highest ``global_step`` (an interrupted-run checkpoint
  included). Lightning looked only in the NEW run's folder, found nothing, warned once and
  trained from step 0.
- **The run folder** (:func:`plan_run_folder`): a resumed run logs into the folder of its
  checkpoint (``<save_dir>/<name>/<version>/checkpoints/x.ckpt``), unless a logger version is
  given; a fresh run with an explicit version never reuses a folder that holds a run's logs or
  checkpoints; a fresh auto-versioned run claims its ``version_N`` folder atomically (``mkdir``),
  so two runs started at once get two folders.
- **The metric history** (:func:`start_loggers`): Lightning's CSV logger deletes an existing
  ``metrics.csv`` when it starts; for a resumed run the rows before the resumed step (and the
  warm-up's) are written back first, so the folder holds the run's whole history. Rows the
  killed run logged past its checkpoint are superseded by the resumed run's (the old file is
  kept as ``metrics.before-resume-at-step=N.csv`` then).
- **One live run per folder** (:class:`RunLock`): ``flock`` on ``.<folder>.reclight.lock``
  beside the folder (so the folder holds only the run's files), held while the run lives and released by the kernel when the process dies, even by SIGKILL, so
  it can never stay stuck; a second run into a live run's folder is refused naming its pid.
- **The resume arguments** (:func:`check_resume_arguments`, :func:`check_allowed_names`): ``fit
  --ckpt_path`` is a file or ``last`` (``best`` was opened as a file named 'best'); ``--allow_changes``
  needs a ``--ckpt_path`` and names settings of the run record (a misspelt one allowed nothing).

The run folder, the lock and the metrics are written through
:func:`reclight.trainer.checkpoint.writing`: a full disk or a read-only folder is an error naming
the file, the reason, the free space and what to do.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import inspect
import numbers
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from reclight.checks import invalid, run_seed
from reclight.trainer.checkpoint import CheckpointError, writing

RECORD_KEY = "run_config"
FREE_PREFIXES = (
    "model.guards", "model.monitor", "model.warmup", "model.policy.tiny_dir",
    "model.engine.vllm.gpu_memory_utilization", "model.engine.vllm.enforce_eager",
    "data.eval_size", "data.eval_batch_size", "model.rollout",
)
"""Settings that do not change what is trained on: they may differ on resume (stop rules,
metrics, the warm-up (not re-run on resume), a cache folder, GPU memory, the evaluation's size,
where the rollouts run: paced rollout workers give the in-process run's batches bitwise)."""
INFO_PREFIX = "resolved."
"""Record entries that say what the defaults resolved to on the machine that ran (precision and why,
the engine's name and dtype): stored for the reader, never compared on resume."""
NEVER_ALLOWED = ("model.sync", "model.clock")
"""The queued rollouts and the engine follow the saved schedule: it cannot change on resume."""
LOG_FOLDER_SETTING = "trainer.logger.init_args.save_dir"
"""The option that chooses where a run's logs go (named in a disk error's advice)."""
METRICS_NOTE = ("the checkpoints already written are intact; metrics.csv may lack its last rows (a resume writes the "
                "rows before its step back and logs the rest again)")
NOTES = {
    "model.seed": " (the run seed; null takes seed_everything)",
    "data.seed": " (the prompt order; null takes seed_everything)",
    "trainer.world_size": " (trainer.devices x trainer.num_nodes)",
}


# -- the run record -------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not str(k).startswith("_"):  # LightningCLI's "_instantiator"
                _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = _plain(value)


def _init_args(obj: Any) -> list[str]:
    return [n for n in inspect.signature(type(obj).__init__).parameters if n != "self"]


def run_record(module: Any, datamodule: Any, trainer: Any) -> dict[str, Any]:
    """``{dotted setting: plain value}`` of everything a run's training depends on (module doc).
    Works for the CLI (hyper-parameters as dicts) and in-process runs (dataclasses alike)."""
    out: dict[str, Any] = {}
    hp = module.hparams
    for name in _init_args(module):
        if name in hp:
            _flatten(f"model.{name}", hp[name], out)
    for f in dataclasses.fields(module.algo):  # the algorithm as resolved (preset + fields), every field
        out[f"model.algorithm.{f.name}"] = _plain(getattr(module.algo, f.name))
    out["model.seed"] = int(module.run_seed)
    if datamodule is not None:
        for name in _init_args(datamodule):
            if name == "task":
                task = datamodule.task
                out["data.task"] = f"{type(task).__module__}.{type(task).__qualname__}"
                for k, v in sorted(vars(task).items()):
                    if not k.startswith("_") and (v is None or isinstance(v, (str, numbers.Number, list, tuple))):
                        out[f"data.task.{k}"] = _plain(v)
            elif hasattr(datamodule, name):
                out[f"data.{name}"] = _plain(getattr(datamodule, name))
        if getattr(datamodule, "seed", 0) is None:
            out["data.seed"] = run_seed(None)
    if trainer is not None:
        out["trainer.precision"] = str(trainer.precision)
        out["trainer.world_size"] = int(trainer.world_size)
    # What the defaults resolved to on this machine, and why (informational: not compared).
    out["resolved.precision_reason"] = str(getattr(module, "precision_reason", ""))
    for k, v in (getattr(module, "engine_resolved", None) or {}).items():
        out[f"resolved.engine.{k}"] = _plain(v)
    return {k: v for k, v in out.items() if not k.startswith(FREE_PREFIXES)}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(p in ("all", key) or key.startswith(p + ".") for p in patterns)


def check_resume_config(saved: Mapping[str, Any] | None, current: Mapping[str, Any], allowed: Sequence[str],
                        path: str | os.PathLike) -> list[str]:
    """Refuse a resume whose settings differ from the checkpoint's (each difference named, with
    both values) unless ``allowed`` lists it (``--allow_changes``); returns the allowed changes.
    A key only one side has (a checkpoint of another reclight version) is not compared."""
    for p in allowed:
        if _matches("model.sync", [p]) or p.startswith(NEVER_ALLOWED):
            raise ValueError(f"--allow_changes={list(allowed)!r} is not valid: {p!r} covers model.sync, which a resumed "
                             "run cannot change (the queued rollouts and the engine follow the saved schedule); "
                             "accepted: other fields or groups, e.g. [model.optim.lr, data.prompts_per_step]")
    check_allowed_names(allowed, [*current, *(saved or {})])
    if saved is None:
        rank_zero_warn(f"--ckpt_path={str(path)!r} holds no record of its run's settings (written by an older reclight): "
                       "they are not compared with this run's")
        return []
    changes = [(k, saved[k], current[k]) for k in sorted(set(saved) & set(current))
               if saved[k] != current[k] and not k.startswith(INFO_PREFIX)]
    text = [f"{k}{NOTES.get(k, '')}: the checkpoint has {a!r}, this run {b!r}" for k, a, b in changes]
    refused = [t for (k, _, _), t in zip(changes, text) if not _matches(k, allowed)]
    if refused:
        raise CheckpointError(
            f"--ckpt_path={str(path)!r}: this run's settings differ from the checkpoint's, which voids an exact resume: "
            + "; ".join(refused) + "; accepted: the checkpoint's settings (pass the run's config again), or "
            "--allow_changes '[<field>, ...]' to continue with the new values knowingly (the run then differs "
            "from a straight one; a group name allows its fields, 'all' every field but model.sync)"
        )
    if text:
        rank_zero_warn("resuming with changed settings (--allow_changes): " + "; ".join(text))
    return [k for k, _, _ in changes]


def _groups(keys: Iterable[str]) -> set[str]:
    """Every dotted prefix of ``keys`` (``model.optim.lr`` -> ``model``, ``model.optim``)."""
    return {k.rsplit(".", n)[0] for k in keys for n in range(1, k.count(".") + 1)}


def check_allowed_names(allowed: Sequence[str], record_keys: Iterable[str]) -> None:
    """Every ``--allow_changes`` entry must name a setting of the run record, a group of them
    (``model.optim``), a setting that may change anyway (``model.guards...``: accepted, nothing to
    allow) or ``all``; a misspelt one (``model.bogus_field``) used to allow nothing, silently."""
    keys = {k for k in record_keys if not k.startswith(INFO_PREFIX)}
    known = keys | _groups(keys) | set(FREE_PREFIXES) | _groups(FREE_PREFIXES) | {"all"}
    for p in allowed:
        if p in known or p.startswith(tuple(f + "." for f in FREE_PREFIXES)):
            continue
        close = difflib.get_close_matches(p, sorted(known), n=3, cutoff=0.6)
        hint = f" (closest: {', '.join(close)})" if close else ""
        groups = ", ".join(sorted(g for g in _groups(keys) if g.count(".") <= 1))
        raise invalid("--allow_changes", list(allowed),
                      f"'all', or settings of this run's record and their groups ({groups}, or a field such as "
                      f"model.optim.lr); {p!r} names none{hint}. Not compared, so never needed: trainer.* but "
                      "trainer.precision and the world size, " + ", ".join(FREE_PREFIXES))


def check_resume_arguments(ckpt_path: str | None, allowed: Sequence[str]) -> None:
    """``fit``'s resume arguments, right after parsing: ``--ckpt_path`` is a file or ``last``
    (Lightning's other words are not a checkpoint to resume: ``best`` was opened as a file named
    'best'), and ``--allow_changes`` comes with a ``--ckpt_path`` (alone it allowed nothing,
    silently)."""
    registry = isinstance(ckpt_path, str) and (ckpt_path == "registry" or ckpt_path.startswith("registry:"))
    if ckpt_path in ("best", "hpc") or registry:
        what = {"best": "'best' is the checkpoint a monitoring ModelCheckpoint kept during a fit in the same process, "
                        "for validate / test after it",
                "hpc": "'hpc' is Lightning's SLURM requeue checkpoint, which reclight does not write (SIGTERM "
                       "writes interrupted-step=N.ckpt, which last finds)"}.get(
            ckpt_path, "a model-registry download holds no run record to resume exactly")
        raise CheckpointError(f"--ckpt_path={ckpt_path!r} is not valid for fit: it is not a checkpoint to resume "
                              f"({what}); accepted: a checkpoint file (e.g. <run folder>/checkpoints/step=400.ckpt), "
                              "or last (the newest checkpoint of the newest run folder)")
    if allowed and ckpt_path is None:
        raise invalid("--allow_changes", list(allowed), "nothing without --ckpt_path: it lists the settings a resumed "
                      "run may change, and this run resumes nothing (add --ckpt_path <file> | last, or drop it)")


# -- the last checkpoint ----------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int | None:
    """``global_step`` of a checkpoint file (lazily loaded), None if it cannot be read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 - a damaged file is never "the last checkpoint"
        return None


def find_last_checkpoint(folders: Sequence[Path], where: str) -> tuple[Path, int]:
    """``(file, global_step)`` of the readable ``*.ckpt`` with the highest step in ``folders``
    (ties: the newest); ``where`` says how the folders were chosen, for the error."""
    found = [(step, p.stat().st_mtime, p) for d in folders if d.is_dir() for p in d.glob("*.ckpt")
             if p.is_file() and (step := checkpoint_step(p)) is not None]
    if not found:
        looked = ", ".join(repr(str(d)) for d in folders) or "(no checkpoint folder)"
        raise CheckpointError(f"--ckpt_path=last found no readable checkpoint (*.ckpt) in {looked} ({where}); accepted: "
                              "a run folder holding a checkpoint, or --ckpt_path <file>; without --ckpt_path the run "
                              "starts afresh")
    step, _, path = max(found)
    return path, step


# -- the run folder ---------------------------------------------------------------------------------
def _versioned(logger: Any) -> bool:
    return logger is not None and hasattr(logger, "_version") and hasattr(logger, "root_dir")


def _version_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    for d in root.iterdir() if root.is_dir() else ():
        if d.is_dir() and (m := re.fullmatch(r"version_(\d+)", d.name)):
            out.append((int(m.group(1)), d))
    return sorted(out)


def _holds_a_run(folder: Path) -> list[str]:
    """What in ``folder`` belongs to an earlier run (empty: nothing)."""
    what = []
    if (folder / "metrics.csv").is_file():
        what.append("metrics.csv")
    ckpts = list((folder / "checkpoints").glob("*.ckpt")) if (folder / "checkpoints").is_dir() else []
    if ckpts:
        what.append(f"{len(ckpts)} checkpoint(s)")
    return what


def _set_version(logger: Any, name: str) -> None:
    m = re.fullmatch(r"version_(\d+)", name)
    logger._version = int(m.group(1)) if m else name


@dataclasses.dataclass
class RunPlan:
    """Where a ``fit`` writes, decided before it starts."""

    ckpt_path: str | None
    """The checkpoint to resume from (``last`` resolved to a file), or None."""
    resume_step: int | None
    """Its ``global_step``."""
    log_dir: Path | None
    """The logger's run folder (None without a versioned logger)."""
    continuing: bool
    """The run continues the run folder of its checkpoint (its metric rows are kept)."""
    checkpoint_dirs: list[Path]
    """Where checkpoints of this run go (locked with the run folder)."""


def _model_checkpoints(trainer: Any) -> list[Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]


def _checkpoint_dirs(trainer: Any, log_dir: Path | None) -> list[Path]:
    """Where the run's checkpoints go: each ModelCheckpoint's ``dirpath``, else (as Lightning
    does) ``<run folder>/checkpoints``; the interrupted-run checkpoint goes to the first."""
    base = log_dir if log_dir is not None else Path(trainer.default_root_dir)
    cbs = _model_checkpoints(trainer)
    dirs = [Path(cb.dirpath) if cb.dirpath else base / "checkpoints" for cb in cbs] or [base / "checkpoints"]
    return list(dict.fromkeys(dirs))


def plan_run_folder(trainer: Any, ckpt_path: str | None, rank_zero: bool) -> RunPlan:
    """Resolve ``--ckpt_path last``, set the logger's version (the checkpoint's run folder for a
    resumed run; a freshly claimed ``version_N`` for a new one) and refuse a run into a folder
    that holds another run's logs (module doc). Only ``rank_zero`` claims and refuses: the other
    ranks of a data-parallel run only resolve the same checkpoint."""
    check_resume_arguments(ckpt_path, ())
    logger = trainer.loggers[0] if trainer.loggers else None
    versioned = _versioned(logger)
    explicit = versioned and logger._version is not None
    root = Path(logger.root_dir) if versioned else None
    step = None
    if ckpt_path == "last":
        where = "the run's checkpoint folder"
        if versioned and not explicit and not any(cb.dirpath for cb in _model_checkpoints(trainer)):
            runs = _version_dirs(root)  # checkpoints live in the run folders: take the newest run
            if not runs:
                raise CheckpointError(f"--ckpt_path=last: no earlier run under {str(root)!r} (no version_* folder); "
                                      "accepted: a logger folder holding a run, or --ckpt_path <file>; without "
                                      "--ckpt_path the run starts afresh")
            _set_version(logger, runs[-1][1].name)
            older = [d.name for _, d in runs[:-1] if _holds_a_run(d)]
            where = f"the newest run folder under {str(root)!r}" + (
                f"; older runs there: {', '.join(older)}, resumable with --ckpt_path <file>" if older else "")
        path, step = find_last_checkpoint(_checkpoint_dirs(trainer, Path(logger.log_dir) if versioned else None), where)
        ckpt_path = str(path)
    elif ckpt_path is not None:
        step = checkpoint_step(Path(ckpt_path))
        rel = _relative(Path(ckpt_path), root) if versioned and not explicit else None
        if rel is not None and len(rel.parts) >= 2:  # <root>/<version>/.../x.ckpt: continue that run folder
            _set_version(logger, rel.parts[0])
    log_dir = None
    if versioned:
        if ckpt_path is None and not explicit and rank_zero:
            _claim_next_version(logger, root)
        log_dir = Path(logger.log_dir)
    continuing = ckpt_path is not None and log_dir is not None and _relative(Path(ckpt_path), log_dir) is not None
    if rank_zero and log_dir is not None and not continuing and (what := _holds_a_run(log_dir)):
        raise ValueError(
            f"trainer.logger version={logger._version!r} is not valid for this run: its folder {str(log_dir)!r} holds "
            f"another run ({', '.join(what)}) that this one would overwrite; accepted: --ckpt_path last (or a "
            "checkpoint in that folder) to continue that run, another trainer.logger.init_args.version, or null "
            "for a new version"
        )
    return RunPlan(ckpt_path, step, log_dir, continuing, _checkpoint_dirs(trainer, log_dir))


def _relative(path: Path, folder: Path) -> Path | None:
    try:
        return path.resolve().relative_to(folder.resolve())
    except ValueError:
        return None


def _claim_next_version(logger: Any, root: Path) -> None:
    """Take the next free ``version_N`` by creating it (``mkdir`` is atomic: of two runs started
    at once, one gets N and the other N + 1)."""
    with writing(root, "the run folder under", LOG_FOLDER_SETTING, "nothing was written yet"):
        root.mkdir(parents=True, exist_ok=True)
        n = (_version_dirs(root) or [(-1, None)])[-1][0] + 1
        while True:
            try:
                (root / f"version_{n}").mkdir()
                logger._version = n
                return
            except FileExistsError:
                n += 1


# -- the metric history -----------------------------------------------------------------------------
def start_loggers(trainer: Any, plan: RunPlan) -> int:
    """Create the loggers' experiments now, in the locked run folder (rank 0). For a resumed
    run continuing its folder, first read the CSV rows of the steps before the resumed one (and
    the warm-up's): Lightning's CSV writer deletes ``metrics.csv`` when it starts; they are
    written back at once. Returns the number of rows kept."""
    import warnings

    from lightning.pytorch.loggers import CSVLogger

    kept = 0
    for logger in trainer.loggers:
        rows: list[dict[str, str]] = []
        if isinstance(logger, CSVLogger) and plan.continuing and plan.resume_step is not None:
            rows = _rows_to_keep(Path(logger.log_dir) / "metrics.csv", plan.resume_step)
        with warnings.catch_warnings(), writing(logger.log_dir, "the run folder", LOG_FOLDER_SETTING):
            # "Previous log files in this directory will be deleted": the rows to keep are read,
            # and a fresh run never gets here with another run's logs in its folder.
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            experiment = logger.experiment
        _check_saves(experiment)
        if rows:
            experiment.metrics = rows + experiment.metrics
            experiment.save()
            kept += len(rows)
    return kept


def _check_saves(experiment: Any) -> None:
    """Lightning's CSV writer appends to ``metrics.csv`` from inside the training loop; a full
    disk there raised a bare ``ENOSPC`` that names no file (the write fails on a buffer flush).
    Its ``save`` now goes through :func:`reclight.trainer.checkpoint.writing`, which names the file
    and the free space."""
    path = getattr(experiment, "metrics_file_path", None)
    save = getattr(experiment, "save", None)
    if path is None or save is None or getattr(save, "_reclight_checked", False):
        return

    def checked_save() -> None:
        with writing(path, "the metrics", LOG_FOLDER_SETTING, METRICS_NOTE):
            save()

    checked_save._reclight_checked = True  # type: ignore[attr-defined]
    experiment.save = checked_save


def _rows_to_keep(path: Path, resume_step: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if _step(r) < resume_step or any(k.startswith("warmup/") and v for k, v in r.items())]
    if len(keep) < len(rows):  # the killed run logged steps past its checkpoint: keep that file aside
        backup = path.with_name(f"metrics.before-resume-at-step={resume_step}.csv")
        if not backup.exists():
            os.replace(path, backup)
    return [{k: v for k, v in r.items() if k is not None and v != ""} for r in keep]


def _step(row: Mapping[str, str]) -> int:
    try:
        return int(float(row.get("step") or -1))
    except ValueError:
        return -1


# -- one live run per folder ------------------------------------------------------------------------
class RunFolderInUse(RuntimeError):
    """Another live process writes the run folder."""


class RunLock:
    """Exclusive ``flock`` on ``.<folder name>.reclight.lock`` beside each folder, held until
    :meth:`release` or the process ends (the kernel drops it then, whatever killed it). The file
    holds the owner's pid and command line, for the message of a refused second run."""

    @staticmethod
    def path(folder: Path) -> Path:
        return folder.parent / f".{folder.name}.reclight.lock"

    def __init__(self, folders: Iterable[Path]) -> None:
        self.folders = list(dict.fromkeys(Path(f) for f in folders))
        self._fds: list[int] = []

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the folder rules above still apply
            return self
        for folder in self.folders:
            try:
                with writing(self.path(folder), "the run lock", f"{LOG_FOLDER_SETTING} or a ModelCheckpoint dirpath",
                             "nothing was written yet"):
                    folder.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(self.path(folder), os.O_RDWR | os.O_CREAT, 0o644)
            except BaseException:
                self.release()
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                self.release()
                raise RunFolderInUse(
                    f"trainer.logger / checkpoint folder {str(folder)!r} is in use by another live reclight run (pid and "
                    f"command: {owner}); accepted: a folder no live run writes: another trainer.logger.init_args.version "
                    "(or null for a new one), or wait until that run ends"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {' '.join(sys.argv)}\n".encode(), 0)
            self._fds.append(fd)
        return self

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the last descriptor drops the flock
        self._fds = []


def apply_optim_config(optimizers: Sequence[Any], scheduler: Any, lr: float, weight_decay: float,
                       betas: Sequence[float]) -> None:
    """A resume with ``--allow_changes model.optim...``: the restored AdamW state carries the
    checkpoint's lr, betas and weight decay (and the schedule its base lr); the config's win."""
    for opt in optimizers:
        for g in opt.param_groups:
            g.update(lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    if scheduler is not None:
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        for g, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            g["lr"] = base * f(scheduler.last_epoch)
