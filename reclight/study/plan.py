"""A study expanded into plain commands: one warm-up per seed, then one ``reclight fit`` per
(setting, arm, seed), each reproducible alone from the line it prints.

Folders, all under ``out_dir``::

    study.yaml                        the study config as run (``reclight study report`` reads it)
    tiny-model/                       the embedded tiny model the warm-ups start from (when the
                                      base builds it: ``model.policy.tiny_dir``)
    warmup/seed<S>/                   the warmed-up model of seed S (save_pretrained) + warmup.json
    runs/<setting>/<arm>/seed<S>/     one run: run.json (its command), log.txt, and the CSV
                                      logger's logs/ (metrics.csv, config.yaml, hparams.yaml)

A run's command is the base configs, then the base overrides, the seed, the arm's preset
(``--model.algorithm.preset``), the arm's configs and overrides,
the setting (``--model.sync``, and ``--model.optim.lr`` when it has a learning rate: the study's
``lrs`` axis), the warmed-up model (``--model.policy.name_or_path=<warmup
folder>``, ``--model.warmup=null``) and the run folder (a CSV logger writing straight into it).
Later arguments win, so an arm's override replaces the base's. A study writes nothing outside
``out_dir``: every command gets ``--model.policy.tiny_dir=<out_dir>/tiny-model`` (the base
config's own ``tiny_dir``, ``outputs/tiny-model`` of the folder the study runs from, is replaced;
the study config may not set it: :data:`reclight.study.config.RESERVED_KEYS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reclight.checks import invalid
from reclight.study.config import WARMUP_KEYS, Arm, Setting, StudyConfig

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
LOGS = "logs"
"""The CSV logger's folder inside a run folder (metrics.csv, config.yaml, hparams.yaml)."""


def _arg(key: str, value: Any) -> str:
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def tiny_folder(cfg: StudyConfig) -> Path:
    """Where the study's commands build (and reuse) the embedded tiny model."""
    return Path(cfg.out_dir) / "tiny-model"


def warmup_folder(cfg: StudyConfig, seed: int) -> Path:
    return Path(cfg.out_dir) / "warmup" / f"seed{seed}"


def run_folder(cfg: StudyConfig, setting: str, arm: str, seed: int) -> Path:
    return Path(cfg.out_dir) / "runs" / setting / arm / f"seed{seed}"


def base_args(cfg: StudyConfig, seed: int) -> list[str]:
    """``reclight fit`` arguments shared by every run of ``seed`` (and by its warm-up): the base
    configs, the base overrides, the study's tiny-model folder and the seed."""
    args = [a for path in cfg.base for a in ("--config", path)]
    args += [_arg(k, v) for k, v in cfg.base_overrides.items()]
    return args + [f"--model.policy.tiny_dir={tiny_folder(cfg)}", f"--seed_everything={seed}"]


def arm_args(arm: Arm) -> list[str]:
    args = [f"--model.algorithm.preset={arm.preset}"]
    args += [a for path in arm.configs for a in ("--config", path)]
    return args + [_arg(k, v) for k, v in arm.overrides.items()]


def setting_args(setting: Setting) -> list[str]:
    """The arguments of a setting: its schedule, and its RL learning rate (the ``lrs`` axis; the
    warm-up's ``model.warmup.lr`` is another field, so every lr of a seed shares one warm-up)."""
    args = [_arg("model.sync", setting.as_sync())]
    if setting.clock is not None:
        args += [_arg("model.clock", setting.as_clock())]
    if setting.lr is not None:
        args += [f"--model.optim.lr={setting.lr!r}"]
    return args


def run_args(cfg: StudyConfig, arm: Arm, setting: Setting, seed: int, warmed: bool) -> list[str]:
    """The ``reclight fit`` arguments (after ``fit``) of one run."""
    args = base_args(cfg, seed) + arm_args(arm) + setting_args(setting)
    if warmed:
        args += [f"--model.policy.name_or_path={warmup_folder(cfg, seed)}", "--model.warmup=null"]
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(run_folder(cfg, setting.name, arm.name, seed)), "name": "", "version": LOGS}}
    return args + [_arg("trainer.logger", logger)]


@dataclass(frozen=True)
class Job:
    """One command of the study: a warm-up (``arm is None``) or a run."""

    seed: int
    folder: Path
    argv: tuple[str, ...]
    """Arguments after the program: ``fit ...`` for a run, ``warmup OUT --seed S`` for a warm-up."""
    threads: int
    arm: str | None = None
    setting: str | None = None

    @property
    def is_warmup(self) -> bool:
        return self.arm is None

    @property
    def label(self) -> str:
        return f"warm-up seed{self.seed}" if self.is_warmup else f"{self.setting}/{self.arm}/seed{self.seed}"

    @property
    def module(self) -> str:
        """The entry point: ``reclight.study`` (a warm-up) or ``reclight``."""
        return "reclight.study" if self.is_warmup else "reclight"

    def program(self) -> list[str]:
        """How the study runs it (the same entry points as the printed command)."""
        import sys

        return [sys.executable, "-m", self.module, *self.argv]

    def shell(self) -> str:
        """The printed, self-contained command line (run from the study's working folder)."""
        env = " ".join(f"{v}={self.threads}" for v in THREAD_VARS)
        prog = "reclight study" if self.is_warmup else "reclight"
        return f"{env} {prog} " + " ".join(shlex.quote(a) for a in self.argv)


