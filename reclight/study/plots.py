"""The study's figures (matplotlib, Agg backend):

- ``claims.png`` (:func:`plot_claims`): a forest plot, one line per claim row: the mean Delta and
  its 95% t interval as a horizontal bar, the margin +-delta dashed, colour = the per-row verdict,
  the Holm-adjusted verdict written at the right of primary rows. A degenerate row (all
  differences equal) is a hollow diamond with no bar; a binary row (``collapsed``) is its counts,
  no bar and no point: the data give no interval there, and the plot draws none.
- ``<setting>.png`` (:func:`plot_settings`): held-out accuracy vs step, one thin line per seed,
  the mean over seeds thick, and a band that is the 95% Student-t interval of that mean over seeds
  (not the min..max); and the clip fraction, entropy and ``kl/init`` (log scale: the stable arms'
  KL is orders of magnitude below a collapsing one's) per step (moving averages, mean over seeds).
  One legend, outside the axes. Colours come from a fixed mapping by arm name (:func:`arm_colors`),
  so an arm keeps its colour in every figure and REINFORCE (red) and REC-OneSide-NoIS (blue),
  the main comparison, never share a hue.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reclight.stats import mean_ci

PANELS = (("clip/frac", "clip fraction"), ("policy/entropy", "policy entropy (nats/token)"),
          ("kl/init", "kl/init (k3 vs the RL-start policy; log scale)"))
SMOOTH = 10
"""Moving-average window (steps) of the per-step panels."""
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#000000", "#393b79", "#e7ba52", "#637939", "#843c39", "#7b4173", "#7f7f7f")
"""A qualitative palette of 16 distinct hues (tab10, then darker ones; no light/dark pairs)."""
ARM_COLORS = {
    "reinforce": "#d62728", "rec_oneside_nois": "#1f77b4", "rec_oneside_is": "#17becf",
    "rec_oneside_nois_wide": "#2ca02c", "rec_oneside_is_wide": "#637939", "rec_twoside_nois": "#ff7f0e",
    "rec_ring_nois": "#9467bd", "opmd": "#8c564b", "asymre": "#e377c2", "red_drop": "#bcbd22",
    "red_weight": "#e7ba52", "grpo": "#000000", "nois_ppo4": "#393b79", "wide_ppo4": "#843c39",
    "decoupled_tis": "#7b4173",
}
"""The study arms' names (the presets' and configs/study/*.yaml's) -> a fixed colour."""
VERDICT_COLORS = {"yes": "#2ca02c", "no": "#d62728", "inconclusive": "#7f7f7f"}
VERDICT_WORDS = {"yes": "holds", "no": "contradicted", "inconclusive": "inconclusive"}


def arm_colors(names: Iterable[str]) -> dict[str, str]:
    """A colour per arm name: ``ARM_COLORS`` where named, else a palette entry chosen by the
    name's CRC32 (stable across settings, runs and machines), moved to the next unused entry if
    another arm of ``names`` already has it."""
    names = list(names)
    out = {n: ARM_COLORS[n] for n in names if n in ARM_COLORS}
    for n in names:
        if n in out:
            continue
        i = zlib.crc32(n.encode()) % len(PALETTE)
        for k in range(len(PALETTE)):  # the first colour not yet used (all used: reuse the hashed one)
            if PALETTE[(i + k) % len(PALETTE)] not in out.values():
                i = (i + k) % len(PALETTE)
                break
        out[n] = PALETTE[i]
    return out


def _moving_average(values: list[float], n: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def _mean_over_seeds(series: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Steps present in every seed's series and the mean value there."""
    if not series:
        return [], []
    common = sorted(set.intersection(*(set(s for s, _ in one) for one in series)))
    maps = [dict(one) for one in series]
    return common, [sum(m[s] for m in maps) / len(maps) for s in common]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scale(rows: list[dict[str, Any]]) -> tuple[list[float], str, bool]:
    """Per-row factor to the x axis, its label, and whether the margins are all at +-1 (rows in
    different units or with different margins: x = Delta / delta)."""
    bars = [r for r in rows if r["test"] != "exact McNemar"]
    kinds = {(r["unit"], r["margin"]) for r in bars}
    if len(kinds) <= 1:
        unit, _ = next(iter(kinds), ("accuracy", 0.0))
        factor = 100.0 if unit == "accuracy" else 1.0
        return [factor] * len(rows), f"Delta = a - b ({'accuracy points' if unit == 'accuracy' else unit})", False
    return [1 / r["margin"] if r["margin"] else 1.0 for r in rows], "Delta / delta (each row's own margin)", True


def plot_claims(rows: list[dict[str, Any]], path: Path) -> Path:
    """The forest plot of every claim row (module docstring) at ``path``."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    n = max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(12, 1.6 + 0.42 * n))
    factors, xlabel, normalized = _scale(rows)
    margins = {r["margin"] * f for r, f in zip(rows, factors) if r["test"] != "exact McNemar"}
    for i, (r, f) in enumerate(zip(rows, factors)):
        y = n - 1 - i
        color = VERDICT_COLORS[r["verdict"]]
        if r["test"] == "exact McNemar":
            n10, n01 = r["discordant"]
            ax.text(0, y, f"{n10} vs {n01} discordant of {r['seeds']} seeds (exact test, no interval)",
                    ha="center", va="center", fontsize=7, color=color, style="italic")
        elif r["test"] == "sign-flip":
            ax.plot(r["mean"] * f, y, "D", mfc="none", mec=color, ms=7)
            ax.annotate(f"all {r['seeds']} equal", (r["mean"] * f, y), xytext=(6, 0), textcoords="offset points",
                        va="center", fontsize=7, color=color)
        elif not math.isnan(r["lo"]):
            ax.plot([r["lo"] * f, r["hi"] * f], [y, y], color=color, lw=2.5, solid_capstyle="butt")
            ax.plot(r["mean"] * f, y, "o", color=color, ms=6)
        elif not math.isnan(r["mean"]):
            ax.plot(r["mean"] * f, y, "o", mfc="none", mec=color, ms=6)
            ax.annotate(f"{r['seeds']} seed(s): no test", (r["mean"] * f, y), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=7, color=color)
        adjusted = r["adjusted_verdict"]
        if r["family"] == "primary":
            ax.text(1.01, y, f"adjusted: {VERDICT_WORDS[adjusted]}", transform=ax.get_yaxis_transform(),
                    va="center", fontsize=8, fontweight="bold", color=VERDICT_COLORS[adjusted])
        else:
            ax.text(1.01, y, "secondary (not adjusted)", transform=ax.get_yaxis_transform(), va="center",
                    fontsize=8, style="italic", color="#555555")
    for m in margins:
        for x in (-m, m):
            ax.axvline(x, color="#444444", ls="--", lw=0.9)
    ax.axvline(0, color="#999999", lw=0.6)
    labels = [f"[{'P' if r['family'] == 'primary' else 'S'}] {r['claim'][:60]} | {r['setting']} ({r['rule']})"
              for r in rows]
    ax.set_yticks(range(n - 1, n - 1 - len(rows), -1), labels, fontsize=7)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(xlabel + ("; dashed: +-1 = the margin" if normalized else "; dashed: +-delta, the margin"))
    ax.set_title("Claims: mean paired Delta and 95% t interval; colour = per-row verdict ([P] primary, [S] secondary)",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], color=c, lw=2.5, marker="o", label=VERDICT_WORDS[v]) for v, c in VERDICT_COLORS.items()]
    handles += [Line2D([], [], ls="none", marker="D", mfc="none", mec="#444444", label="degenerate (all equal)"),
                Line2D([], [], color="#444444", ls="--", label="margin")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_settings(cfg: Any, runs: dict, out: Path) -> list[Path]:
    """Write ``<out>/<setting>.png`` for every setting with at least one complete run."""
    plt = _pyplot()
    color_of = arm_colors(arm.name for arm in cfg.arms)
    paths = []
    for setting in cfg.settings:
        cells = {arm: cell for (s, arm), cell in runs.items() if s == setting.name}
        if not any(r.complete for cell in cells.values() for r in cell.values()):
            continue
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        acc_ax, others = axes[0, 0], [axes[0, 1], axes[1, 0], axes[1, 1]]
        for arm, cell in cells.items():
            done = [r for r in cell.values() if r.complete]
            if not done:
                continue
            color = color_of[arm]
            steps = [s for s, _ in done[0].evals]
            accs = [[100 * a for a in r.acc] for r in done]
            for acc in accs:
                acc_ax.plot(steps, acc, color=color, lw=0.6, alpha=0.45)
            bands = [mean_ci(col) for col in zip(*accs)]
            acc_ax.plot(steps, [m for m, _, _ in bands], color=color, lw=2.0, label=f"{arm} ({len(done)} seeds)")
            if len(done) > 1:
                acc_ax.fill_between(steps, [lo for _, lo, _ in bands], [hi for _, _, hi in bands], color=color,
                                    alpha=0.15, lw=0)
            for ax, (key, _) in zip(others, PANELS):
                xs, ys = _mean_over_seeds([r.series.get(key, []) for r in done])
                if xs:
                    ax.plot(xs, _moving_average(ys, SMOOTH), color=color, lw=1.2)
        acc_ax.set_ylabel("held-out greedy accuracy (%)")
        fig.suptitle(f"{cfg.name} / {setting.name} ({setting.describe()}): thin = one seed, thick = mean, "
                     "band = 95% t interval over seeds", fontsize=10)
        for ax, (key, label) in zip(others, PANELS):
            ax.set_ylabel(label)
            if key == "kl/init":
                ax.set_yscale("log", nonpositive="mask")
        for ax in axes.flat:
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        handles, labels = acc_ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="arm",
                   frameon=False)
        fig.tight_layout()
        path = Path(out) / f"{setting.name}.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
