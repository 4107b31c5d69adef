"""``python -m reclight``: the ``reclight`` command (:mod:`reclight.trainer.launch`)."""

from reclight.trainer.launch import entrypoint

entrypoint()
