"""The ``reclight`` command: one LightningCLI call (fit / validate / test from YAML configs).

``reclight fit`` with no config runs the embedded default (2-digit addition, a tiny Llama
built locally, supervised warm-up, then RL); ``configs/arithmetic.yaml`` states it explicitly.
Configs compose with repeated ``--config`` (e.g. a task base + ``configs/algo/<preset>.yaml``
+ ``configs/sync/<setting>.yaml``). The sync schedule is the top-level ``sync:`` section (a
forced :class:`reclight.callbacks.WeightSync` callback), so it composes like any other key.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from reclight.callbacks import WeightSync
from reclight.checkpoint import AtomicCheckpointIO, validate_checkpoint
from reclight.data import RLDataModule
from reclight.module import RLModule

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


class ReclightCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - jsonargparse parser
        parser.add_lightning_class_args(WeightSync, "sync")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic + durable checkpoint files (see reclight.checkpoint), unless the user chose a
        # CheckpointIO plugin of their own.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - jsonargparse types
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
