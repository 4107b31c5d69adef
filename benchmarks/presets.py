"""Short runs of several presets on the embedded default, one seed each, one table.

    python benchmarks/presets.py --presets grpo_kl dr_grpo dapo gspo cispo decoupled_tis --steps 100
    python benchmarks/presets.py --summarize outputs/presets           # only re-read finished runs

Every preset runs ``reclight fit --config configs/arithmetic.yaml --config configs/algo/<p>.yaml``
(plus ``--perf`` configs, default the fast CPU set-up: bf16 + fast engine + fused forward) with the
same seed, so the supervised warm-up, and the "before" figure, are the same for all. "Before" is
the greedy val accuracy at RL step 0, "after" the mean of the last ``--smooth`` periodic evaluations
(every ``--eval-every`` steps). No per-preset tuning: each preset runs as it is defined.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import latest_metrics, summarize_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PERF = ["configs/perf/bf16.yaml", "configs/perf/fast_engine.yaml", "configs/perf/fused_forward.yaml"]


def column_mean(metrics_csv: Path, column: str) -> float:
    with open(metrics_csv, newline="") as f:
        vals = [float(r[column]) for r in csv.DictReader(f) if r.get(column)]
    return statistics.fmean(vals) if vals else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["rec_oneside_nois", "grpo_kl", "dr_grpo", "dapo", "gspo", "cispo",
                                                     "decoupled_tis"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--smooth", type=int, default=2, help="evaluations averaged for the 'after' figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perf", nargs="*", default=PERF, help="extra config files (speed settings)")
    p.add_argument("--out", type=Path, default=Path("outputs/presets"))
    p.add_argument("--summarize", type=Path, default=None)
    args = p.parse_args()
    out = args.summarize or args.out
    walls: dict[str, float] = {}
    if args.summarize is None:
        exe = Path(sys.executable).with_name("reclight")
        for preset in args.presets:
            cmd = [str(exe), "fit", "--config", str(ROOT / "configs/arithmetic.yaml"),
                   *[a for c in args.perf for a in ("--config", str(ROOT / c))],
                   "--config", str(ROOT / f"configs/algo/{preset}.yaml"), "--seed_everything", str(args.seed),
                   "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(args.eval_every),
                   "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", preset]
            print("+", " ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            walls[preset] = time.perf_counter() - start
    presets = args.presets if args.summarize is None else sorted(d.name for d in out.iterdir() if d.is_dir())
    print(f"\n| preset | val acc before RL | after (mean of last {args.smooth} evals) | gain | mean clip/frac | wall |")
    print("|---|---|---|---|---|---|")
    for preset in presets:
        m = latest_metrics(out / preset)
        r = summarize_run(m, args.smooth)
        wall = f"{walls[preset] / 60:.1f} min" if preset in walls else "-"
        print(f"| `{preset}` | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | {100 * r['gain']:+.1f} | "
              f"{column_mean(m, 'clip/frac'):.3f} | {wall} |")


if __name__ == "__main__":
    main()
