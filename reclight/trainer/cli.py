"""The ``reclight`` command: one LightningCLI call (fit / validate / test from YAML configs).

``reclight fit`` with no config runs the embedded default (2-digit addition, a tiny Llama
built locally, supervised warm-up, then RL); ``configs/arithmetic.yaml`` states it explicitly.
Configs compose with repeated ``--config`` (e.g. a task base + ``configs/algo/<preset>.yaml``
+ ``configs/sync/<setting>.yaml``). ``RLModule``'s arguments are typed groups
(:mod:`reclight.trainer.config`); a key of the old flat layout (``model.lr``, ``model.engine:
fast``, a top-level ``sync:``) is refused with a message naming its new key, and a key that
names no field of its group with the accepted fields, before parsing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from reclight.trainer.checkpoint import AtomicCheckpointIO, validate_checkpoint
from reclight.trainer.config import moved_key_message, unknown_field_message
from reclight.trainer.data import RLDataModule
from reclight.trainer.module import RLModule

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


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every node of a parsed YAML tree (groups and leaves)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key, v
            yield from _flatten(v, key)


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _given_keys(args: list[str]) -> Iterator[tuple[str, Any]]:
    """The ``(key, value)`` pairs a command line sets, including those of its ``--config`` files."""
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        if key == "config" and value is not None:
            path = Path(value)
            yield from _flatten(_yaml(path.read_text()) if path.is_file() else _yaml(value))
        else:
            yield key.removesuffix("+"), _yaml(value) if isinstance(value, str) else value
            if isinstance(value, str) and isinstance(parsed := _yaml(value), dict):
                yield from _flatten(parsed, key)


def key_errors(args: list[str]) -> list[str]:
    """Messages for every key of ``args`` (and its config files) that moved to a typed group, or
    that names no field of its group (with the accepted fields)."""
    messages = []
    for key, value in _given_keys(args):
        parts = key.split(".")
        found = None
        for n in range(1, len(parts) + 1):
            found = moved_key_message(".".join(parts[:n]), value if n == len(parts) else None)
            if found:
                break
        found = found or unknown_field_message(key, value)
        if found and found not in messages:
            messages.append(found)
    return messages


class ReclightCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic + durable checkpoint files (see reclight.trainer.checkpoint), unless the user chose
        # a CheckpointIO plugin of their own.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - jsonargparse types
        given = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        if errors := key_errors(given):
            parser.error("; ".join(errors) + " (RLModule's arguments are typed groups: see `reclight fit --help`)")
        super().parse_arguments(parser, args)
        # A bad --ckpt_path fails here, right after parsing: LightningCLI reads the file's
        # hyper-parameters next (and they override the config's model.* on resume).
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path not in (None, "last", "best", "hpc", "registry"):
            validate_checkpoint(ckpt_path)


def main(args: list[str] | None = None, run: bool = True) -> ReclightCLI:
    """Entry point of the ``reclight`` console script (``args`` for tests)."""
    return ReclightCLI(
        RLModule,
        RLDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def entrypoint() -> None:
    """The ``reclight`` console script. Returns None on purpose: the generated wrapper calls
    ``sys.exit(entrypoint())``, and exiting with ``main()``'s CLI object would print it and
    report failure (exit status 1) after a successful run."""
    main()


if __name__ == "__main__":
    entrypoint()
