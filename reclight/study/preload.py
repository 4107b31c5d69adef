"""What the study's forkserver imports once (:mod:`reclight.study.forked`): the process set-up of
the ``reclight`` command, then the libraries every run imports (torch, Lightning, transformers)
and the entry points. Importing starts no thread, so the processes forked from it are safe."""

from reclight.launch import configure_process

configure_process()

import lightning.pytorch  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

import reclight.study.cli  # noqa: E402,F401
import reclight.trainer.cli  # noqa: E402,F401
