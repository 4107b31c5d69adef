"""A study's commands on a cluster scheduler: SLURM through submitit (``reclight[cluster]``).

``--scheduler`` picks the :class:`reclight.study.runner.Backend` that runs the jobs:

- ``local`` (default): the local process pool (:class:`reclight.study.runner.LocalPool`).
- ``slurm``: each job is one SLURM job, submitted with submitit; the jobs that become ready
  together (the warm-ups; then each seed's runs once its warm-up is done) are one job array,
  ``--slurm_array_parallelism`` of it at once. This process stays until the last job ends: it
  submits a seed's runs when the seed's warm-up has finished, prints a progress line per job
  and writes the report, as with the local pool.
- ``submitit-local``: the same submissions through submitit's local executor (each job a process
  on this machine, ``--workers`` at once): the cluster path without a cluster, for trying a
  setup and for the tests.

What is submitted is one call of :func:`reclight.study.runner.execute_in` per job: the function
the local pool calls, so a job takes the same lock, skips itself when done, runs the same argv
with the same environment (``OMP_NUM_THREADS``..., the scheduler's ``SLURM_*`` and ``SUBMITIT_*``
variables removed) from the folder the study was started in. A run done on SLURM is therefore
the run of the local pool, bitwise on the same machine and software
(``tests/study/test_study_scheduler.py`` compares the report of both on submitit's local
executor); across nodes, as far as two machines compute alike (pin one CPU type with
``--slurm_extra constraint=...``).

Why a driver that waits, not SLURM dependencies (``afterok``): the waiting driver is the code
path the local executor tests, and a failed warm-up skips its seed's runs at once instead of
leaving them pending forever in the queue (``DependencyNeverSatisfied``). If the driver dies
(a closed login session: run it under tmux, or as a small job itself), rerun the same command:
finished jobs are skipped; a job still queued from the first driver finds its run done, or
its lock held, and exits without running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reclight.checks import invalid
from reclight.study.plan import Job
from reclight.study.runner import LocalPool, Outcome, execute_in

SCHEDULERS = ("local", "slurm", "submitit-local")
INSTALL = "pip install 'reclight[cluster]' (or: pip install submitit)"
LOCAL_TIMEOUT_MIN = 24 * 60
"""submitit's local executor kills a job after its ``timeout_min`` (2 minutes by default)."""
POLL_S = {"slurm": 15.0, "submitit-local": 0.5}
"""Seconds between two looks at the jobs in flight (submitit rate-limits its ``sacct`` calls)."""


@dataclass(frozen=True)
class SlurmOptions:
    """The SLURM job of each command (``--slurm_<field>``); submitit's ``AutoExecutor``
    parameters in brackets."""

    partition: str | None = None
    """The partition (``slurm_partition``; null: the cluster's default)."""
    time_min: int = 60
    """Time limit of one job, in minutes (``timeout_min``). A job past it is killed and reported
    failed; the next run of the study starts it again from step 0."""
    cpus_per_task: int | None = None
    """CPUs of one job (``cpus_per_task``; null: the study's ``threads``)."""
    mem_gb: float = 4.0
    """Memory of one job, in GB (``mem_gb``)."""
    array_parallelism: int = 64
    """Jobs of one array running at once (``slurm_array_parallelism``, SLURM's ``--array=...%N``)."""
    log_dir: str | None = None
    """submitit's folder (its pickles and each job's stdout/stderr, one subfolder per job id);
    null: ``<out_dir>/submitit``."""
    extra: dict[str, str] = field(default_factory=dict)
    """Any other ``sbatch`` option, ``key=value`` (``slurm_additional_parameters``), e.g.
    ``account=proj42``, ``qos=short``, ``constraint=icelake``."""

    def __post_init__(self) -> None:
        if self.time_min < 1:
            raise invalid("--slurm_time_min", self.time_min, "an integer >= 1 (minutes)")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise invalid("--slurm_cpus_per_task", self.cpus_per_task, "an integer >= 1")
        if not self.mem_gb > 0:
            raise invalid("--slurm_mem_gb", self.mem_gb, "a number > 0 (GB)")
        if self.array_parallelism < 1:
            raise invalid("--slurm_array_parallelism", self.array_parallelism, "an integer >= 1")


