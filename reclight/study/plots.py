"""One PNG per setting: held-out accuracy vs step (one line per arm, mean over seeds, band =
min..max over seeds), and the clip fraction, entropy and ``kl/init`` per step (moving averages,
mean over seeds). Colours follow the arm's position in the study, so an arm has the same colour
in every setting's figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = (("clip/frac", "clip fraction"), ("policy/entropy", "policy entropy (nats/token)"),
          ("kl/init", "kl/init (k3 vs the RL-start policy)"))
SMOOTH = 10
"""Moving-average window (steps) of the per-step panels."""


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


def plot_settings(cfg: Any, runs: dict, out: Path) -> list[Path]:
    """Write ``<out>/<setting>.png`` for every setting with at least one complete run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20")
    color_of = {arm.name: colors(i % 20) for i, arm in enumerate(cfg.arms)}
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
            steps = [s for s, _ in done[0].evals]
            accs = [[100 * a for a in r.acc] for r in done]
            mean = [sum(col) / len(col) for col in zip(*accs)]
            acc_ax.plot(steps, mean, color=color_of[arm], lw=1.4, label=f"{arm} ({len(done)})")
            acc_ax.fill_between(steps, [min(c) for c in zip(*accs)], [max(c) for c in zip(*accs)],
                                color=color_of[arm], alpha=0.12)
            for ax, (key, _) in zip(others, PANELS):
                xs, ys = _mean_over_seeds([r.series.get(key, []) for r in done])
                if xs:
                    ax.plot(xs, _moving_average(ys, SMOOTH), color=color_of[arm], lw=1.1)
        acc_ax.set_ylabel("held-out greedy accuracy (%)")
        acc_ax.set_title(f"{cfg.name} / {setting.name} ({setting.describe()})")
        acc_ax.legend(fontsize=7, loc="lower right", ncol=2, title="arm (seeds)", title_fontsize=7)
        for ax, (_, label) in zip(others, PANELS):
            ax.set_ylabel(label)
        for ax in axes.flat:
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(out) / f"{setting.name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
