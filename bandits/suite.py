"""``python -m bandits claims``: run every (env, preset) over all settings, then write the
markdown report, ``summary.json`` and one reward-vs-step PNG per setting."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from bandits.claims import evaluate, paper_claims, theory_checks
from bandits.config import ClaimsConfig
from bandits.problems import TabularProblem, bandit_problem, chain_problem
from bandits.simulate import RunResult, run_preset
from reclight.algorithms import get_algorithm
from reclight.stats import LEVEL, adjust_family, count_line, count_verdicts, mean_ci, t_quantile
from reclight.sync import resolve_setting


def make_problem(cfg: ClaimsConfig, env: str) -> tuple[TabularProblem, torch.Tensor]:
    """The batched problem of ``env`` and the initial logits [seeds, S, A] (seeded)."""
    seeds = [cfg.seed + n for n in range(cfg.seeds)]
    if env == "bandit":
        b = cfg.bandit
        problem, std = bandit_problem(b.n_contexts, b.n_arms, seeds, b.reward_noise), b.init_logit_std
    else:
        problem, std = chain_problem(cfg.chain.make_env(), cfg.chain.groups_per_step), cfg.chain.init_logit_std
    generator = torch.Generator().manual_seed(cfg.seed)
    init = std * torch.randn(cfg.seeds, problem.n_states, problem.n_actions, generator=generator,
                             dtype=torch.float64)
    return problem, init


def run_all(cfg: ClaimsConfig, log=print) -> dict[tuple[str, str], RunResult]:
    """Every (env, preset) cell, all settings and seeds batched; logs one line per run."""
    settings = {name: resolve_setting(name, cfg.steps) for name in cfg.settings}
    results: dict[tuple[str, str], RunResult] = {}
    total, done = len(cfg.envs) * len(cfg.presets), 0
    # the U > 1 on-policy cell only where a claim reads it (4 updates per step cost ~4 one-update steps)
    multi_presets = {p for c in paper_claims(cfg.envs, cfg.settings, cfg.presets, cfg.multi_setting)
                     if c.setting_a == cfg.multi_setting for p in (c.preset_a, c.preset_b)}
    for env in cfg.envs:
        problem, init = make_problem(cfg, env)
        for preset in cfg.presets:
            start = time.perf_counter()
            res = run_preset(problem, get_algorithm(preset), preset, settings, init, steps=cfg.steps,
                             group_size=cfg.group_size, lr=cfg.lr, optimizer=cfg.optimizer, seed=cfg.seed)
            if preset in multi_presets:  # on-policy again, U > 1 updates per batch: one more column
                multi = run_preset(problem, get_algorithm(preset), preset, {cfg.multi_setting: settings["on_policy"]},
                                   init, steps=cfg.steps, group_size=cfg.group_size, lr=cfg.lr,
                                   optimizer=cfg.optimizer, seed=cfg.seed, epochs=cfg.multi_epochs,
                                   mini_batches=cfg.multi_mini_batches)
                res = RunResult(preset, res.problem, res.settings + multi.settings,
                                {k: torch.cat([v, multi.history[k]], 1) for k, v in res.history.items()})
            results[(env, preset)] = res
            done += 1
            final = res.history["reward/expected"][-1].mean(-1)
            finals = " ".join(f"{s}={v:.3f}" for s, v in zip(res.settings, final.tolist()))
            log(f"[{done:>2}/{total}] {env:6s} {preset:22s} {time.perf_counter() - start:5.1f}s  final reward: {finals}")
    return results


def _fmt(x: float) -> str:
    return "-" if isinstance(x, float) and math.isnan(x) else f"{x:+.4f}"


def _ci(row: dict) -> str:
    if isinstance(row["seeds"], str):
        return "exact"
    if row.get("test") == "sign-flip":
        return "none (degenerate)"
    return "-" if math.isnan(row["lo"]) else f"[{row['lo']:+.4f}, {row['hi']:+.4f}]"


def _p(row: dict, key: str) -> str:
    x = row.get(key)
    return "-" if x is None or isinstance(row["seeds"], str) else (f"{x:.2g}" if x < 0.001 else f"{x:.3f}")


VERDICT_CELL = {"yes": "yes", "no": "**no**", "inconclusive": "inconclusive"}
"""How each verdict is printed in the table: contradicted rows stand out in bold."""


def claims_table(rows: list[dict]) -> list[str]:
    lines = ["| claim | setting | measured | rule | mean | 95% CI | p_holds | p_contradicted | seeds | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r['mean']:.3g}" if r["rule"] == "exact" else _fmt(r["mean"])
        cell = VERDICT_CELL[r["verdict"]] + (f" ({r['why']})" if r.get("why") else "")
        lines.append(f"| {r['claim']} | {r['setting']} | {r['measured']} | {r['rule']} | {value} | "
                     f"{_ci(r)} | {_p(r, 'p_holds')} | {_p(r, 'p_contradicted')} | {r['seeds']} | {cell} |")
    return lines


def results_matrix(cfg: ClaimsConfig, results: dict, env: str) -> list[str]:
    """Final expected reward (mean +- 95% half-width), final entropy and mean clip fraction."""
    columns = max((results[(env, p)].settings for p in cfg.presets), key=len)
    lines = ["| preset | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for preset in cfg.presets:
        res = results[(env, preset)]
        cells = []
        for i, _ in enumerate(res.settings):
            m, lo, _hi = mean_ci(res.history["reward/expected"][-1, i])
            ent = res.history["policy/entropy"][-1, i].mean().item()
            clip = res.history["clip/frac"][:, i].mean().item()
            cells.append(f"{m:.3f} ± {m - lo:.3f} (H {ent:.2f}, clip {clip:.2f})")
        cells += ["-"] * (len(columns) - len(cells))  # a cell this preset was not run in
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    return lines


def plot_settings(cfg: ClaimsConfig, results: dict, out: Path) -> list[Path]:
    """One PNG per setting: expected reward vs step, one panel per env, one line per preset
    (mean over seeds, shaded 95% t-interval of the mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = plt.get_cmap("tab20")
    t = t_quantile((1 + LEVEL) / 2, cfg.seeds - 1)
    columns = max((res.settings for res in results.values()), key=len)
    for si, setting in enumerate(columns):
        fig, axes = plt.subplots(1, len(cfg.envs), figsize=(6.5 * len(cfg.envs), 4.5), squeeze=False)
        for ax, env in zip(axes[0], cfg.envs):
            for pi, preset in enumerate(cfg.presets):
                if setting not in results[(env, preset)].settings:
                    continue
                curve = results[(env, preset)].history["reward/expected"][:, si]  # [steps+1, seeds]
                mean, sem = curve.mean(-1), curve.std(-1) / math.sqrt(curve.shape[-1])
                steps = torch.arange(curve.shape[0])
                ax.plot(steps, mean, color=colors(pi % 20), lw=1.2, label=preset)
                ax.fill_between(steps, mean - t * sem, mean + t * sem, color=colors(pi % 20), alpha=0.15)
            ax.set_title(f"{env} / {setting}")
            ax.set_xlabel("training step")
            ax.set_ylabel("exact expected reward")
            ax.grid(alpha=0.3)
        axes[0, -1].legend(fontsize=7, loc="lower right", ncol=2)
        fig.tight_layout()
        path = out / f"reward_{setting}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def run_claims(cfg: ClaimsConfig, log=print) -> Path:
    """Run the suite and write ``claims.md``, ``summary.json`` and PNGs into ``cfg.out_dir``.
    Returns the report path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and the CPU is shared)
    try:
        return _run_claims(cfg, log)
    finally:
        torch.set_num_threads(threads)  # do not leak the setting into the caller's process


def _run_claims(cfg: ClaimsConfig, log) -> Path:
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log("theory checks (exact, 3-arm counterexample) ...")
    rows = theory_checks()
    results = run_all(cfg, log)
    claims = paper_claims(cfg.envs, cfg.settings, cfg.presets, cfg.multi_setting)
    rows = adjust_family(rows + [evaluate(c, results, cfg.margin) for c in claims])
    plots = plot_settings(cfg, results, out)
    wall = time.perf_counter() - start
    report = out / "claims.md"
    report.write_text("\n".join(render(cfg, rows, results, plots, wall)) + "\n")
    summary = {"config": _config_dict(cfg), "wall_s": wall, "counts": count_verdicts(rows),
               "counts_line": count_line(rows), "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for r in rows:
        if r["verdict"] == "no":
            log(f"contradicted: {r['claim']} | {r['setting']} | {r['rule']} {_fmt(r['mean'])} {_ci(r)}")
    log(f"{count_line(rows)} rows; wrote {report} and {len(plots)} plots in {wall:.1f}s")
    return report


def _config_dict(cfg: ClaimsConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def kl_section() -> list[str]:
    """The exact estimator table of docs/algorithms.md section 6.3 (``bandits.kl_table``), with how to read it."""
    from bandits.kl_table import kl_estimator_table, kl_table_markdown

    return [
        "Expected gradient of each KL estimator of `reclight.losses.kl_terms` (the trainer's reference-KL "
        "term), enumerated over the 6 arms of one random context (float64; pi, ref and the behaviour "
        "policy mu drawn independently), against the exact gradients of KL(pi||ref) and KL(ref||pi). "
        "Cosine 1 and relative error 0: the estimator's gradient IS that KL's gradient.",
        "",
        *kl_table_markdown(kl_estimator_table()),
        "",
        "Read: on-policy (or importance-weighted) k1's expected gradient is zero, k2's is grad KL(pi||ref) "
        "and k3's is grad KL(ref||pi), the reverse KL, not the KL it estimates; on off-policy samples "
        "without the weight none of them follows either KL (docs/llm.md, 'Which KL').",
    ]


def correction_section() -> list[str]:
    """The exact rollout-correction table of docs/algorithms.md section 6.8 (``bandits.correction_table``)."""
    from bandits.correction_table import correction_table, correction_table_markdown, reading

    return [
        "Expected gradient of each rollout correction of `reclight.losses.policy_loss`, enumerated exactly "
        "(every trajectory, reward and group composition; float64) on one chain walk (5 positions, T = 4, "
        "K = 8), at a trained point, against the on-policy gradient. Behaviours fixed before comparing: "
        "`engine` = logit noise scaled to a mean per-token gap of 5e-3 (the bf16 engine's), `lag 1` / "
        "`lag 10` = the policy 1 / 10 Adam updates earlier, `top-p 0.9` = the nucleus-truncated policy "
        "with the untruncated log-probs recorded.",
        "",
        *correction_table_markdown(correction_table()),
        "",
        *reading(),
    ]


def render(cfg: ClaimsConfig, rows: list[dict], results: dict, plots: list[Path], wall: float) -> list[str]:
    """The markdown report (see docs/bandits.md for how to read it)."""
    from bandits.report_text import header, notes

    seeded = [r for r in rows if r["family"] == "primary"]
    lines = header(cfg, wall, count_line(rows), count_line(seeded, "adjusted_verdict"))
    lines += ["", "## Claims", ""] + claims_table(rows)
    for env in cfg.envs:
        lines += ["", f"## Final expected reward, {env} (mean ± 95% half-width; final entropy H; "
                      "mean clip fraction)", ""] + results_matrix(cfg, results, env)
    lines += ["", "## Which KL does each estimator's gradient follow? (exact, no seeds)", ""] + kl_section()
    lines += ["", "## Which rollout correction recovers the on-policy gradient? (exact, no seeds)", ""]
    lines += correction_section()
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Notes", ""] + notes(cfg)
    return lines


if __name__ == "__main__":  # pragma: no cover
    run_claims(ClaimsConfig(), log=lambda s: print(s, file=sys.stderr))
