"""A study command's fixed cost: the same run as a subprocess and forked from the study's
preloaded forkserver (reclight/study/forked.py), interleaved (issue #26).

    python benchmarks/study_startup.py [--repeats 5] [--out outputs/study_startup]

The run is the micro study's (tests/study/study_helpers.py: a 1-layer model, 3 RL steps with an
evaluation after each), so its wall time is nearly all fixed cost: process start, imports, CLI
parse and config checks, model build, the evaluations. Its warm-up runs once first. Then, per
repeat, the run as a subprocess (``python -m reclight ...``, what the study did before) and the
run forked, each from a clean folder, one after the other. Prints the median wall seconds of
each, and how long a new process takes to import the trainer's entry point (median of 3). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "study"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("outputs/study_startup"))
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    from reclight.launch import configure_process

    configure_process()  # as `reclight study` does before it starts anything
    from study_helpers import micro_study

    from reclight.study.config import study_from_dict
    from reclight.study.forked import ForkedCommands
    from reclight.study.plan import make_plan, validate_commands
    from reclight.study.runner import child_env

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = study_from_dict(micro_study(out, seeds=[0]))
    jobs = make_plan(cfg, validate_commands(cfg))
    warmup, run = jobs[0], jobs[1]
    import yaml

    from reclight.study.report import STUDY_FILE

    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)  # what `reclight study` writes before its commands
    (Path(cfg.out_dir) / STUDY_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    subprocess.run(warmup.program(), env=child_env(warmup), check=True, stdout=subprocess.DEVNULL)
    forked = ForkedCommands(child_env(run))
    forked.start()
    times: dict[str, list[float]] = {"subprocess": [], "forked": []}
    for r in range(args.repeats):
        for how in times:
            shutil.rmtree(run.folder, ignore_errors=True)
            run.folder.mkdir(parents=True)
            log = run.folder / "log.txt"
            log.write_text("")
            fd = os.open(out / "run.lock", os.O_CREAT | os.O_RDWR)
            start = time.perf_counter()
            if how == "subprocess":
                with open(log, "a") as f:
                    code = subprocess.run(run.program(), env=child_env(run), stdout=f, stderr=subprocess.STDOUT,
                                          pass_fds=(fd,)).returncode
            else:
                code = forked.run(run.module, run.argv, child_env(run), run.threads, str(log), fd, os.getcwd())
            times[how].append(time.perf_counter() - start)
            os.close(fd)
            if code != 0:
                raise SystemExit(f"{how} run failed ({code}); log: {log}")
            print(f"repeat {r}: {how} {times[how][-1]:.2f} s", flush=True)
    code = "import time; t = time.perf_counter(); import reclight.trainer.cli; print(time.perf_counter() - t)"
    imports = statistics.median(float(subprocess.run([sys.executable, "-c", code], env=child_env(run),
                                                     capture_output=True, text=True, check=True).stdout)
                                for _ in range(3))
    a, b = statistics.median(times["subprocess"]), statistics.median(times["forked"])
    print(f"\nmicro study run, {args.repeats} repeats, 1 thread: subprocess {a:.2f} s, forked {b:.2f} s "
          f"(median; {a - b:.2f} s less per command); importing reclight.trainer.cli alone: {imports:.2f} s")


if __name__ == "__main__":
    main()