@dataclass(frozen=True)
class Shape:
    """What every run shares, read from the base config by the real parser."""

    max_steps: int
    val_check_interval: int
    warmup: bool
    """Whether the base config warms up (then every run starts from its seed's warm-up)."""


def make_plan(cfg: StudyConfig, shape: Shape) -> list[Job]:
    """Warm-ups first (one per seed, when the base warms up), then every run, settings first."""
    jobs = []
    if shape.warmup:
        jobs += [Job(seed, warmup_folder(cfg, seed), ("warmup", cfg.out_dir, "--seed", str(seed)), cfg.threads)
                 for seed in cfg.seeds]
    for setting, arm in cfg.cells():
        for seed in cfg.seeds:
            argv = ("fit", *run_args(cfg, cfg.arm(arm), cfg.setting(setting), seed, shape.warmup))
            jobs.append(Job(seed, run_folder(cfg, setting, arm, seed), argv, cfg.threads, arm, setting))
    return jobs


@contextlib.contextmanager
def _quiet():
    """Silence Lightning's and the parser's chatter while configs are parsed (errors are
    re-raised with the parser's message)."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            yield err
    finally:
        for n, level in zip(names, levels):
            logging.getLogger(n).setLevel(level)


def parse_fit(args: list[str], where: str) -> Any:
    """Parse (and instantiate, without running) ``reclight fit args`` with the real CLI; an error
    names ``where`` and carries the CLI's own message."""
    from reclight.trainer.cli import main

    with _quiet() as err:
        try:
            return main([*args, "--trainer.logger=false"], run=False)
        except SystemExit:
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            message = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
            raise ValueError(f"{where}: `reclight fit` refuses its arguments: {message.strip()}") from None
        except ValueError as e:
            raise ValueError(f"{where}: `reclight fit` refuses its arguments: {e}") from None


def _plain(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else value


def validate_commands(cfg: StudyConfig) -> Shape:
    """Parse the base and every arm through the real ``reclight fit`` parser (typos in an
    override fail here, before any run), check that no arm changes what the warm-up depends on
    (``WARMUP_KEYS``), and return the shared :class:`Shape`."""
    seed = cfg.seeds[0]
    base = parse_fit(base_args(cfg, seed), "base")
    conf = base.config
    steps, every = conf.get("trainer.max_steps"), conf.get("trainer.val_check_interval")
    if not isinstance(steps, int) or steps < 1:
        raise invalid("trainer.max_steps (base)", steps, "an integer >= 1")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1 or steps % every:
        raise invalid("trainer.val_check_interval (base)", every,
                      f"an integer >= 1 that divides trainer.max_steps={steps} (the statistics read evaluations "
                      "every val_check_interval steps, the last one at the last step)")
    warm = {k: _plain(conf.get(k)) for k in WARMUP_KEYS}
    axis = any(s.lr is not None for s in cfg.settings)
    for arm in cfg.arms:
        setting = cfg.setting(cfg.arm_settings(arm)[0])
        # parsed without the setting's lr (a finite number > 0, checked by load_study), so that an
        # lr set by the arm's own config files shows
        args = base_args(cfg, seed) + arm_args(arm) + setting_args(dataclasses.replace(setting, lr=None))
        parsed = parse_fit(args, f"arms.{arm.name}").config
        if axis and parsed.get("model.optim.lr") != conf.get("model.optim.lr"):
            raise invalid(f"arms.{arm.name} (model.optim.lr)", parsed.get("model.optim.lr"), f"the base's value "
                          f"{conf.get('model.optim.lr')!r}: with a learning-rate axis each cell's RL learning rate is "
                          "its setting's, so an arm's configs may not set their own")
        for key in WARMUP_KEYS:
            if _plain(parsed.get(key)) != warm[key]:
                raise invalid(f"arms.{arm.name} ({key})", _plain(parsed.get(key)),
                              f"the base's value {warm[key]!r}: every arm of a seed starts from one warmed-up model, "
                              f"so an arm may not change {', '.join(WARMUP_KEYS)}")
        for key in ("trainer.max_steps", "trainer.val_check_interval"):
            if parsed.get(key) != conf.get(key):
                raise invalid(f"arms.{arm.name} ({key})", parsed.get(key), f"the base's {conf.get(key)!r} (claims "
                              "compare arms evaluation by evaluation)")
    return Shape(max_steps=steps, val_check_interval=every, warmup=conf.get("model.warmup") is not None)
