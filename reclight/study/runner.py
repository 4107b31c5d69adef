"""Running a study's commands in a local process pool, resumably.

- Pool: ``workers`` commands at once (default: the usable CPU cores // ``threads``), each a
  subprocess with ``OMP_NUM_THREADS=threads`` (one thread per run by default: several torch
  processes with the default thread count thrash on a small machine). A seed's runs start as
  soon as its warm-up is done; warm-ups go first.
- Skipping: a warm-up is done when its folder (renamed into place at the end) holds
  ``warmup.json``; a run is done when its ``logs/metrics.csv`` has every evaluation. Both are
  skipped, so a killed study continues where it stopped; an unfinished run folder is cleared and
  the run restarts from step 0 (study runs write no checkpoints: a run is minutes).
- A finished run recorded with another command (``run.json``) is refused, not mixed in: the
  study config changed in a way that changes that run; use another ``out_dir``.
- Each command holds an exclusive lock on ``<folder>.lock`` for its whole life (inherited by the
  child), so a second study over the same folder refuses a run that is still going, even if the
  first study process was killed and its child lives on. Under the lock the job checks again
  whether it is done (another study may have finished it meanwhile): a command submitted twice
  runs once. A filesystem that refuses ``flock`` (some cluster filesystems) runs the job
  unlocked and says so in its log.
- The child's environment is the study's, with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set to
  ``threads`` and the scheduler's own variables (``SLURM_*``, ``SUBMITIT_*``) removed: Lightning
  reads ``SLURM_*`` (its SLURMEnvironment: ranks, a requeue signal handler), and a study run is
  one process whoever started it, so a run submitted to SLURM is the run of the local pool.
- Progress: one line per finished command with done / total, elapsed and the estimated time left
  (mean wall time per command so far x commands left / commands at once).
- Where the commands run is a :class:`Backend`: :class:`LocalPool` (threads that each wait on one
  subprocess) or a scheduler's (:mod:`reclight.study.scheduler`); the order, the skipping, the
  warm-up-first rule and the progress lines are this module's, whichever runs them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reclight.study.plan import THREAD_VARS, Job, Shape
from reclight.study.report import read_run
from reclight.study.warmup import warmup_finished


def default_workers(threads: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // threads)


def job_done(job: Job) -> bool:
    if job.is_warmup:
        return warmup_finished(job.folder)
    return read_run(job.folder).complete


def check_recorded(job: Job) -> None:
    """A finished run whose recorded command differs from the planned one is an error."""
    record = job.folder / "run.json"
    if job.is_warmup or not record.is_file():
        return
    argv = json.loads(record.read_text()).get("argv")
    if argv is not None and list(argv) != list(job.argv):
        raise ValueError(f"{job.folder} holds a finished run of another command (see its run.json); the study "
                         "config changed what this run does. Accepted: the same config, or a new out_dir")


@dataclass
class Outcome:
    job: Job
    status: str
    """``done``, ``failed`` (non-zero exit, see ``log``), ``blocked`` (its warm-up failed) or ``busy``."""
    seconds: float = 0.0
    log: Path | None = None


def _log_path(job: Job) -> Path:
    return job.folder.with_name(job.folder.name + ".log") if job.is_warmup else job.folder / "log.txt"


SCHEDULER_VARS = ("SLURM_", "SUBMITIT_")
"""Prefixes of the environment variables a scheduler sets for its job, removed from a run's."""