FLAGS = {"partition": str, "time_min": int, "cpus_per_task": int, "mem_gb": float, "array_parallelism": int,
         "log_dir": str}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--scheduler`` and the ``--slurm_*`` options (defaults: :class:`SlurmOptions`)."""
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="local",
                        help="where the runs go: local (a process pool here, default), slurm (submitit; needs "
                             f"{INSTALL}), submitit-local (submitit's local executor: the slurm path on this machine)")
    docs = {"partition": "SLURM partition (default: the cluster's)", "time_min": "time limit per job, minutes (60)",
            "cpus_per_task": "CPUs per job (default: the study's threads)", "mem_gb": "memory per job, GB (4)",
            "array_parallelism": "jobs of one array at once (64)",
            "log_dir": "submitit's logs and pickles (default: <out_dir>/submitit)"}
    for name, kind in FLAGS.items():
        parser.add_argument(f"--slurm_{name}", type=kind, default=None, help=docs[name])
    parser.add_argument("--slurm_extra", action="append", default=None, metavar="KEY=VALUE",
                        help="another sbatch option, e.g. account=proj42 (repeatable)")


@dataclass(frozen=True)
class Scheduler:
    """The parsed ``--scheduler`` choice."""

    kind: str
    slurm: SlurmOptions | None = None


def from_args(args: argparse.Namespace) -> Scheduler:
    """Check the combination of ``--scheduler``, ``--slurm_*`` and ``--workers`` (no import)."""
    given = {name: getattr(args, f"slurm_{name}") for name in (*FLAGS, "extra")}
    given = {k: v for k, v in given.items() if v is not None}
    if args.scheduler != "slurm":
        if given:
            name, value = next(iter(given.items()))
            value = value[0] if name == "extra" else value
            raise invalid(f"--slurm_{name}", value, f"a --slurm_* option only with --scheduler slurm (got --scheduler "
                          f"{args.scheduler})")
        return Scheduler(args.scheduler)
    if getattr(args, "workers", None) is not None:
        raise invalid("--workers", args.workers, "--workers only with --scheduler local or submitit-local; with slurm, "
                      "--slurm_array_parallelism bounds the jobs at once")
    extra = {}
    for item in given.pop("extra", []):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value:
            raise invalid("--slurm_extra", item, "KEY=VALUE, an sbatch option without its dashes, e.g. account=proj42")
        extra[key.strip()] = value
    return Scheduler("slurm", SlurmOptions(**given, extra=extra))


def import_submitit(kind: str) -> Any:
    try:
        import submitit
    except ImportError:
        raise invalid("--scheduler", kind, f"local, or install submitit first: {INSTALL}") from None
    return submitit


def check_available(scheduler: Scheduler) -> None:
    """Refuse, before anything runs, a scheduler this machine cannot submit to."""
    if scheduler.kind == "local":
        return
    import_submitit(scheduler.kind)
    if scheduler.kind == "slurm" and not all(shutil.which(c) for c in ("sbatch", "srun")):
        raise invalid("--scheduler", "slurm", "a machine with SLURM's sbatch and srun on PATH (a cluster's login "
                      "node); here: --scheduler local, or submitit-local to try the submission path")


def make_executor(scheduler: Scheduler, out_dir: str | Path, name: str, threads: int) -> Any:
    """submitit's ``AutoExecutor`` for ``scheduler`` (slurm or submitit-local), its parameters set."""
    submitit = import_submitit(scheduler.kind)
    opts = scheduler.slurm or SlurmOptions()
    folder = Path(opts.log_dir or Path(out_dir) / "submitit") / "%j"
    if scheduler.kind == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(
            name=f"reclight-{name}", timeout_min=opts.time_min, mem_gb=opts.mem_gb, nodes=1, tasks_per_node=1,
            cpus_per_task=opts.cpus_per_task or threads, slurm_partition=opts.partition,
            slurm_array_parallelism=opts.array_parallelism, slurm_additional_parameters=opts.extra or None)
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(name=f"reclight-{name}", timeout_min=LOCAL_TIMEOUT_MIN, tasks_per_node=1)
    return executor


class SubmititBackend:
    """Jobs submitted through a submitit executor (:class:`reclight.study.runner.Backend`)."""

    def __init__(self, executor: Any, *, limit: int | None, parallel: int, description: str, poll_s: float) -> None:
        self.executor, self.limit, self.parallel = executor, limit, parallel
        self._description, self._poll_s = description, poll_s
        self._cwd = os.getcwd()
        self._jobs: dict[int, Job] = {}

    def describe(self) -> str:
        return self._description

    def submit(self, jobs: list[Job]) -> list[Any]:
        with self.executor.batch():
            handles = [self.executor.submit(execute_in, job, self._cwd) for job in jobs]
        for handle, job in zip(handles, jobs):
            self._jobs[id(handle)] = job
        return handles

    def _outcome(self, handle: Any) -> Outcome:
        job = self._jobs.pop(id(handle))
        try:
            return handle.result()  # the Outcome execute_in returned in the job
        except Exception:  # noqa: BLE001 - killed (time limit, node failure), cancelled, or raised: see its log
            return Outcome(job, "failed", 0.0, Path(handle.paths.stderr))

    def wait(self, handles: list[Any]) -> list[tuple[int, Outcome]]:
        while True:
            finished = [i for i, h in enumerate(handles) if h.done()]
            if finished:
                return [(i, self._outcome(handles[i])) for i in finished]
            time.sleep(self._poll_s)

    def cancel(self, handles: list[Any]) -> None:
        for handle in handles:
            handle.cancel(check=False)

    def close(self) -> None:
        pass


def make_backend(scheduler: Scheduler, out_dir: str | Path, name: str, threads: int, workers: int) -> Any:
    """The backend of ``scheduler``; ``workers`` bounds the local pool and submitit-local."""
    if scheduler.kind == "local":
        return LocalPool(workers)
    executor = make_executor(scheduler, out_dir, name, threads)
    if scheduler.kind == "slurm":
        opts = scheduler.slurm or SlurmOptions()
        where = f"partition {opts.partition}" if opts.partition else "the default partition"
        return SubmititBackend(executor, limit=None, parallel=opts.array_parallelism, poll_s=POLL_S["slurm"],
                               description=f"submitted to SLURM ({where}, at most {opts.array_parallelism} of an "
                                           f"array at once; logs in {executor.folder.parent})")
    return SubmititBackend(executor, limit=workers, parallel=workers, poll_s=POLL_S["submitit-local"],
                           description=f"{workers} at a time through submitit's local executor (logs in "
                                       f"{executor.folder.parent})")
