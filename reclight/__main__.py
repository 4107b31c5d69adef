"""``python -m reclight``: the ``reclight`` command (:mod:`reclight.launch`)."""

from reclight.launch import entrypoint

entrypoint()
