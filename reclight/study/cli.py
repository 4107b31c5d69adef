"""``reclight study`` (also ``python -m reclight.study``)::

    reclight study --config configs/study/paper.yaml              # run it all (resumable), then the report
    reclight study --config configs/study/paper.yaml --dry-run    # print one command per line, run nothing
    reclight study report reports/study/paper                     # rebuild the report from the run folders
    reclight study warmup reports/study/paper --seed 0            # one seed's warm-up (a dry-run line)
    reclight study --config configs/study/paper.yaml --scheduler slurm --slurm_partition cpu   # on SLURM
    reclight study replicate reports/study/paper --seeds 101 102 103   # the primary claims on fresh seeds

``--config`` may be repeated (later files replace earlier top-level keys); ``--out_dir`` and
``--workers`` override the config's. Everything is validated (the study config, then every arm
through the real ``reclight fit`` parser) before any run starts or any file is written; the
dry run writes only ``study.yaml`` into the study folder, so that ``report`` can read the
folders once a scheduler has run the printed commands (warm-up lines first: a seed's runs
load its warm-up's folder). Ctrl-C ends with one line saying how to resume and exit status 130.
``--scheduler`` runs the same jobs through SLURM (:mod:`reclight.study.scheduler`);
``replicate`` reruns a study's primary claims on fresh seeds (:mod:`reclight.study.replicate`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

DESCRIPTION = ("Run a study: arms x off-policy settings x seeds of plain `reclight fit` runs, one warm-up per "
               "seed, and a report with a verdict per pre-registered claim (docs/study.md).")


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reclight study", description=DESCRIPTION,
                                epilog="subcommands: `reclight study report DIR`, `reclight study warmup DIR --seed S`, "
                                       "`reclight study replicate DIR --seeds S ...`")
    p.add_argument("--config", action="append", required=True, help="study YAML (repeatable)")
    p.add_argument("--out_dir", default=None, help="override the config's out_dir")
    p.add_argument("--workers", type=int, default=None, help="runs at once (default: CPU cores // threads)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the commands (warm-ups first), one per line, and run nothing")
    from reclight.study.scheduler import add_arguments

    add_arguments(p)
    return p


def _fail(parser: argparse.ArgumentParser, err: Exception) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {err}", file=sys.stderr)
    return 2


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _scheduler(args: argparse.Namespace):
    """The ``--scheduler`` choice, checked (options, and submitit / sbatch unless a dry run)."""
    from reclight.study.scheduler import check_available, from_args

    sched = from_args(args)
    if not args.dry_run:
        check_available(sched)
    return sched


def execute(cfg, shape, sched, dry_run: bool, then: str = "reclight study report") -> list | None:
    """Write ``study.yaml``; print the commands (dry run: returns None) or run them on ``sched``'s
    backend and return the outcomes (a ``ValueError`` for a refused run folder)."""
    import yaml

    from reclight.study.plan import make_plan
    from reclight.study.report import STUDY_FILE
    from reclight.study.runner import default_workers, run_jobs
    from reclight.study.scheduler import make_backend

    jobs = make_plan(cfg, shape)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if dry_run:
        n_warm = sum(j.is_warmup for j in jobs)
        _log(f"# {n_warm} warm-up command(s) first, then {len(jobs) - n_warm} run(s) (each needs its seed's warm-up); "
             f"then: {then} {cfg.out_dir}")
        print("\n".join(j.shell() for j in jobs))
        return None
    workers = cfg.workers or default_workers(cfg.threads)
    backend = make_backend(sched, cfg.out_dir, cfg.name, cfg.threads, workers)
    return run_jobs(jobs, shape, workers, log=_log, backend=backend)


def _finish(outcomes: list) -> int:
    bad = [o for o in outcomes if o.status != "done"]
    for o in bad:
        _log(f"not finished: {o.job.label} ({o.status}{', log ' + str(o.log) if o.log else ''})")
    return 1 if bad else 0


def run(argv: list[str]) -> int:
    from reclight.study.config import load_study

    parser = _run_parser()
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("out_dir", args.out_dir), ("workers", args.workers)) if v is not None}
    try:
        sched = _scheduler(args)
        cfg = load_study(args.config, overrides)
        from reclight.study.plan import validate_commands

        shape = validate_commands(cfg)
        outcomes = execute(cfg, shape, sched, args.dry_run)
    except ValueError as err:
        return _fail(parser, err)
    if outcomes is None:
        return 0
    from reclight.study.report import write_report

    command = "reclight study " + " ".join(shlex.quote(a) for a in argv)
    write_report(cfg.out_dir, command=command, log=_log)
    return _finish(outcomes)


def report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="reclight study report",
                                     description="Aggregate a study folder's runs into report.md, summary.json and plots.")
    parser.add_argument("dir", help="the study folder (its study.yaml and runs/)")
    args = parser.parse_args(argv)
    from reclight.study.report import write_report

    try:
        write_report(args.dir, log=_log)
    except ValueError as err:
        return _fail(parser, err)
    return 0


def warmup(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="reclight study warmup",
                                     description="Run one seed's supervised warm-up of a study and save the model.")
    parser.add_argument("dir", help="the study folder (its study.yaml)")
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)
    from reclight.study.config import load_study
    from reclight.study.report import STUDY_FILE
    from reclight.study.warmup import warm_up

    try:
        cfg = load_study(Path(args.dir) / STUDY_FILE, {"out_dir": args.dir})
        if args.seed not in cfg.seeds:
            raise ValueError(f"--seed={args.seed} is not valid; accepted: a seed of the study: {list(cfg.seeds)}")
        warm_up(cfg, args.seed, log=lambda line: print(line, flush=True))
    except ValueError as err:
        return _fail(parser, err)
    return 0


def replicate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="reclight study replicate",
        description="Rerun a study's primary claims on fresh seeds in a folder of their own (default "
                    "DIR/replicate-<seeds>), then report, per primary claim, the original's verdict, mean and interval "
                    "against the replication's (agreement.md).")
    parser.add_argument("dir", help="the study folder (its study.yaml and runs/)")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="fresh seeds, none of the study's")
    parser.add_argument("--out_dir", default=None, help="the replication's folder (default: DIR/replicate-<seeds>)")
    parser.add_argument("--workers", type=int, default=None, help="runs at once (default: CPU cores // threads)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the replication's commands, one per line, and run nothing")
    from reclight.study.scheduler import add_arguments

    add_arguments(parser)
    args = parser.parse_args(argv)
    command = "reclight study replicate " + " ".join(shlex.quote(a) for a in argv)
    try:
        sched = _scheduler(args)
        from reclight.study.plan import validate_commands
        from reclight.study.replicate import load_original, replicate_config

        original = load_original(args.dir)
        cfg = replicate_config(original, args.seeds, args.out_dir, args.workers)
        shape = validate_commands(cfg)
        again = " ".join(a for a in command.split(" ") if a not in ("--dry-run", "--dry_run"))
        outcomes = execute(cfg, shape, sched, args.dry_run, then=f"{again} (again: it skips what is done and writes "
                           "the agreement), or reclight study report")
    except ValueError as err:
        return _fail(parser, err)
    if outcomes is None:
        return 0
    from reclight.study.replicate import write_agreement
    from reclight.study.report import write_report

    write_report(cfg.out_dir, command=command, log=_log)
    path = write_agreement(original, cfg, log=_log)
    print(path.read_text(), end="")
    return _finish(outcomes)


INTERRUPTED = 128 + 2
"""Exit status after Ctrl-C (128 + SIGINT, as a shell reports it)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "report":
            return report(argv[1:])
        if argv and argv[0] == "warmup":
            return warmup(argv[1:])
        if argv and argv[0] == "replicate":
            return replicate(argv[1:])
        return run(argv)
    except KeyboardInterrupt:
        # The runs in flight got the same Ctrl-C and stopped; finished runs and warm-ups are
        # recorded in their folders, and the runner skips them on the next call.
        command = "reclight study " + " ".join(shlex.quote(a) for a in argv)
        again = ("rerun the same command to resume: finished runs and warm-ups are kept and skipped, unfinished ones "
                 f"start again from step 0: {command}") if not argv or argv[0] not in ("report", "warmup") else (
                 f"nothing was lost; rerun it: {command}")
        print(f"reclight study: interrupted (Ctrl-C); {again}", file=sys.stderr, flush=True)
        return INTERRUPTED
