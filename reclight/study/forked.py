"""A study's commands forked from one process that imported torch, Lightning and transformers
once (issue #26: a study run's fixed cost).

Each command of a study was a new Python process that spent its first seconds importing the
same libraries. The local pool now starts one ``forkserver`` (Python's
``multiprocessing.get_context("forkserver")``, with this package's heavy modules preloaded,
:mod:`reclight.study.preload`) and forks every command from it: a fork is a copy of a process
that has imported everything and run nothing, so each command starts as a fresh process would
after its imports, and a command that crashes takes only its own process down.

What a forked command gets, as a subprocess did: the job's environment (``child_env``: the
thread variables, the scheduler's variables removed), its thread count (``torch.set_num_threads``
too: the OpenMP runtime read ``OMP_NUM_THREADS`` when the forkserver imported torch), stdout and
stderr on its log, ``sys.argv`` of its command line, the study's working folder, and the job's
lock: the open file description that holds the ``flock`` is passed to the child (as
multiprocessing passes a socket), so the lock lives as long as the command, even if the study
process is killed. Its exit status is the command's (``SystemExit(code)``; 1 for an exception,
whose traceback goes to the log).

Equality: a forked run is bitwise the subprocess run (``tests/study/test_forked.py`` compares the
metrics and the final weights of both). Where ``forkserver`` is not available (Windows) or its
start fails, the pool runs subprocesses as before and says so once.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from multiprocessing import reduction
from typing import Any

PRELOAD = ["reclight.study.preload"]


class _LockFd:
    """An open file descriptor passed to the forked child (the same open file description, so
    the same ``flock``); pickled through ``multiprocessing.reduction.DupFd`` while the child is
    being started."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple:
        return _rebuild_fd, (reduction.DupFd(self.fd),)


def _rebuild_fd(dup: Any) -> int:
    return dup.detach()


def _child(module: str, argv: list[str], env: dict[str, str], threads: int, log_path: str, lock: int,
           cwd: str) -> None:
    """The forked command ``python -m <module> <argv>``: its folder, environment, threads and log,
    then the module run as ``__main__`` (``reclight``: a run; ``reclight.study``: a warm-up)."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    import runpy

    import torch

    torch.set_num_threads(threads)
    _ = lock  # held open (and so locked) until this process ends
    sys.argv = [module, *argv]  # run_module puts the module's file in argv[0], as ``python -m`` does
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # ``python -m <module> <argv>``


class ForkedCommands:
    """Starts commands from one preloaded forkserver (module docstring).

    Args:
        env: the environment the forkserver starts with (a job's: its OpenMP runtime reads the
            thread and wait-policy variables when it imports torch).
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self._ctx: Any = None

    def start(self) -> None:
        """Start the forkserver (it imports the preloaded modules in the background)."""
        self._context()

    def _context(self) -> Any:
        if self._ctx is None:
            if "forkserver" not in multiprocessing.get_all_start_methods():
                raise OSError("this platform has no forkserver start method")
            from multiprocessing import forkserver

            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            saved = dict(os.environ)
            os.environ.clear()
            os.environ.update(self.env)
            try:  # the forkserver inherits this environment
                forkserver.ensure_running()
            finally:
                os.environ.clear()
                os.environ.update(saved)
            self._ctx = ctx
        return self._ctx

    def run(self, module: str, argv: list[str], env: dict[str, str], threads: int, log_path: str, lock_fd: int,
            cwd: str) -> int:
        """Run one command to its end; its exit status."""
        ctx = self._context()
        process = ctx.Process(target=_child, name="reclight-study-run",
                              args=(module, list(argv), dict(env), threads, log_path, _LockFd(lock_fd), cwd))
        process.start()
        process.join()
        return process.exitcode
