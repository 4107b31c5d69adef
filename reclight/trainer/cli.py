"""The ``reclight`` command: one LightningCLI call (fit / validate / test from YAML configs).

``reclight fit`` with no config runs the embedded default (2-digit addition, a tiny Llama
built locally, supervised warm-up, then RL); ``configs/arithmetic.yaml`` states it explicitly.
Configs compose with repeated ``--config`` (e.g. a task base + ``configs/algo/<preset>.yaml``
+ ``configs/sync/<setting>.yaml``). ``RLModule``'s arguments are typed groups
(:mod:`reclight.trainer.config`); a key of the old flat layout (``model.lr``, ``model.engine:
fast``, a top-level ``sync:``) is refused with a message naming its new key, and a key that
names no field of its group with the accepted fields, before parsing.

Also checked before any model is built: every ``--config`` file through the one YAML loader
(:mod:`reclight.trainer.yamlio`: file and line, a repeated key refused), ``seed_everything``
within numpy's seed range, the resume arguments (:func:`reclight.trainer.resume.check_resume_arguments`)
and the work of one step against ``model.guards.max_step_tokens`` (:func:`check_step_tokens`).
A write the disk refuses anywhere in ``fit`` is a ``DiskWriteError`` naming the file and the
free space (:func:`reclight.trainer.checkpoint.writing`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from reclight.checks import check_int
from reclight.engines.stop import StopRequested
from reclight.trainer.checkpoint import AtomicCheckpointIO, validate_checkpoint, writing
from reclight.trainer.keys import given_keys, key_errors
from reclight.trainer.data import RLDataModule
from reclight.trainer.module import RLModule
from reclight.trainer.resume import (
    LOG_FOLDER_SETTING, RECORD_KEY, RunLock, check_resume_arguments, check_resume_config, plan_run_folder, run_record,
    start_loggers,
)
from reclight.trainer.signals import EXIT_CODE, SignalCheckpoint
from reclight.yamlio import YamlFileError

# Warnings that every run printed and no user can act on (issue #17, item 7):
# - Lightning's ModelCheckpoint, with manual optimization and every_n_train_steps, prints 15 lines
#   suggesting to save the weights before optimizer.step(). reclight's checkpoints are taken
#   between steps ON PURPOSE: the state after step t's update is what an exact resume continues
#   from (tests/trainer/test_resume.py), so there is nothing to change.
# - Lightning 2.6's own pytree helper instantiates torch's deprecated LeafSpec (torch >= 2.10
#   flags it with a FutureWarning): Lightning's code, not the user's, and harmless.
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
# - The model summary's "Precision bf16-mixed is not supported ... Using 32 bits instead": with
#   bf16-mixed (the CLI's default) the master weights ARE fp32, so its size estimate is right.
warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary")


class _NoAdverts(logging.Filter):
    """Drops Lightning's "Tip: ... try installing litlogger / litmodels" lines, printed on every
    run: advertisements for hosted services, nothing a reclight user needs to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("\U0001f4a1 Tip:")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())

CPU_BF16_ENV = "RECLIGHT_CPU_BF16"
"""Overrides the CPU bf16 check: ``1`` answers "native bf16" on any CPU (so the bf16 default
paths run, emulated, on an AVX2-only machine: how the test suite exercises both CPU kinds on
one), ``0`` answers "none"; unset reads ``/proc/cpuinfo``."""


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 matrix instructions (x86 ``avx512_bf16`` or ``amx_bf16``, read
    from ``/proc/cpuinfo``; False where that file does not exist), unless ``RECLIGHT_CPU_BF16``
    says otherwise (:data:`CPU_BF16_ENV`). The one function that decides."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV}={forced!r} is not valid; accepted: 1 (treat this CPU as having native "
                             "bf16), 0 (as having none), or unset (read /proc/cpuinfo)")
        return forced == "1"
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_choice() -> tuple[str, str]:
    """``(trainer.precision default, why)``: ``bf16-mixed`` (bf16 autocast, fp32 master weights;
    with ``model.engine.dtype`` null also a bf16 rollout engine) where the hardware computes bf16
    natively: a CUDA GPU that supports it, or a CPU with bf16 instructions; else ``32-true``.
    Measured on the main job: bf16 learns as well as fp32 over 3 seeds (docs/benchmarks.md); on an
    AVX2-only CPU bf16 autocast is emulated and a step took 2.3x as long as in fp32 (10 steps of
    configs/arithmetic.yaml: 40.3 s against 17.5 s with the fast engine and the fused forward)."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "the CUDA GPU computes bf16 natively"
        return "32-true", "the CUDA GPU has no native bf16"
    if os.environ.get(CPU_BF16_ENV) is not None:
        forced = cpu_has_bf16()
        return ("bf16-mixed" if forced else "32-true"), f"{CPU_BF16_ENV}={os.environ[CPU_BF16_ENV]} in the environment"
    if cpu_has_bf16():
        return "bf16-mixed", "this CPU has native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo)"
    return "32-true", ("this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo), where bf16 "
                       "autocast is emulated and about 2.3x slower")


def default_precision() -> str:
    """The CLI's ``trainer.precision`` default (:func:`precision_choice`)."""
    return precision_choice()[0]


TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 500,
    "val_check_interval": 50,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "devices": 1,
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "outputs", "name": "reclight"},
    },
}
"""The CLI's trainer defaults; ``precision`` is added when the CLI is built (:func:`trainer_defaults`)."""


def trainer_defaults() -> dict[str, Any]:
    """:data:`TRAINER_DEFAULTS` with the precision of this machine, decided when the CLI is built
    (not at import, so ``RECLIGHT_CPU_BF16`` set by a caller takes effect)."""
    return {**TRAINER_DEFAULTS, "precision": default_precision()}


def _our_error(e: ValueError) -> ValueError:
    """jsonargparse reports a failed ``X | None`` group as "Does not validate against any of the
    Union subtypes", listing each subtype's error: the one in the project's form (``<field>=<value>
    is not valid; accepted: ...``) is the user's, the rest (the value is not None) is noise."""
    text = str(e)
    if text.startswith("Does not validate against any of the Union subtypes"):
        ours = [line.strip()[2:] for line in text.splitlines() if " is not valid" in line and line.strip().startswith("- ")]
        if ours:
            return ValueError("; ".join(ours))
    return e


class ReclightCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - jsonargparse types
        parser.add_argument(
            "--allow_changes", type=list[str], default=[],
            help="fit --ckpt_path only: settings that may differ from the checkpoint's (fields or groups, e.g. "
                 "[model.optim.lr, data.prompts_per_step]; 'all': every one but model.sync). Any other difference "
                 "is refused: it voids an exact resume (reclight.trainer.resume).",
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:  # an optional group (model.warmup: WarmupConfig | None) wraps its own error
            raise _our_error(e) from None
        if getattr(self, "subcommand", None) in (None, "fit"):
            check_step_tokens(self.model, self.datamodule, self.trainer)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic + durable checkpoint files (see reclight.trainer.checkpoint), unless the user chose
        # a CheckpointIO plugin of their own.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(SignalCheckpoint())  # SIGTERM: prompt stop + checkpoint (reclight.trainer.signals)
        return trainer

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - jsonargparse types
        given = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        try:  # every --config file through the one YAML loader first (file and line, repeated keys)
            self.precision_given = any(k == "trainer.precision" for k, _ in list(given_keys(given)))
        except YamlFileError as e:
            parser.error(str(e))
        if errors := key_errors(given):
            parser.error("; ".join(errors) + " (RLModule's arguments are typed groups: see `reclight fit --help`)")
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        seed = cfg.get("seed_everything")
        if seed is not None and not isinstance(seed, bool):  # numpy's bound, named (true draws a seed)
            check_int("seed_everything", seed, minimum=0, maximum=2**32 - 1,
                      accepted="an integer in [0, 4294967295] (numpy's seed range), or true for a random seed")
        # A bad --ckpt_path (or --allow_changes) fails here, right after parsing, before any model is built.
        ckpt_path = cfg.get("ckpt_path") if sub else None
        if sub == "fit":
            check_resume_arguments(ckpt_path, list(cfg.get("allow_changes") or []))
        if ckpt_path not in (None, "last", "best", "hpc", "registry"):
            validate_checkpoint(ckpt_path)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would override the parsed model.* with the checkpoint's hyper-parameters
        # (so `--model.algorithm grpo` silently ran the saved preset). For fit, reclight keeps the
        # config as given and compares it with the checkpoint's run record instead
        # (reclight.trainer.resume); validate / test keep Lightning's behaviour (evaluate the
        # checkpoint's model).
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand != "fit":
            return super()._run_subcommand(subcommand)
        # The writes that do not go through a reclight helper (Lightning's config.yaml and
        # hparams.yaml, the embedded model's folder, other loggers' files): a full disk or a
        # read-only folder is named the same way (reclight.trainer.checkpoint.writing).
        with writing(None, "", f"{LOG_FOLDER_SETTING}, a ModelCheckpoint dirpath or "
                     "model.policy.tiny_dir"):
            self._fit(subcommand)

    def _fit(self, subcommand: str) -> None:
        cfg = self.config_init[subcommand]
        rank_zero = rank_zero_only.rank == 0
        plan = plan_run_folder(self.trainer, cfg.get("ckpt_path"), rank_zero)
        if plan.ckpt_path != cfg.get("ckpt_path"):  # --ckpt_path last, resolved
            validate_checkpoint(plan.ckpt_path)
            self.config_init[f"{subcommand}.ckpt_path"] = plan.ckpt_path
            rank_zero_info(f"--ckpt_path last: resuming from {plan.ckpt_path} (step {plan.resume_step})")
        allowed = list(cfg.get("allow_changes") or [])
        self.model.allow_changes = allowed
        why = "set in the config" if getattr(self, "precision_given", False) else f"the default: {precision_choice()[1]}"
        self.model.precision_reason = why
        rank_zero_info(f"trainer.precision: {self.trainer.precision} ({why})")
        if plan.ckpt_path is not None:  # refuse a changed setting before any model is loaded
            saved = torch.load(plan.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            self.model.resume_changes = check_resume_config(saved.get("reclight", {}).get(RECORD_KEY), run_record(
                self.model, self.datamodule, self.trainer), allowed, plan.ckpt_path)
            self.model.resume_checked = True
        lock = RunLock([] if not rank_zero else [
            *([plan.log_dir] if plan.log_dir is not None else []),
            *([d for d in plan.checkpoint_dirs if plan.log_dir is None or not d.is_relative_to(plan.log_dir)]
              if self.trainer.checkpoint_callback is not None else []),
        ]).acquire()
        try:
            if rank_zero:
                start_loggers(self.trainer, plan)
            if plan.continuing:  # its checkpoint folder holds the earlier checkpoints, as it should
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super()._run_subcommand(subcommand)
        except (StopRequested, SIGTERMException):
            self._exit_after_sigterm()
        finally:
            lock.release()
        stopped = any(isinstance(cb, SignalCheckpoint) and cb.stopped for cb in self.trainer.callbacks)
        if stopped and self.trainer.global_step < self.trainer.max_steps:  # stopped early, not finished
            self._exit_after_sigterm()

    def _exit_after_sigterm(self) -> None:
        cb = next(cb for cb in self.trainer.callbacks if isinstance(cb, SignalCheckpoint))
        where = (f"checkpoint of step {self.trainer.global_step}: {cb.saved}; resume with the same command and "
                 "--ckpt_path last" if cb.saved else "no checkpoint written (see above)")
        print(f"reclight fit: stopped by SIGTERM; {where}; exit status {EXIT_CODE}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODE)


def check_step_tokens(model: Any, datamodule: Any, trainer: Any) -> int | None:
    """``model.guards.max_step_tokens`` against this run's step (prompts per rank x K x
    max_new_tokens), when the config is built (:meth:`GuardsConfig.check_step_tokens`)."""
    guards, sampling = getattr(model, "guards_cfg", None), getattr(model, "sampling", None)
    pps = getattr(datamodule, "prompts_per_step", None)
    if guards is None or sampling is None or not isinstance(pps, int):
        return None
    world = max(1, int(getattr(trainer, "world_size", 1) or 1))
    oversample = float(getattr(datamodule, "oversample", 1.0))
    per_rank = math.ceil(oversample * -(-pps // world) - 1e-9)
    where = f"data.prompts_per_step={pps} over {world} rank{'s' if world > 1 else ''}" + (
        f", x data.oversample={oversample:g}" if oversample != 1 else "")
    return guards.check_step_tokens(per_rank, sampling.num_samples, sampling.max_new_tokens, where)


def main(args: list[str] | None = None, run: bool = True) -> ReclightCLI:
    """Entry point of the ``reclight`` console script (``args`` for tests).

    ``--help`` shows every field's docstring: jsonargparse reads them from the source only when
    asked (a process-wide setting that makes each parse several times slower), so only for help."""
    given = sys.argv[1:] if args is None else args
    if any(a in ("-h", "--help") for a in given):
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return ReclightCLI(
        RLModule,
        RLDataModule,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
