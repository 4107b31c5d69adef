"""Run the README's main job for several seeds and report held-out accuracy before and after RL.

    python benchmarks/main_job.py --seeds 0 1 2                 # runs `reclight fit` per seed
    python benchmarks/main_job.py --summarize outputs/main_job   # only re-reads finished runs

"Before" is the greedy val accuracy logged at RL step 0 (right after the supervised warm-up);
"after" is the mean of the LAST ``--smooth`` periodic evaluations (default 3, i.e. steps 400,
450 and 500 with the default config), not the best single one. Each seed's run goes to
``OUT/seed<S>/version_*/metrics.csv``, its output to ``OUT/seed<S>/log.txt`` and its wall time
(the whole ``reclight fit`` process) to ``OUT/seed<S>/wall_s.txt``. Printed as markdown: the
accuracy table with the wall times, then each run's warm-up (steps, seconds a step) and RL step
medians (rollout + scoring seconds, the update's tokens per second).
"""

from __future__ import annotations

import argparse
import ast
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def val_curve(metrics_csv: Path) -> list[tuple[int, float]]:
    """``(step, val/acc)`` rows of one run, in logging order."""
    with open(metrics_csv, newline="") as f:
        return [(int(r["step"]), float(r["val/acc"])) for r in csv.DictReader(f) if r.get("val/acc")]


def summarize_run(metrics_csv: Path, smooth: int) -> dict[str, float]:
    curve = val_curve(metrics_csv)
    if len(curve) < smooth + 1:
        raise ValueError(f"{metrics_csv}: {len(curve)} val/acc rows; need at least {smooth + 1} (start + {smooth})")
    before = curve[0][1]
    after = statistics.fmean(acc for _, acc in curve[-smooth:])
    return {"before": before, "after": after, "gain": after - before, "last_step": curve[-1][0]}


def per_step(run_dir: Path, metrics_csv: Path) -> dict[str, float]:
    """The run's warm-up (steps, and seconds a step, from the ``warm-up: {...}`` line of its
    ``log.txt``; absent for a run without one) and the medians over its RL steps of
    ``rollout/wait_s`` (a rollout and its scoring) and ``throughput/train_tok_s`` (the update's
    trained tokens per second)."""
    out: dict[str, float] = {}
    log = run_dir / "log.txt"
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.startswith("warm-up: {"):
                stats = ast.literal_eval(line.removeprefix("warm-up: "))
                out["warmup_steps"] = stats["warmup/steps"]
                out["warmup_s_per_step"] = stats["warmup/seconds"] / max(stats["warmup/steps"], 1)
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    for key, name in (("rollout/wait_s", "rollout_s"), ("throughput/train_tok_s", "train_tok_s")):
        values = [float(r[key]) for r in rows if r.get(key)]
        if values:
            out[name] = statistics.median(values)
    return out


def latest_metrics(run_dir: Path) -> Path:
    files = sorted(run_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not files:
        raise FileNotFoundError(f"no version_*/metrics.csv under {run_dir}")
    return files[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("outputs/main_job"))
    p.add_argument("--config", type=Path, default=ROOT / "configs/arithmetic.yaml")
    p.add_argument("--smooth", type=int, default=3, help="evaluations averaged for the 'after' figure")
    p.add_argument("--summarize", type=Path, default=None, help="skip training; summarize OUT/seed*/ runs")
    p.add_argument("extra", nargs="*", help="extra `reclight fit` arguments (after --)")
    args = p.parse_args()

    out = args.summarize or args.out
    walls: dict[int, float] = {}
    if args.summarize is None:
        exe = Path(sys.executable).with_name("reclight")
        for seed in args.seeds:
            cmd = [str(exe), "fit", "--config", str(args.config), "--seed_everything", str(seed),
                   "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", f"seed{seed}",
                   *args.extra]
            print("+", " ".join(cmd), flush=True)
            (out / f"seed{seed}").mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            with open(out / f"seed{seed}" / "log.txt", "w") as log:  # the run's output, also shown here
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
                for line in proc.stdout:
                    sys.stdout.write(line)
                    log.write(line)
                if proc.wait():
                    raise SystemExit(f"seed {seed}: `reclight fit` exited with {proc.returncode} (log: {log.name})")
            walls[seed] = time.perf_counter() - start
            (out / f"seed{seed}" / "wall_s.txt").write_text(f"{walls[seed]:.2f}\n")  # for --summarize
    seeds = args.seeds if args.summarize is None else sorted(
        int(d.name.removeprefix("seed")) for d in out.glob("seed*") if d.is_dir()
    )
    if not seeds:
        raise SystemExit(f"--summarize {out}: no seed*/ run folders there (this script writes OUT/seed<S>/; "
                         "a plain `reclight fit` run is under outputs/reclight/version_*/)")
    rows = {s: summarize_run(latest_metrics(out / f"seed{s}"), args.smooth) for s in seeds}
    for s in seeds:  # a finished run's wall time, from this invocation or the one that ran it
        if s not in walls and (out / f"seed{s}" / "wall_s.txt").is_file():
            walls[s] = float((out / f"seed{s}" / "wall_s.txt").read_text())
    print(f"\n| seed | val acc before RL | after (mean of last {args.smooth} evals) | gain | wall |")
    print("|---|---|---|---|---|")
    for s, r in rows.items():
        wall = f"{walls[s]:.0f} s" if s in walls else "-"
        print(f"| {s} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | {100 * r['gain']:+.1f} | {wall} |")
    steps = {s: per_step(out / f"seed{s}", latest_metrics(out / f"seed{s}")) for s in seeds}
    gains = [r["gain"] for r in rows.values()]
    before = [r["before"] for r in rows.values()]
    after = [r["after"] for r in rows.values()]
    sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
    print(f"| mean ± sd | {100 * statistics.fmean(before):.1f} ± {100 * sd(before):.1f}% | "
          f"{100 * statistics.fmean(after):.1f} ± {100 * sd(after):.1f}% | "
          f"{100 * statistics.fmean(gains):+.1f} ± {100 * sd(gains):.1f} | "
          + (f"{statistics.fmean(walls[s] for s in seeds):.0f} s |" if all(s in walls for s in seeds) else "|"))
    print(f"min gain: {100 * min(gains):+.1f} points")
    fmt = lambda d, k, f: f.format(d[k]) if k in d else "-"  # noqa: E731
    print("\n| seed | warm-up steps | warm-up s/step | rollout + scoring s/step (median) | update tokens/s (median) |")
    print("|---|---|---|---|---|")
    for s, d in steps.items():
        print(f"| {s} | {fmt(d, 'warmup_steps', '{:.0f}')} | {fmt(d, 'warmup_s_per_step', '{:.3f}')} | "
              f"{fmt(d, 'rollout_s', '{:.4f}')} | {fmt(d, 'train_tok_s', '{:.0f}')} |")
    for k, label in (("warmup_s_per_step", "warm-up s/step"), ("rollout_s", "rollout s/step"),
                     ("train_tok_s", "update tokens/s")):
        values = [d[k] for d in steps.values() if k in d]
        if values:
            print(f"median over seeds, {label}: {statistics.median(values):.4g}")


if __name__ == "__main__":
    main()
