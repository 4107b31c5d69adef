"""``python -m reclight``: the ``reclight`` command (:mod:`reclight.trainer.cli`)."""

from reclight.trainer.cli import entrypoint

entrypoint()
