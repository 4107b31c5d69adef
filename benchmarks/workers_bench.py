"""Step throughput of the asynchronous schedule with a rollout worker against in-process (issue #28).

    python benchmarks/workers_bench.py [--steps 16] [--skip 4] [--repeats 2] [--out outputs/workers_bench] \
        [--before DIR]

The main job's RL phase (configs/arithmetic.yaml: the ~1M-parameter Llama, B = 32 prompts x K = 8,
5 new tokens) on the simulated clock with this machine's calibrated costs (docs/llm.md,
``reclight calibrate``: the trainer is the slower side), in two settings:

- ``one_step_off``: ``pace``, eta = 1, ``drain``, 32 slots (= B): batch s + 1 is generated with
  theta_s while step s trains (the section-4 schedule k = 1, d = 1 on the clock);
- ``inflight``: ``pace``, eta = 1, in-flight weight updates, 64 slots;

and three arms, interleaved (setting by setting, arm by arm, ``--repeats`` times):

- ``inproc2``: in-process, 2 torch threads (today's path on this 2-core machine);
- ``inproc1``: in-process, 1 thread (for the thread scaling of each part);
- ``worker``: one worker, 1 thread in the trainer and 1 in the worker;
- ``free``: the same in ``free`` mode (the real clock decides: the worker generates until the
  trainer's next request; its generation time is its CPU time, at 1 thread its busy wall time);
- ``before2`` (with ``--before DIR``): ``inproc2`` on another checkout, e.g. the commit before the
  workers (``git archive <commit> | tar -x -C DIR``): ``workers: 0`` must be no slower.

Each arm is one ``reclight fit`` process (no warm-up: a step's time does not depend on the
weights' values; no validation; the start-of-RL evaluation on 8 problems). A callback times each
step's start (its batch in hand) and end; the first ``--skip`` steps are dropped (start-up, the
worker's spawn, the first batch that nothing overlaps). Reported per arm, medians over steps and
repeats: step time (start to next start), the trainer's wait for its batch, its training time,
and for the worker its time to form the batch and in the training window; the hidden fraction of
generation = 1 - wait / (worker_batch + worker_window).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

HERE = Path(__file__).resolve().parent  # this file's StepTimer is the callback of every arm
ROOT = HERE.parent
COSTS = "{decode_a: 0.003626, decode_b: 0.0001016, prefill_b: 0.0001366, sync_cost: 0.0008889, " \
        "train_c: 0.04308, train_e: 0.0002214}"  # docs/llm.md: reclight calibrate on this machine
SETTINGS = {
    "one_step_off": "{staleness: pace, max_staleness: 1, weight_update: drain, max_inflight: 32}",
    "inflight": "{staleness: pace, max_staleness: 1, weight_update: inflight, max_inflight: 64}",
}
ARMS = {"inproc2": (2, 0), "inproc1": (1, 0), "worker": (1, 1), "free": (1, 1), "before2": (2, 0)}
"""(torch threads per process, workers); ``before2`` is ``inproc2`` on the checkout ``--before``."""


class StepTimer(pl.Callback):
    """Writes ``{step: [start, end, wait, worker metrics...]}`` to ``out`` (JSON) at the end of fit."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.rows: dict[int, dict[str, float]] = {}

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.rows[trainer.global_step] = {"start": time.perf_counter(), "cpu_start": time.process_time(),
                                          "wait": float(batch.gen_seconds)}

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        row = self.rows[trainer.global_step - 1]
        row["end"], row["cpu_end"] = time.perf_counter(), time.process_time()
        row.update({k.split("/")[1]: float(v) for k, v in (batch.metrics or {}).items() if k.startswith("rollout/")})
        row["staleness_max"] = float(batch.metrics["async/staleness_max"])

    def on_fit_end(self, trainer: Any, module: Any) -> None:
        Path(self.out).write_text(json.dumps(self.rows))