def child_env(job: Job) -> dict[str, str]:
    """The environment of a job's process (module docstring: why the scheduler's variables go)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCHEDULER_VARS)}
    # Idle OpenMP threads sleep at once (reclight/launch.py says why): `reclight study` has set this
    # already, `python -m reclight.study` has not, and the runs share the cores.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return {**env, **{v: str(job.threads) for v in THREAD_VARS}}


def _execute(job: Job, forked: Any = None) -> Outcome:
    """Run one job in this process's working folder: lock, skip if done, (clear,) run, check.
    ``forked``: a :class:`reclight.study.forked.ForkedCommands` to fork the command from (None: a
    subprocess)."""
    lock_path = job.folder.with_name(job.folder.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    unlocked = ""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return Outcome(job, "busy")
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: a filesystem without flock
            unlocked = (f"# not locked: {lock_path} refuses flock ({e.strerror}); a second study over this folder "
                        "at the same time would not be detected\n")
        if job_done(job):  # finished by another study (or a twice-submitted copy) since the plan
            return Outcome(job, "done", 0.0, _log_path(job))
        if not job.is_warmup:  # restart an unfinished run from a clean folder
            shutil.rmtree(job.folder, ignore_errors=True)
            job.folder.mkdir(parents=True)
            (job.folder / "run.json").write_text(json.dumps(
                {"arm": job.arm, "setting": job.setting, "seed": job.seed, "command": job.shell(),
                 "argv": list(job.argv)}, indent=1) + "\n")
        log = _log_path(job)
        start = time.perf_counter()
        with open(log, "w") as out:
            out.write(f"$ {job.shell()}\n{unlocked}")
            out.flush()
            code = None
            if forked is not None:
                try:
                    code = forked.run(job.module, job.argv, child_env(job), job.threads, str(log), fd, os.getcwd())
                except Exception as e:  # no forkserver here: the command as a process of its own
                    out.write(f"# not forked ({type(e).__name__}: {e}); run as a subprocess\n")
                    out.flush()
            if code is None:
                code = subprocess.run(job.program(), stdout=out, stderr=subprocess.STDOUT, env=child_env(job),
                                      pass_fds=(fd,)).returncode
        seconds = time.perf_counter() - start
        if code == 0 and not job_done(job):  # exited cleanly but wrote less than a full run
            code = -1
        return Outcome(job, "done" if code == 0 else "failed", seconds, log)
    finally:
        os.close(fd)


def execute_in(job: Job, cwd: str) -> Outcome:
    """:func:`_execute` from the folder the study was started in (a scheduler's job may start
    elsewhere; the study's config paths and a relative ``out_dir`` are relative to that folder).
    What a scheduler submits: one call per job."""
    os.chdir(cwd)
    return _execute(job)


class Backend(Protocol):
    """Where the commands run. ``submit`` starts jobs (in the order given) and returns one handle
    each; ``wait`` blocks until at least one of ``handles`` has finished and returns
    ``(index into handles, Outcome)`` for each finished one; ``cancel`` stops what is in flight
    (Ctrl-C); ``close`` releases the backend."""

    limit: int | None
    """Jobs in flight at most (None: every job whose warm-up is done; the scheduler throttles)."""
    parallel: int
    """Jobs expected to run at once (for the time-left estimate)."""

    def describe(self) -> str: ...

    def submit(self, jobs: list[Job]) -> list[Any]: ...

    def wait(self, handles: list[Any]) -> list[tuple[int, Outcome]]: ...

    def cancel(self, handles: list[Any]) -> None: ...

    def close(self) -> None: ...


class LocalPool:
    """``workers`` jobs at once, each a process waited on by one thread of this process: forked
    from one preloaded forkserver (``forked``, :mod:`reclight.study.forked`: the imports are paid
    once per study, not once per command) or a subprocess."""

    def __init__(self, workers: int, forked: bool = True) -> None:
        self.limit = self.parallel = workers
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._forked = forked
        self._commands: Any = None

    def describe(self) -> str:
        how = "forked from one process that imported the libraries once" if self._forked else "subprocesses"
        return f"{self.parallel} at a time, {how}"

    def submit(self, jobs: list[Job]) -> list[Any]:
        if self._forked and self._commands is None and jobs:
            from reclight.study.forked import ForkedCommands

            commands = ForkedCommands(child_env(jobs[0]))
            try:  # here, before any job's thread reads the environment this swaps for a moment
                commands.start()
                self._commands = commands
            except Exception as e:  # noqa: BLE001 - any failure: the commands run as before
                self._forked = False
                warnings.warn(f"reclight study: the commands run as subprocesses (the forkserver did not start: "
                              f"{type(e).__name__}: {e})", stacklevel=2)
        return [self._pool.submit(_execute, job, self._commands) for job in jobs]

    def wait(self, handles: list[Any]) -> list[tuple[int, Outcome]]:
        finished, _ = wait(handles, return_when=FIRST_COMPLETED)
        return [(i, h.result()) for i, h in enumerate(handles) if h in finished]

    def cancel(self, handles: list[Any]) -> None:
        pass  # Ctrl-C reached the children too (one process group); close() waits for them

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def run_jobs(jobs: list[Job], shape: Shape, workers: int, log=print, backend: Backend | None = None) -> list[Outcome]:
    """Run every job not done yet (warm-ups first; a seed's runs after its warm-up) on
    ``backend`` (default: a :class:`LocalPool` of ``workers``); returns the outcome of each job
    it ran or skipped. Jobs that become ready together are submitted together (one job array
    on a scheduler)."""
    for job in jobs:
        if not job.is_warmup and job_done(job):
            check_recorded(job)
    backend = backend if backend is not None else LocalPool(workers)
    todo = [j for j in jobs if not job_done(j)]
    skipped = len(jobs) - len(todo)
    warm_ready = {j.seed for j in jobs if j.is_warmup and j not in todo} | (
        set() if shape.warmup else {j.seed for j in jobs})
    log(f"{len(jobs)} commands: {skipped} already finished (skipped), {len(todo)} to run, {backend.describe()}")
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    walls: list[float] = []
    failed_seeds: set[int] = set()
    running: list[tuple[Any, Job]] = []
    pending = list(todo)
    try:
        while pending or running:
            ready: list[Job] = []
            for job in list(pending):
                if backend.limit is not None and len(running) + len(ready) >= backend.limit:
                    break
                if not job.is_warmup and job.seed in failed_seeds:
                    pending.remove(job)
                    outcomes.append(Outcome(job, "blocked"))
                    log(f"skip {job.label}: the warm-up of seed {job.seed} failed")
                elif job.is_warmup or job.seed in warm_ready:
                    pending.remove(job)
                    ready.append(job)
            if ready:
                running += zip(backend.submit(ready), ready)
            if not running:
                continue
            finished = backend.wait([h for h, _ in running])
            done_jobs = [running[i][1] for i, _ in finished]
            running = [r for i, r in enumerate(running) if i not in {i for i, _ in finished}]
            for job, (_, outcome) in zip(done_jobs, finished):
                outcomes.append(outcome)
                if outcome.status == "done":
                    if outcome.seconds > 0:  # 0: found done under its lock, nothing ran
                        walls.append(outcome.seconds)
                    if job.is_warmup:
                        warm_ready.add(job.seed)
                elif job.is_warmup:
                    failed_seeds.add(job.seed)
                left = len(pending) + len(running)
                eta = sum(walls) / len(walls) * left / backend.parallel if walls else float("nan")
                note = {"done": "", "failed": f"  FAILED, see {outcome.log}",
                        "busy": "  still running in another process (its lock is held): not started"}[outcome.status]
                log(f"[{len(outcomes):>3}/{len(todo)}] {job.label} {outcome.status} in {outcome.seconds:.0f} s | "
                    f"elapsed {_clock(time.perf_counter() - start)} | "
                    f"~{_clock(eta) if eta == eta else '?'} left{note}")
    except KeyboardInterrupt:
        backend.cancel([h for h, _ in running])
        raise
    finally:
        backend.close()
    return outcomes
