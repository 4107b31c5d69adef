"""The Lightning trainer: the module (:mod:`~reclight.trainer.module`), its typed config groups
(:mod:`~reclight.trainer.config`), the data module (:mod:`~reclight.trainer.data`), evaluation,
the supervised warm-up, guards, step metrics, checkpoint files and RNG state, and the CLI."""