def run(setting: str, arm: str, steps: int, out: Path, before: Path | None) -> dict[int, dict[str, float]]:
    threads, workers = ARMS[arm]
    root = before if arm == "before2" else ROOT
    result = out / f"{setting}-{arm}-{time.time_ns()}.json"
    cmd = [sys.executable, "-m", "reclight", "fit", "--config", str(ROOT / "configs/arithmetic.yaml"),
           "--model.warmup", "null", "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
           "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
           "--trainer.enable_progress_bar", "false", "--data.eval_size", "8",
           "--model.policy.tiny_dir", str(out / "tiny-model"), "--model.engine.name", "fast",
           "--model.clock", SETTINGS[setting], "--model.clock.enabled", "true", "--model.clock.costs", COSTS,
           *(["--model.rollout", f"{{workers: {workers}, threads: 1, mode: {'free' if arm == 'free' else 'paced'}}}"]
             if workers else []),
           "--trainer.callbacks+=workers_bench.StepTimer", f"--trainer.callbacks.out={result}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(HERE), str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{setting}/{arm} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(result.read_text()).items()}


def summarize(rows: list[dict[int, dict[str, float]]], skip: int) -> dict[str, float]:
    """Medians over the kept steps of every repeat (wall seconds, and CPU seconds of each part)."""
    cols: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        cols.setdefault(name, []).append(value)

    for r in rows:
        for s in sorted(r):
            if s < skip or s + 1 not in r:
                continue
            a, b = r[s], r[s + 1]
            add("step_s", b["start"] - a["start"])
            add("wait_s", a["wait"])
            add("train_s", a["end"] - a["start"] - a.get("worker_wait_s", 0.0))
            add("train_cpu_s", a["cpu_end"] - a["cpu_start"])
            add("staleness_max", a["staleness_max"])
            if "worker_idle_s" in a:  # free: no window; the worker's CPU time between two batches
                add("gen_s", a["worker_cpu_s"])
                add("gen_cpu_s", a["worker_cpu_s"])
                add("worker_idle_s", a["worker_idle_s"])
            elif "worker_batch_s" in a:
                add("worker_batch_s", a["worker_batch_s"])
                add("worker_window_s", a["worker_window_s"])
                add("gen_s", a["worker_batch_s"] + a["worker_window_s"])
                add("gen_cpu_s", a["worker_cpu_s"])
            else:  # in-process: the next step's rollout runs between this step's end and the next start
                add("gen_s", b["wait"])
                add("gen_cpu_s", b["cpu_start"] - a["cpu_end"])
    out = {k: statistics.median(v) for k, v in cols.items()}
    out["staleness_max"], out["steps"] = max(cols["staleness_max"]), len(cols["step_s"])
    out["hidden"] = 1 - out["wait_s"] / out["gen_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--skip", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS))
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--out", type=Path, default=Path("outputs/workers_bench"))
    p.add_argument("--before", type=Path, default=None,
                   help="a checkout of the code before the workers (git archive <commit>): adds the arm before2")
    args = p.parse_args()
    if args.before is None:
        args.arms = [a for a in args.arms if a != "before2"]
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    start = time.perf_counter()
    results: dict[tuple[str, str], list[dict[int, dict[str, float]]]] = {}
    for rep in range(args.repeats):
        for setting in args.settings:
            for arm in args.arms:
                print(f"repeat {rep}: {setting} / {arm}", flush=True)
                results.setdefault((setting, arm), []).append(run(setting, arm, args.steps, args.out, args.before))
    print(f"\n{args.repeats} repeats x {args.steps} steps (first {args.skip} dropped), "
          f"{time.perf_counter() - start:.0f} s wall; load average at the end {os.getloadavg()[0]:.1f}\n")
    print("| setting | arm | step (s) | wait for batch (s) | generation (s) | hidden | train (s) | CPU s: train / "
          "generation | worker: form batch / window (s), free: idle (s) | speedup vs inproc2 | max staleness |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in args.settings:
        base = summarize(results[(setting, "inproc2")], args.skip)["step_s"] if "inproc2" in args.arms else None
        for arm in args.arms:
            r = summarize(results[(setting, arm)], args.skip)
            worker = (f"{r['worker_batch_s']:.3f} / {r['worker_window_s']:.3f}" if "worker_batch_s" in r else
                      f"idle {r['worker_idle_s']:.3f}" if "worker_idle_s" in r else "-")
            speed = f"{base / r['step_s']:.2f}x" if base else "-"
            print(f"| {setting} | {arm} | {r['step_s']:.3f} | {r['wait_s']:.3f} | {r['gen_s']:.3f} | "
                  f"{100 * r['hidden']:.0f}% | {r['train_s']:.3f} | {r['train_cpu_s']:.3f} / {r['gen_cpu_s']:.3f} | "
                  f"{worker} | {speed} | {r['staleness_max']:.0f} |")

if __name__ == "__main__":
    main()
