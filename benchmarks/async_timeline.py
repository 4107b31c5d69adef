"""A picture of the asynchronous schedule: the simulated clock's events of a short LLM run, drawn.

    python benchmarks/async_timeline.py --config configs/arithmetic.yaml [fit overrides] --steps 6 \\
        --out docs/img/async_timeline.png [--panel "OVERRIDES" ...]

Each panel is one short ``reclight fit`` with ``model.clock.enabled true`` (the arguments, then
the panel's overrides), run in this process through the trainer's real CLI; a callback sets
``clock.events = []`` on the run's asynchronous rollout queue at ``on_train_start``, so the clock
records every event (publish, swap, admit, decode, retire, discard, train, idle: docs/async.md).
Without ``--panel`` there is one panel, of the arguments as given.

What a panel shows, on the clock's time axis (the cost unit of ``model.clock.costs``: seconds
once calibrated with ``reclight calibrate``):

- one row per group, by admission index n (the first admitted on top): a bar from its admission
  to its completion, in segments coloured by the policy version that sampled those tokens (a
  swap in mid-flight starts a new segment); the step that trained it written at its end (none:
  still waiting when the run stopped), a cross where the staleness rule dropped it (the bar
  hatched), a faded bar for a group still in flight when the run stopped;
- the trainer on the top row: each step a span from the moment its batch was formed to the end of
  its training, coloured by the version it trains (theta_s); dotted lines where version s + 1 is
  published.

Two panels run the warm-up once: the second and later ones start RL from the first one's warmed
weights (``model.warmup`` null and the weights copied in at ``on_fit_start``; the warm-up is
deterministic, so the weights are the ones a warm-up of their own would give).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
QUIET = ("--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar",
         "false", "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0")
"""No files, no validation: the run exists for its clock events."""


class Recorder(pl.Callback):
    """Turns the clock's event record on, and (optionally) starts RL from given weights."""

    def __init__(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        self.weights = weights
        self.queue: Any = None
        self.warmed: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.weights is not None:  # before the module's own on_fit_start builds the engine from them
            module.policy.load_state_dict(self.weights)

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        from reclight.rollout.async_queue import AsyncRolloutQueue

        if not isinstance(module.rollouts, AsyncRolloutQueue):
            raise ValueError("model.clock.enabled=false is not valid here; accepted: true (the timeline draws the "
                             "asynchronous schedule's clock)")
        self.queue = module.rollouts
        self.queue.clock.events = []
        self.warmed = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def run_panel(args: list[str], steps: int, weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """One short fit; returns its events, settings and the policy weights RL started from."""
    from lightning.pytorch.cli import SaveConfigCallback

    from reclight.trainer.cli import main as cli_main

    extra = ["--model.warmup", "null"] if weights is not None else []
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the CLI reads these args, not this script's
        cli = cli_main([*args, *extra, *QUIET, "--trainer.max_steps", str(steps)], run=False)
    trainer = cli.trainer
    trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, SaveConfigCallback)]
    rec = Recorder(weights)
    trainer.callbacks.append(rec)
    start = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    clock = rec.queue.clock
    return {"events": list(clock.events), "cfg": clock.cfg, "B": clock.B, "K": clock.K, "weights": rec.warmed,
            "seconds": time.perf_counter() - start, "max_new_tokens": cli.model.sampling.max_new_tokens}


