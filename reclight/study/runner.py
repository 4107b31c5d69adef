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
  first study process was killed and its child lives on.
- Progress: one line per finished command with done / total, elapsed and the estimated time left
  (mean wall time per command so far x commands left / workers).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

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


def _execute(job: Job) -> Outcome:
    lock_path = job.folder.with_name(job.folder.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return Outcome(job, "busy")
        if not job.is_warmup:  # restart an unfinished run from a clean folder
            shutil.rmtree(job.folder, ignore_errors=True)
            job.folder.mkdir(parents=True)
            (job.folder / "run.json").write_text(json.dumps(
                {"arm": job.arm, "setting": job.setting, "seed": job.seed, "command": job.shell(),
                 "argv": list(job.argv)}, indent=1) + "\n")
        log = _log_path(job)
        env = {**os.environ, **{v: str(job.threads) for v in THREAD_VARS}}
        start = time.perf_counter()
        with open(log, "w") as out:
            out.write(f"$ {job.shell()}\n")
            out.flush()
            code = subprocess.run(job.program(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                  pass_fds=(fd,)).returncode
        seconds = time.perf_counter() - start
        if code == 0 and not job_done(job):  # exited cleanly but wrote less than a full run
            code = -1
        return Outcome(job, "done" if code == 0 else "failed", seconds, log)
    finally:
        os.close(fd)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def run_jobs(jobs: list[Job], shape: Shape, workers: int, log=print) -> list[Outcome]:
    """Run every job not done yet (warm-ups first; a seed's runs after its warm-up) in a pool
    of ``workers``; returns the outcome of each job it ran or skipped."""
    for job in jobs:
        if not job.is_warmup and job_done(job):
            check_recorded(job)
    todo = [j for j in jobs if not job_done(j)]
    skipped = len(jobs) - len(todo)
    warm_ready = {j.seed for j in jobs if j.is_warmup and j not in todo} | (
        set() if shape.warmup else {j.seed for j in jobs})
    log(f"{len(jobs)} commands: {skipped} already finished (skipped), {len(todo)} to run, {workers} at a time")
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    walls: list[float] = []
    failed_seeds: set[int] = set()
    running: dict[Future, Job] = {}
    pending = list(todo)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            for job in list(pending):
                if len(running) >= workers:
                    break
                if not job.is_warmup and job.seed in failed_seeds:
                    pending.remove(job)
                    outcomes.append(Outcome(job, "blocked"))
                    log(f"skip {job.label}: the warm-up of seed {job.seed} failed")
                elif job.is_warmup or job.seed in warm_ready:
                    pending.remove(job)
                    running[pool.submit(_execute, job)] = job
            if not running:
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                outcome = future.result()
                outcomes.append(outcome)
                if outcome.status == "done":
                    walls.append(outcome.seconds)
                    if job.is_warmup:
                        warm_ready.add(job.seed)
                elif job.is_warmup:
                    failed_seeds.add(job.seed)
                left = len(pending) + len(running)
                eta = sum(walls) / len(walls) * left / workers if walls else float("nan")
                note = {"done": "", "failed": f"  FAILED, see {outcome.log}",
                        "busy": "  still running in another process (its lock is held): not started"}[outcome.status]
                log(f"[{len(outcomes):>3}/{len(todo)}] {job.label} {outcome.status} in {outcome.seconds:.0f} s | "
                    f"elapsed {_clock(time.perf_counter() - start)} | "
                    f"~{_clock(eta) if eta == eta else '?'} left{note}")
    return outcomes
