"""How much a ``free`` rollout worker's run varies, against ``paced`` (issue #28): the main job
with an off-policy schedule, per seed one paced run and ``--repeats`` free runs.

    python benchmarks/workers_spread.py [--setting inflight] [--seeds 0 1 2] [--repeats 2] [--out DIR]
    python benchmarks/workers_spread.py --setting inflight --summarize DIR   # only re-reads finished runs

Every run is the README's main job (configs/arithmetic.yaml: warm-up, then 500 RL steps) with a
schedule (``--setting``: ``one_step_off``: ``pace``, eta = 1, ``drain``, 32 slots; ``inflight``:
``pace``, eta = 1, in-flight weight updates, 64 slots, both as in ``benchmarks/workers_bench.py``;
``drop`` (default): ``drop``, eta = 1, in-flight updates, 64 slots; this machine's calibrated
costs) and one worker at 1 thread beside a 1-thread trainer:

- ``paced``: the simulated clock decides; bitwise the in-process run at 1 thread, so one run per
  seed is its value (tests/rollout/test_workers.py checks the equality);
- ``free``: the real clock decides which versions sample which tokens, so two runs of one seed
  differ; ``--repeats`` runs per seed measure by how much.

Reported per run: held-out accuracy before RL and after (the mean of the last 3 evaluations, as
``benchmarks/main_job.py``), the mean trained staleness, the wall time (warm-up included: the same in every run of a seed); then per seed
the free repeats' spread (max - min of "after") and the free mean's difference from paced. Run it
on an otherwise idle machine: a free run's schedule depends on the two processes' real speeds.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from main_job import latest_metrics, summarize_run  # noqa: E402
from workers_bench import COSTS  # noqa: E402
from workers_bench import SETTINGS as BENCH_SETTINGS  # noqa: E402

ROOT = HERE.parent
SETTINGS = {**BENCH_SETTINGS,
            "drop": "{staleness: drop, max_staleness: 1, weight_update: inflight, max_inflight: 64}"}
"""workers_bench's two, and ``drop``: the generator never waits (a free slot is always filled;
completed groups more than one version old are discarded), so the real clock decides at which
token each swap lands."""


def arms(repeats: int) -> list[str]:
    return ["paced"] + [f"free{r}" for r in range(repeats)]


def run(out: Path, seed: int, arm: str, setting: str) -> float:
    mode = "paced" if arm == "paced" else "free"
    cmd = [str(Path(sys.executable).with_name("reclight")), "fit", "--config", str(ROOT / "configs/arithmetic.yaml"),
           "--seed_everything", str(seed), "--trainer.logger.init_args.save_dir", str(out),
           "--trainer.logger.init_args.name", f"seed{seed}-{arm}", "--trainer.enable_progress_bar", "false",
           "--model.clock", SETTINGS[setting], "--model.clock.enabled", "true",
           "--model.clock.costs", COSTS, "--model.rollout", f"{{workers: 1, threads: 1, mode: {mode}}}"]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(out / f"seed{seed}-{arm}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def mean_staleness(metrics_csv: Path) -> float:
    """The mean over logged RL steps of the trained groups' mean staleness."""
    with open(metrics_csv, newline="") as f:
        stale = [float(r["async/staleness_mean"]) for r in csv.DictReader(f) if r.get("async/staleness_mean")]
    return statistics.fmean(stale) if stale else float("nan")


def trained_columns(metrics_csv: Path) -> list[tuple[str, ...]]:
    """Per logged row, the values that follow from what was trained (losses, evaluations), not
    from the generator's bookkeeping (``async/``, ``rollout/``, ``throughput/``)."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = sorted(k for k in rows[0] if k.startswith(("loss/", "val/", "grad/", "kl/")))
    return [tuple(r[k] for k in keys) for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="drop")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=2, help="free runs per seed")
    p.add_argument("--out", type=Path, default=None, help="default: outputs/workers_spread/<setting>")
    p.add_argument("--summarize", type=Path, default=None, help="skip training; summarize OUT's runs")
    args = p.parse_args()
    out = args.summarize or args.out or Path("outputs/workers_spread") / args.setting
    out.mkdir(parents=True, exist_ok=True)
    walls: dict[tuple[int, str], float] = {}
    if args.summarize is None:
        for seed in args.seeds:
            for arm in arms(args.repeats):
                walls[seed, arm] = run(out, seed, arm, args.setting)
    print("\n| seed | run | val acc before RL | after (mean of last 3 evals) | mean staleness | losses and "
          "evaluations equal to paced | wall |")
    print("|---|---|---|---|---|---|---|")
    after: dict[tuple[int, str], float] = {}
    for seed in args.seeds:
        for arm in arms(args.repeats):
            folder = out / f"seed{seed}-{arm}"
            if not folder.is_dir():
                continue
            try:
                csv_path = latest_metrics(folder)
                r, stale = summarize_run(csv_path, 3), mean_staleness(csv_path)
            except (FileNotFoundError, ValueError):  # not finished
                continue
            paced = out / f"seed{seed}-paced"
            same = (trained_columns(csv_path) == trained_columns(latest_metrics(paced))) if paced.is_dir() else "-"
            after[seed, arm] = r["after"]
            wall = f"{walls[seed, arm]:.0f} s" if (seed, arm) in walls else "-"
            print(f"| {seed} | {arm} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | {stale:.3f} | {same} | {wall} |")
    print("\n| seed | free repeats' spread (max - min, points) | free mean - paced (points) |")
    print("|---|---|---|")
    spreads, diffs = [], []
    for seed in args.seeds:
        free = [after[seed, a] for a in arms(args.repeats)[1:] if (seed, a) in after]
        if not free or (seed, "paced") not in after:
            continue
        spreads.append(max(free) - min(free))
        diffs.append(statistics.fmean(free) - after[seed, "paced"])
        print(f"| {seed} | {100 * spreads[-1]:.1f} | {100 * diffs[-1]:+.1f} |")
    if spreads:
        print(f"| mean | {100 * statistics.fmean(spreads):.1f} | {100 * statistics.fmean(diffs):+.1f} |")


if __name__ == "__main__":
    main()
