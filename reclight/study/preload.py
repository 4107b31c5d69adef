"""What the study's forkserver imports once (:mod:`reclight.study.forked`): the libraries every
run imports (torch, Lightning, transformers) and the entry points. Importing starts no thread,
so the processes forked from it are safe. The forkserver's environment is the job's
(``ForkedCommands(env)``), which carries the study process's ``OMP_WAIT_POLICY``: the
``reclight`` command set it before anything was imported (reclight/launch.py)."""

import lightning.pytorch  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401

import reclight.study.cli  # noqa: F401
import reclight.trainer.cli  # noqa: F401
