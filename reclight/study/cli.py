"""``reclight study`` (also ``python -m reclight.study``)::

    reclight study --config configs/study/paper.yaml              # run it all (resumable), then the report
    reclight study --config configs/study/paper.yaml --dry-run    # print one command per line, run nothing
    reclight study report reports/study/paper                     # rebuild the report from the run folders
    reclight study warmup reports/study/paper --seed 0            # one seed's warm-up (a dry-run line)

``--config`` may be repeated (later files replace earlier top-level keys); ``--out_dir`` and
``--workers`` override the config's. Everything is validated (the study config, then every arm
through the real ``reclight fit`` parser) before any run starts or any file is written; the
dry run writes only ``study.yaml`` into the study folder, so that ``report`` can read the
folders once a scheduler has run the printed commands (warm-up lines first: a seed's runs
load its warm-up's folder). Ctrl-C ends with one line saying how to resume and exit status 130.
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
                                epilog="subcommands: `reclight study report DIR`, `reclight study warmup DIR --seed S`")
    p.add_argument("--config", action="append", required=True, help="study YAML (repeatable)")
    p.add_argument("--out_dir", default=None, help="override the config's out_dir")
    p.add_argument("--workers", type=int, default=None, help="runs at once (default: CPU cores // threads)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the commands (warm-ups first), one per line, and run nothing")
    return p


def _fail(parser: argparse.ArgumentParser, err: Exception) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {err}", file=sys.stderr)
    return 2


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(argv: list[str]) -> int:
    from reclight.study.config import load_study

    parser = _run_parser()
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("out_dir", args.out_dir), ("workers", args.workers)) if v is not None}
    try:
        cfg = load_study(args.config, overrides)
        from reclight.study.plan import make_plan, validate_commands

        shape = validate_commands(cfg)
    except ValueError as err:
        return _fail(parser, err)
    import yaml

    from reclight.study.report import STUDY_FILE, write_report
    from reclight.study.runner import default_workers, run_jobs

    jobs = make_plan(cfg, shape)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if args.dry_run:
        n_warm = sum(j.is_warmup for j in jobs)
        _log(f"# {n_warm} warm-up command(s) first, then {len(jobs) - n_warm} run(s) (each needs its seed's warm-up); "
             f"then: reclight study report {cfg.out_dir}")
        print("\n".join(j.shell() for j in jobs))
        return 0
    workers = cfg.workers or default_workers(cfg.threads)
    try:
        outcomes = run_jobs(jobs, shape, workers, log=_log)
    except ValueError as err:
        return _fail(parser, err)
    command = "reclight study " + " ".join(shlex.quote(a) for a in argv)
    write_report(cfg.out_dir, command=command, log=_log)
    bad = [o for o in outcomes if o.status != "done"]
    for o in bad:
        _log(f"not finished: {o.job.label} ({o.status}{', log ' + str(o.log) if o.log else ''})")
    return 1 if bad else 0


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


INTERRUPTED = 128 + 2
"""Exit status after Ctrl-C (128 + SIGINT, as a shell reports it)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "report":
            return report(argv[1:])
        if argv and argv[0] == "warmup":
            return warmup(argv[1:])
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