# -- from events to bars ---------------------------------------------------------------------------
def group_bars(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per admission index n: ``admitted``, ``end`` (completion, or None while in flight), ``segments``
    [(start, version)] (a new one where the version of its tokens changes), ``tokens`` per version,
    ``trained`` (step or None), ``dropped`` (time or None)."""
    groups: dict[int, dict[str, Any]] = {}
    for e in events:
        kind = e["kind"]
        if kind == "admit":
            groups[e["n"]] = {"admitted": e["t"], "end": None, "segments": [], "tokens": {}, "trained": None,
                              "dropped": None}
        elif kind == "decode":
            for n in e["groups"]:
                g = groups[n]
                if not g["segments"] or g["segments"][-1][1] != e["version"]:
                    g["segments"].append((g["admitted"] if not g["segments"] else e["t"], e["version"]))
                g["tokens"][e["version"]] = g["tokens"].get(e["version"], 0) + 1
        elif kind == "retire":
            groups[e["n"]]["end"] = e["t"]
        elif kind == "train":
            for n in e["groups"]:
                groups[n]["trained"] = e["step"]
        elif kind == "discard":
            groups[e["n"]]["dropped"] = e["t"]
    return groups


def label(panel: dict[str, Any]) -> str:
    c = panel["cfg"]
    eta = "unbounded" if c.eta is None else c.eta
    rule = "no bound" if c.staleness == "none" else f"{c.staleness}, eta = {eta}"
    update = c.weight_update + (", KV re-prefilled" if c.recompute_kv_on_update else "")
    if c.weight_update == "inflight" and not c.recompute_kv_on_update:
        update += ", KV kept"
    return (f"{rule}; weight update {update}; B = {panel['B']} groups of K = {panel['K']}, "
            f"{c.max_inflight} slots")


def cost_line(panel: dict[str, Any]) -> str:
    c = panel["cfg"].costs
    return (f"costs: decoding step {c.decode_a:.3g} + {c.decode_b:.3g} x rows, prefill {c.prefill_b:.3g} per prompt "
            f"token, swap {c.sync_cost:.3g}, training step {c.train_c:.3g} + {c.train_e:.3g} x tokens")


def draw(panels: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    versions = sorted({e["version"] for p in panels for e in p["events"] if e["kind"] in ("decode", "publish")})
    cmap = plt.get_cmap("tab10")

    def colour(v: int) -> Any:
        return cmap(v % 10)

    rows = [len(group_bars(p["events"])) + 2 for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 1.4 + sum(0.17 * r + 0.6 for r in rows)),
                             gridspec_kw={"height_ratios": rows}, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        events = panel["events"]
        bars = group_bars(events)
        horizon = max(max(e.get("end", e["t"]) for e in events), max(e["t"] for e in events))
        height = 0.72
        for n, g in bars.items():
            y = n + 2
            end = g["end"] if g["end"] is not None else horizon
            alpha = 1.0 if g["end"] is not None else 0.35
            starts = [s for s, _ in g["segments"]] + [end]
            for (s, v), stop in zip(g["segments"], starts[1:]):
                ax.barh(y, stop - s, left=s, height=height, color=colour(v), alpha=alpha,
                        hatch="////" if g["dropped"] is not None else None, edgecolor="white", linewidth=0.4)
            if g["dropped"] is not None:
                ax.plot(g["dropped"], y, marker="x", color="crimson", markersize=7, mew=2)
            elif g["trained"] is not None:
                ax.text(end, y, f" s{g['trained']}", va="center", ha="left", fontsize=6.5, color="0.25")
        for e in events:
            if e["kind"] == "train":
                ax.barh(0, e["end"] - e["t"], left=e["t"], height=0.8, color=colour(e["step"]), edgecolor="black",
                        linewidth=0.6)
                ax.text((e["t"] + e["end"]) / 2, 0, f"step {e['step']}", ha="center", va="center", fontsize=7)
            elif e["kind"] == "publish" and e["version"] > 0:
                ax.axvline(e["t"], color="0.55", linestyle=":", linewidth=0.8, zorder=0)
        n_max = max(bars) if bars else 0
        ax.set_ylim(n_max + 2.8, -0.8)
        ticks = [0] + [n + 2 for n in range(0, n_max + 1, max(1, (n_max + 1) // 12))]
        ax.set_yticks(ticks, ["trainer"] + [f"n={t - 2}" for t in ticks[1:]], fontsize=7)
        ax.set_xlim(0, horizon * 1.03)
        ax.set_xlabel("simulated clock (the unit of model.clock.costs: seconds once calibrated)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        dropped = sum(1 for g in bars.values() if g["dropped"] is not None)
        spanning = sum(1 for g in bars.values() if len(g["segments"]) > 1)
        ax.set_title(f"{label(panel)}: {len(bars)} groups admitted, {spanning} span two versions or more, "
                     f"{dropped} dropped\n{cost_line(panel)}", fontsize=8.5, loc="left")
        ax.grid(axis="x", color="0.92", zorder=0)
        ax.set_axisbelow(True)
    handles = [Patch(color=colour(v), label=f"version {v}") for v in versions]
    handles += [Line2D([], [], color="crimson", marker="x", linestyle="", mew=2, label="dropped (staleness rule)"),
                Patch(facecolor=colour(0), alpha=0.35, label="still in flight at the end"),
                Line2D([], [], color="0.55", linestyle=":", label="new version published"),
                Line2D([], [], color="none", label="s3: trained at step 3 (no label: waiting at the end)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7.5, frameon=False)
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.045, 1, 0.985))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Every other argument goes to `reclight fit` (--config FILE, overrides).")
    p.add_argument("--steps", type=int, default=6, help="training steps per panel (default 6)")
    p.add_argument("--out", default=str(ROOT / "docs/img/async_timeline.png"))
    p.add_argument("--panel", action="append", default=None,
                   help="one panel's extra overrides, quoted (repeatable; default: one panel as given)")
    p.add_argument("--title", default="The asynchronous schedule on the simulated clock")
    p.add_argument("--events", default=None, help="also write every panel's settings and events to this JSON file")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    base = [*rest, "--model.clock.enabled", "true"]
    panels, weights = [], None
    for extra in args.panel or [""]:
        panel = run_panel([*base, *shlex.split(extra)], args.steps, weights)
        weights = panel["weights"]
        panels.append(panel)
        print(f"panel {label(panel)}: {len(panel['events'])} events, {panel['seconds']:.0f} s", file=sys.stderr)
    draw(panels, Path(args.out), args.title)
    if args.events:
        import json

        Path(args.events).write_text(json.dumps([{"label": label(p), "costs": cost_line(p), "events": p["events"]}
                                                 for p in panels]))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
