"""``python -m bandits async``: the chain prompts under every schedule of the clock, then the
report ``async.md``, ``summary.json`` and ``reward_async.png`` (docs/bandits.md, "Asynchronous
schedules"; the clock's rules: docs/async.md)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from bandits.async_bench import bench_schedule, run_schedule, schedule_config, schedule_summary
from bandits.async_exact import (
    CORRECTIONS, ON_POLICY_TOKENS, exact_async_table, exact_table_markdown, selection_table, selection_table_markdown,
)
from bandits.config import AsyncBenchConfig
from bandits.envs import ChainPromptsEnv
from bandits.problems import PromptedProblem, chain_prompts_problem
from reclight.algorithms import get_algorithm
from reclight.stats import mean_ci


def make_problem(cfg: AsyncBenchConfig) -> tuple[PromptedProblem, torch.Tensor]:
    env = ChainPromptsEnv(cfg.horizons, left_reward=cfg.left_reward, right_reward=cfg.right_reward)
    problem = chain_prompts_problem(env)
    gen = torch.Generator().manual_seed(cfg.seed)
    init = cfg.init_logit_std * torch.randn(cfg.seeds, problem.n_states, 3, generator=gen, dtype=torch.float64)
    return problem, init


def make_schedules(cfg: AsyncBenchConfig) -> dict:
    """The plans of every schedule (exact: lengths depend on the prompts only)."""
    knobs = dict(eta=cfg.max_staleness, max_inflight=cfg.max_inflight, weight_update=cfg.weight_update,
                 recompute_kv_on_update=cfg.recompute_kv_on_update, starve_after=cfg.starve_after, costs=cfg.costs,
                 groups_per_step=cfg.groups_per_step)
    return {name: bench_schedule(schedule_config(name, **knobs), cfg.horizons, cfg.groups_per_step, cfg.group_size,
                                 cfg.steps, cfg.seed) for name in cfg.schedules}


def _ci(values: torch.Tensor) -> dict:
    m, lo, hi = mean_ci(values)
    return {"mean": m, "lo": lo, "hi": hi}


def _cell(x: dict) -> str:
    return f"{x['mean']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}]"


def _delta(x: dict) -> str:
    return f"{x['mean']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}]"


def monte_carlo(cfg: AsyncBenchConfig, problem: PromptedProblem, init: torch.Tensor, plans: dict, log) -> dict:
    """Every (schedule, preset) trained over all seeds; per-seed figures with 95% t-intervals."""
    budget = min(p[-1].train_end for p in plans.values())
    longest = max(range(len(cfg.horizons)), key=lambda p: cfg.horizons[p])
    results, curves = {}, {}
    for preset in cfg.presets:
        algo = get_algorithm(preset)
        for sched, sched_plans in plans.items():
            start = time.perf_counter()
            hist = run_schedule(problem, algo, sched_plans, init, group_size=cfg.group_size, lr=cfg.lr,
                                optimizer=cfg.optimizer, seed=cfg.seed)
            reward = hist["reward/expected"]  # [steps + 1, seeds]
            done = sum(p.train_end <= budget for p in sched_plans)  # steps completed within the budget
            figs = {"final": reward[-1], "auc": reward.mean(0), "at_budget": reward[done],
                    "final_longest": hist["reward/by_prompt"][-1, :, longest]}
            results[(sched, preset)] = figs
            curves[(sched, preset)] = reward.mean(-1)
            log(f"{sched:15s} {preset:18s} {time.perf_counter() - start:5.1f}s  final {figs['final'].mean():.3f}  "
                f"at clock {budget:.0f}: {figs['at_budget'].mean():.3f}")
    rows = []
    for (sched, preset), figs in results.items():
        ref = results[("sync", preset)]
        rows.append({"schedule": sched, "preset": preset, **{k: _ci(v) for k, v in figs.items()},
                     "delta_final": _ci(figs["final"] - ref["final"]),
                     "delta_at_budget": _ci(figs["at_budget"] - ref["at_budget"])})
    return {"rows": rows, "budget": budget, "curves": curves}


def plot(cfg: AsyncBenchConfig, plans: dict, curves: dict, out: Path) -> Path:
    """Expected reward (mean over seeds) against the step and against the clock, first preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preset = cfg.presets[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for sched, sched_plans in plans.items():
        curve = curves[(sched, preset)]
        clock = [0.0] + [p.train_end for p in sched_plans]
        axes[0].plot(range(len(curve)), curve, label=sched)
        axes[1].plot(clock, curve, label=sched)
    for ax, xlabel in zip(axes, ("training step", "simulated clock")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"exact expected reward ({preset})")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = out / "reward_async.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def theory_lines(rows: list[dict], sel: list[dict]) -> list[str]:
    """The identities the exact tables must show, measured."""
    by = {(r["schedule"], r["loss"]): r for r in rows}
    scheds = sorted({r["schedule"] for r in rows})
    same_fixed = max(abs(by[(s, name)]["relerr_fixed"] - by[(s, "plain (rec_oneside_nois)")]["relerr_fixed"])
                     for s in scheds for name in [*CORRECTIONS, ON_POLICY_TOKENS])
    seq_is = max(abs(by[(s, "sequence IS, no cap")]["relerr_trained"] - by[(s, ON_POLICY_TOKENS)]["relerr_trained"])
                 for s in scheds)
    sync = max(by[("sync", name)][f"relerr_{k}"] for name in [*CORRECTIONS, ON_POLICY_TOKENS]
               for k in ("fixed", "trained"))
    pace = [r for r in sel if r["schedule"] == "pace"]
    lines = [
        f"- Fixed snapshots: every behaviour weight is 1, so every correction's row equals the plain row "
        f"(largest difference of relative error {same_fixed:.1e}).",
        f"- Trained snapshots: the sequence-level importance weight without cap gives exactly the gradient of the "
        f"same prompts with on-policy tokens (largest difference {seq_is:.1e}): a behaviour-side correction can at "
        "best remove staleness; the prompt selection's error stays.",
        f"- The synchronous loop is the reference: relative error {sync:.1e} with every loss (on-policy, w = 1).",
    ]
    if pace:
        lines.append(f"- `pace` trains every admitted group: with a fixed normalizer (`seq_mean_token_sum`) its "
                     f"window error is {pace[0]['relerr_seq_mean_token_sum']:.1e}; under `token_mean` it is "
                     f"{pace[0]['relerr_token_mean']:.3f}, from batches of different token counts only.")
    return lines


def run_async_bench(cfg: AsyncBenchConfig, log=print) -> Path:
    """Run the bench and write ``async.md``, ``summary.json`` and the plot into ``cfg.out_dir``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: AsyncBenchConfig, log) -> Path:
    from bandits.report_text import async_header, async_notes

    start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problem, init = make_problem(cfg)
    plans = make_schedules(cfg)
    sync_clock = plans["sync"][-1].train_end
    sched_rows = []
    for name, sched_plans in plans.items():
        summary = schedule_summary(sched_plans, cfg.horizons)
        sched_rows.append({"schedule": name, "speedup": sync_clock / summary["clock"], **summary})
    mc = monte_carlo(cfg, problem, init, plans, log)
    exact_rows, sel_rows = [], []
    if cfg.exact_steps:
        log("exact tables ...")
        window = range(cfg.exact_start, cfg.exact_start + cfg.exact_steps)
        traj = run_schedule(problem, CORRECTIONS["plain (rec_oneside_nois)"], plans["sync"], init[:1],
                            group_size=cfg.group_size, lr=cfg.lr, optimizer=cfg.optimizer, seed=cfg.seed,
                            keep_snapshots=True)["snapshots"]
        traj = [t[0] for t in traj]
        sel_rows = selection_table(problem, plans, traj[0], window, cfg.group_size)
        exact_rows = exact_async_table(problem, plans, traj, window, cfg.group_size)
    png = plot(cfg, plans, mc["curves"], out)
    wall = time.perf_counter() - start
    lines = async_header(cfg, wall)
    lines += ["", "## Schedules (exact: lengths depend on the prompt only, no seeds)", ""]
    lines += schedule_table(cfg, sched_rows)
    lines += ["", f"## Training, {cfg.seeds} seeds (mean and 95% t-interval; Delta: paired difference with `sync`, "
                  "same preset)", "", f"Clock budget = {mc['budget']:.1f} (the shortest schedule's total).", ""]
    lines += training_table(cfg, mc["rows"])
    if exact_rows:
        w0, w1 = cfg.exact_start, cfg.exact_start + cfg.exact_steps - 1
        lines += ["", f"## Which prompts does a schedule train? (exact, steps {w0}-{w1}, every version = theta_0)", ""]
        lines += selection_table_markdown(sel_rows, cfg.horizons)
        lines += ["", f"## Expected gradient against the synchronous loop (exact, sum over steps {w0}-{w1})", ""]
        lines += exact_table_markdown(exact_rows)
        lines += ["", "Read:", ""] + theory_lines(exact_rows, sel_rows)
    lines += ["", "## Plot", "", f"![{png.stem}]({png.name})", "", "## Notes", ""] + async_notes(cfg)
    report = out / "async.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"config": dataclasses.asdict(cfg), "wall_s": wall, "schedules": sched_rows, "training": mc["rows"],
         "budget": mc["budget"], "selection": sel_rows, "exact": exact_rows}, indent=1, default=str))
    log(f"wrote {report} in {wall:.1f}s")
    return report


def schedule_table(cfg: AsyncBenchConfig, rows: list[dict]) -> list[str]:
    longest = max(range(len(cfg.horizons)), key=lambda p: cfg.horizons[p])
    lines = ["| schedule | clock | speedup vs sync | staleness mean / max | versions spanned | discarded | "
             f"starved (max) | share of H={cfg.horizons[longest]} | trained / completed length | idle trainer / "
             "generator |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['schedule']} | {r['clock']:.1f} | {r['speedup']:.2f} | {r['staleness_mean']:.2f} / "
            f"{r['staleness_max']:.0f} | {r['versions_spanned_mean']:.2f} | {r['discarded']:.0f} | "
            f"{r['starved_max']:.0f} | {r['share_by_prompt'][longest]:.3f} | {r['trained_len_mean']:.2f} / "
            f"{r['completed_len_mean']:.2f} | {r['trainer_idle_frac']:.2f} / {r['generator_idle_frac']:.2f} |")
    return lines


def training_table(cfg: AsyncBenchConfig, rows: list[dict]) -> list[str]:
    longest = max(cfg.horizons)
    lines = ["| schedule | preset | final reward | Delta final | reward at clock budget | Delta at budget | "
             f"auc | final reward, H={longest} |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = r["schedule"] == "sync"
        lines.append(f"| {r['schedule']} | {r['preset']} | {_cell(r['final'])} | "
                     f"{'-' if same else _delta(r['delta_final'])} | {_cell(r['at_budget'])} | "
                     f"{'-' if same else _delta(r['delta_at_budget'])} | {_cell(r['auc'])} | "
                     f"{_cell(r['final_longest'])} |")
    return lines


if __name__ == "__main__":  # pragma: no cover
    run_async_bench(AsyncBenchConfig())
