"""``reclight study report DIR``: aggregate the run folders of a study, whoever ran them, into
``report.md``, ``summary.json``, the forest plot ``claims.png`` and one PNG per setting.

A run is read from its own files only (``runs/<setting>/<arm>/seed<S>/logs/metrics.csv`` and
``logs/config.yaml``): the held-out accuracy ``val/acc`` at RL step 0 (logged at the start of
RL) and then every ``trainer.val_check_interval`` steps, and the per-step ``clip/frac``,
``policy/entropy``, ``kl/init``. A run is complete when it has all ``1 + max_steps /
val_check_interval`` evaluations; incomplete or missing runs are listed and left out of the
statistics (a claim row then has fewer paired seeds, and below ``reclight.stats.MIN_SEEDS`` no
verdict).

Per-seed statistics of an accuracy curve a_0 (step 0), a_1, ..., a_n (``STATISTICS`` in
:mod:`reclight.study.config`): ``final`` (mean of the last ``last_evals`` of a_1..a_n), ``auc``
(mean of a_1..a_n), ``early`` (mean of the a_k at steps in (0, max_steps / 4]), ``drawdown``
(max_k of max_{j<=k} a_j - a_k), ``collapsed`` (1 if final < collapse_floor). A claim row is the
paired difference over the seeds both cells completed and its tests
(:func:`reclight.stats.paired_test`: a t-test, an exact sign-flip test for a degenerate sample,
an exact McNemar test for the binary ``collapsed``); the rows of primary claims are then
Holm-adjusted as one family (:func:`reclight.stats.adjust_family`). The report's headline counts
are the adjusted verdicts of the primary family; "Power" gives each primary row's half-width,
smallest detectable effect and the rows this scale cannot decide; ``claims.png`` is the forest
plot of every row (:mod:`reclight.study.plots`).

Each run folder's ``samples.jsonl`` (what the policy generated, written by the trainer every
``model.monitor.samples_every`` steps) is linked per arm, with two samples quoted
(:func:`samples_section`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reclight.stats import (ALPHA, FAMILIES, LEVEL, MAX_SEEDS_SEARCHED, MIN_SEEDS, POWER, adjust_family, count_line,
                            count_verdicts, mean_ci, paired_test, rules_table)
from reclight.study.config import BINARY_STATISTICS, STATISTICS, StudyConfig, claim_cells, load_study
from reclight.study.plan import LOGS, run_folder, warmup_folder

SERIES = ("clip/frac", "policy/entropy", "kl/init", "reward/mean", "response/len_mean", "rollout/staleness_mean")
"""Per-step training metrics kept for the plots and the cell table."""
STUDY_FILE = "study.yaml"
SAMPLES_FILE = "samples.jsonl"
"""The run folder's samples, as ``reclight.trainer.samples.SAMPLES_FILE`` names them (not imported:
the report reads files and needs no torch; a test checks the two agree)."""
QUOTED = 2
"""Samples quoted per arm in report.md."""
CLAIMS_PLOT = "claims.png"
"""The forest plot of every claim row, in the study folder."""


@dataclass
class RunData:
    """What one run folder holds."""

    folder: Path
    evals: list[tuple[int, float]] = field(default_factory=list)
    """(RL step, val/acc): step 0, then every val_check_interval steps."""
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    max_steps: int | None = None
    val_check_interval: int | None = None

    @property
    def complete(self) -> bool:
        if not self.max_steps or not self.val_check_interval:
            return False
        return len(self.evals) == 1 + self.max_steps // self.val_check_interval

    @property
    def acc(self) -> list[float]:
        return [a for _, a in self.evals]

    @property
    def samples(self) -> Path | None:
        """The run's ``samples.jsonl``, where it has one."""
        path = self.folder / LOGS / SAMPLES_FILE
        return path if path.is_file() else None


def _float(x: str | None) -> float | None:
    if x is None or x == "":
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def read_run(folder: Path) -> RunData:
    """Read one run folder (missing files give an empty, incomplete :class:`RunData`)."""
    import yaml

    run = RunData(Path(folder))
    logs = Path(folder) / LOGS
    try:
        conf = yaml.safe_load((logs / "config.yaml").read_text())
        run.max_steps = int(conf["trainer"]["max_steps"])
        run.val_check_interval = int(conf["trainer"]["val_check_interval"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return run
    try:
        with open(logs / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return run
    acc = [_float(r.get("val/acc")) for r in rows]
    # The first val/acc row is the start of RL (logged at step 0); the k-th periodic one is the
    # evaluation after k * val_check_interval steps.
    run.evals = [(k * run.val_check_interval, a) for k, a in enumerate(a for a in acc if a is not None)]
    for key in SERIES:
        run.series[key] = [(int(r["step"]), v) for r in rows if r.get("reward/mean") and (v := _float(r.get(key)))
                           is not None]
    return run


def run_statistics(run: RunData, cfg: StudyConfig) -> dict[str, float]:
    """Every statistic of ``STATISTICS`` for one complete run."""
    a = run.acc
    periodic = a[1:] or a
    final = statistics.fmean(periodic[-cfg.last_evals:])
    quarter = [acc for step, acc in run.evals[1:] if step <= run.max_steps / 4] or periodic[:1]
    best, drop = -math.inf, 0.0
    for x in a:
        best = max(best, x)
        drop = max(drop, best - x)
    def series_mean(key: str) -> float:
        values = [v for _, v in run.series.get(key, [])]
        return statistics.fmean(values) if values else math.nan

    return {"final": final, "auc": statistics.fmean(periodic), "early": statistics.fmean(quarter),
            "drawdown": drop, "collapsed": float(final < cfg.collapse_floor), "before": a[0],
            "len_trained": series_mean("response/len_mean"), "staleness": series_mean("rollout/staleness_mean")}


def _tail_mean(points: list[tuple[int, float]], n: int = 20) -> float:
    """Mean of the values logged in the last ``n`` steps (a series measured every k steps, as
    ``kl/init`` by default, has ``n / k`` of them there)."""
    if not points:
        return math.nan
    last = points[-1][0]
    return statistics.fmean(v for s, v in points if s > last - n)


def collect(cfg: StudyConfig) -> dict[tuple[str, str], dict[int, RunData]]:
    """``{(setting, arm): {seed: RunData}}`` for every planned run folder."""
    return {(s, a): {seed: read_run(run_folder(cfg, s, a, seed)) for seed in cfg.seeds} for s, a in cfg.cells()}


def claim_rows(cfg: StudyConfig, runs: dict[tuple[str, str], dict[int, RunData]]) -> list[dict[str, Any]]:
    """One row per claim and setting: the paired differences, their test and verdict
    (:func:`reclight.stats.paired_test`), then the family's adjusted verdict
    (:func:`reclight.stats.adjust_family`)."""
    rows = []
    for claim in cfg.claims:
        binary = claim.statistic in BINARY_STATISTICS
        margin = 0.0 if binary else (cfg.margin if claim.margin is None else claim.margin)
        for (arm_a, set_a), (arm_b, set_b) in claim_cells(cfg, claim):
            cell_a, cell_b = runs[(set_a, arm_a)], runs[(set_b, arm_b)]
            seeds = [s for s in cfg.seeds if cell_a[s].complete and cell_b[s].complete]
            deltas = [run_statistics(cell_a[s], cfg)[claim.statistic] - run_statistics(cell_b[s], cfg)[claim.statistic]
                      for s in seeds]
            left, right = (arm_a, arm_b) if arm_a != arm_b else (set_a, set_b)
            setting = set_a if set_a == set_b else f"{set_a} vs {set_b}"
            row = {"claim": claim.text, "family": claim.family, "setting": setting, "statistic": claim.statistic,
                   "unit": RAW_UNITS.get(claim.statistic, "accuracy"),
                   "measured": f"{claim.statistic}({left}) - {claim.statistic}({right})", "rule": claim.rule,
                   "a": f"{arm_a}@{set_a}", "b": f"{arm_b}@{set_b}", "paired_seeds": seeds, "deltas": deltas,
                   "margin": margin, **paired_test(claim.rule, deltas, margin, binary=binary)}
            if binary:
                n10, n01 = row["discordant"]
                row["counts"] = (f"{left} {claim.statistic}, {right} not: {n10} of {len(seeds)} seeds; "
                                 f"reverse: {n01}")
            rows.append(row)
    return adjust_family(rows)


def cell_summary(cfg: StudyConfig, cell: dict[int, RunData]) -> dict[str, Any]:
    done = [r for r in cell.values() if r.complete]
    per_seed = {s: run_statistics(r, cfg) for s, r in cell.items() if r.complete}
    out: dict[str, Any] = {"seeds_complete": len(done), "per_seed": per_seed}
    for key in list(STATISTICS) + ["before"]:
        values = [p[key] for p in per_seed.values() if not math.isnan(p[key])]  # a metric a run did not log: none
        out[key] = mean_ci(values) if values else (math.nan, math.nan, math.nan)
    out["clip_frac"] = statistics.fmean(v for r in done for _, v in r.series["clip/frac"]) if done else math.nan
    for key, name in (("policy/entropy", "entropy_last20"), ("kl/init", "kl_init_last20")):
        out[name] = statistics.fmean(_tail_mean(r.series[key]) for r in done) if done else math.nan
    return out


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}"


VERDICT_CELL = {"yes": "holds", "no": "**contradicted**", "inconclusive": "inconclusive",
                "not adjusted": "not adjusted"}


RAW_UNITS = {"len_trained": "tokens", "staleness": "steps"}
"""Statistics reported in their own units (the others in accuracy points, x 100)."""


def _fmt(row: dict[str, Any], x: float, signed: bool = True) -> str:
    """A difference of ``row``'s statistic: accuracy points (x 100, one decimal) or its own units."""
    if x is None or math.isnan(x):
        return "-"
    if row.get("statistic") in RAW_UNITS:
        return f"{x:+.2f}" if signed else f"{x:.2f}"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _p(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2g}" if x < 0.001 else f"{x:.3f}")


def _interval(r: dict[str, Any]) -> str:
    if r["test"] == "exact McNemar":
        return "none (binary: exact test)"
    if r["test"] == "sign-flip":
        return "none (degenerate)"
    return "-" if math.isnan(r["lo"]) else f"[{_fmt(r, r['lo'])}, {_fmt(r, r['hi'])}]"


def claims_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows; differences and intervals in accuracy points (x 100), or in the statistic's
    own units (``RAW_UNITS``: tokens, steps); a binary statistic as counts."""
    lines = ["| claim | family | setting | statistic (Delta = a - b) | rule | mean Delta | 95% CI | seeds | p_holds | "
             "p_contradicted | verdict | adjusted verdict (Holm) |", "|---" * 12 + "|"]
    for r in rows:
        unit = RAW_UNITS.get(r.get("statistic", ""))
        verdict = VERDICT_CELL[r["verdict"]] + (f" ({r['why']})" if r["why"] else "")
        measured = r["measured"] + (f" ({unit}; margin {r['margin']:g})" if unit else "")
        mean = r["counts"] if "counts" in r else _fmt(r, r["mean"])
        adjusted = VERDICT_CELL[r["adjusted_verdict"]]
        if r["family"] == "primary":
            adjusted += f" (p {_p(r['p_holds_adjusted'])} / {_p(r['p_contradicted_adjusted'])})"
        lines.append(f"| {r['claim']} | {r['family']} | {r['setting']} | {measured} | {r['rule']} | {mean} | "
                     f"{_interval(r)} | {r['seeds']} | {_p(r['p_holds'])} | {_p(r['p_contradicted'])} | {verdict} | "
                     f"{adjusted} |")
    return lines


def sources_section(cfg: StudyConfig) -> list[str]:
    """Where each claim comes from (its ``source``), claim by claim; nothing when no claim names one."""
    if not any(c.source for c in cfg.claims):
        return []
    lines = ["", "## Sources of the claims", ""]
    for i, c in enumerate(cfg.claims, 1):
        lines.append(f"{i}. {c.text} ({c.family}): {c.source or 'no source given'}")
    return lines


def _detectable_delta(r: dict[str, Any]) -> str:
    """The smallest true Delta (or band) this row confirms with 80% power, in its units."""
    d, m = r["detectable"], r["margin"]
    if math.isnan(d):
        return "-"
    if r["rule"] == "alike":
        return f"abs(Delta) <= {_fmt(r, m - d, False)}" if d < m else f"none (detectable {_fmt(r, d, False)} >= delta)"
    if r["rule"] == "less":
        return f"Delta <= {_fmt(r, -(m + d))}"
    return f"Delta >= {_fmt(r, (m if r['rule'] == 'greater' else -m) + d)}"


def undecided_reason(r: dict[str, Any]) -> str:
    """Why a row got no verdict at this scale, and what would decide it."""
    if r["test"] in ("exact McNemar", "sign-flip", "none"):
        return r["why"] or f"the exact test's p-values ({_p(r['p_holds'])} / {_p(r['p_contradicted'])}) are not small"
    if r["verdict"] != "inconclusive":
        return f"decided per row ({VERDICT_CELL[r['verdict']]}) but not after the family adjustment"
    need = r["seeds_needed"]
    if not need:
        return f"no seed count up to {MAX_SEEDS_SEARCHED} decides it (the observed mean lies on or near the margin)"
    return (f"about {need} seeds would decide it with {100 * POWER:.0f}% power if the true Delta were the observed "
            f"mean ({_fmt(r, r['mean'])})")


def power_section(rows: list[dict[str, Any]]) -> list[str]:
    """report.md's "Power": per primary row, the achieved half-width and the smallest effect it
    detects at its seed count; then the primary rows this scale cannot decide."""
    primary = [r for r in rows if r["family"] == "primary"]
    lines = ["## Power", "",
             f"Per primary row, with the observed sd of the differences taken as the true one: the achieved 95% "
             f"half-width t_{{0.975,n-1}} sd / sqrt(n), and the smallest true effect confirmed with {100 * POWER:.0f}% "
             f"power at its seed count, by the t-quantile formula (t_{{0.975,n-1}} + t_{{0.80,n-1}}) sd / sqrt(n) "
             "beyond the margin (the normal approximation of the noncentral t; per row at 2.5%, before the family "
             "adjustment). Units as in the claims table.", ""]
    if not primary:
        return lines + ["No primary claims in this study."]
    lines += ["| claim | setting | test | seeds | sd | half-width | detectable beyond the margin | "
              "smallest detectable true effect | adjusted verdict |", "|---" * 9 + "|"]
    for r in primary:
        lines.append(f"| {r['claim']} | {r['setting']} | {r['test']} | {r['seeds']} | {_fmt(r, r['sd'], False)} | "
                     f"{_fmt(r, r['half_width'], False)} | {_fmt(r, r['detectable'], False)} | "
                     f"{_detectable_delta(r)} | {VERDICT_CELL[r['adjusted_verdict']]} |")
    undecided = [r for r in primary if r["adjusted_verdict"] == "inconclusive"]
    lines += ["", f"Not decided at this scale ({len(undecided)} of {len(primary)} primary rows)"
              + (":" if undecided else ".")]
    lines += [f"- {r['claim']} ({r['setting']}): {undecided_reason(r)}." for r in undecided]
    return lines


def family_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The headline: the primary family's adjusted counts, then the per-row and secondary ones."""
    primary = [r for r in rows if r["family"] == "primary"]
    secondary = [r for r in rows if r["family"] == "secondary"]
    return [f"**Primary claims, Holm-adjusted: {count_line(primary, 'adjusted_verdict')}.** "
            f"Per row, before adjustment: primary {count_line(primary)}; secondary (not adjusted) "
            f"{count_line(secondary)}."]


def family_text(rows: list[dict[str, Any]]) -> str:
    """How the primary family is controlled (under the rules table)."""
    m = sum(r["family"] == "primary" for r in rows)
    return (f"Family-wise control: the {m} primary rows (a claim tested under several settings gives one row "
            f"per setting) are one family. Holm's step-down procedure runs over their {m} p_holds and, apart, over "
            f"their {m} p_contradicted, each at {ALPHA:g}: the chance that any primary row falsely holds is at most "
            f"{100 * ALPHA:g}%, and that any is falsely contradicted at most {100 * ALPHA:g}%, whatever the dependence "
            f"between rows (they share cells); so any false adjusted verdict at most {200 * ALPHA:g}%. Secondary rows "
            "keep their per-row verdict (each a 2.5% test, no control across rows): read them as exploratory. "
            f"Rows with fewer than {MIN_SEEDS} paired seeds enter the family with p = 1.")


def cells_table(cfg: StudyConfig, setting: str, cells: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| arm | preset | seeds | before | final (± 95% half-width) | auc | early | drawdown | collapsed | "
             "clip frac | entropy (last 20 steps) | kl/init (last 20 steps) |", "|---" * 12 + "|"]
    for arm in cfg.arms:
        if arm.name not in cells:
            continue
        c = cells[arm.name]
        m, lo, _ = c["final"]
        half = "" if math.isnan(lo) else f" ± {100 * (m - lo):.1f}"
        collapsed = sum(p["collapsed"] for p in c["per_seed"].values())
        lines.append(f"| {arm.name} | {arm.preset} | {c['seeds_complete']} | {_pct(c['before'][0])} | {_pct(m)}{half} | "
                     f"{_pct(c['auc'][0])} | {_pct(c['early'][0])} | {_pct(c['drawdown'][0])} | "
                     f"{collapsed:.0f}/{c['seeds_complete']} | {c['clip_frac']:.3f} | {c['entropy_last20']:.3f} | "
                     f"{c['kl_init_last20']:.4f} |")
    return lines


def last_samples(path: Path, n: int = QUOTED) -> list[dict[str, Any]]:
    """The first ``n`` samples of the last step in a ``samples.jsonl`` (a line that is not a JSON
    object with a ``step``, such as a killed run's partial last line, is skipped)."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("step"), int):
                records.append(r)
    last = max((r["step"] for r in records), default=None)
    return [r for r in records if r["step"] == last][:n]


def _quote(text: Any, width: int = 60) -> str:
    """A generated text as a code span in a table cell: cut to ``width`` characters, newlines and
    '|' escaped."""
    text = str(text)
    text = (text[:width] + "...") if len(text) > width else text
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _value(x: Any, fmt: str) -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else format(x, fmt)


def samples_section(cfg: StudyConfig, runs: dict[tuple[str, str], dict[int, RunData]], folder: Path) -> list[str]:
    """report.md's "Samples": per setting and arm, a link to each seed's ``samples.jsonl``
    (relative to the study folder) and the first :data:`QUOTED` samples of the last step that the
    first seed with a file recorded."""
    lines = ["## Samples", "",
             "What the policy generated: `logs/samples.jsonl` in each run folder, one JSON object per sample (the "
             "first `model.monitor.samples_per_step` samples every `model.monitor.samples_every` steps; fields in "
             f"docs/llm.md, \"Samples in the logs\"). Quoted per arm: the first {QUOTED} samples of the last step in "
             "the first seed's file, texts cut at 60 characters.", "",
             "| setting | arm | files | quoted | prompt | response | reward | advantage | clip frac |",
             "|---" * 9 + "|"]
    any_file = False
    for setting in cfg.settings:
        for arm in cfg.arms:
            cell = runs.get((setting.name, arm.name))
            if cell is None:
                continue
            files = {seed: r.samples for seed, r in cell.items() if r.samples is not None}
            links = ", ".join(f"[seed{seed}]({Path(os.path.relpath(path, folder)).as_posix()})"
                              for seed, path in files.items())
            head = f"| `{setting.name}` | `{arm.name}` | {links or 'none'} |"
            quoted = []
            if files:
                any_file = True
                seed, path = next(iter(files.items()))
                quoted = last_samples(path)
            if not quoted:
                lines.append(head + " |" * 6)
            for i, r in enumerate(quoted):
                where = f"seed {seed}, step {r['step']}, group {r.get('group', '-')} sample {r.get('sample', '-')}"
                lines.append((head if i == 0 else "| | | |") + f" {where} | {_quote(r.get('prompt', ''))} | "
                             f"{_quote(r.get('response', ''))} | {_value(r.get('reward'), '.3g')} | "
                             f"{_value(r.get('advantage'), '+.3f')} | {_value(r.get('clip_frac'), '.3f')} |")
    if not any_file:
        return lines[:2] + ["No run folder holds a `samples.jsonl` (runs from before samples were written, or with "
                            "`model.monitor.samples_every: 0`)."]
    return lines


def _overrides_text(values: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in values.items())


def render(cfg: StudyConfig, rows: list[dict], cells: dict, runs: dict, warmups: dict, plots: list[Path],
           command: str, samples: list[str] | None = None) -> list[str]:
    done = sum(r.complete for cell in runs.values() for r in cell.values())
    total = sum(len(cell) for cell in runs.values())
    some = next((r for cell in runs.values() for r in cell.values() if r.complete), None)
    steps = f"{some.max_steps} RL steps, held-out evaluation every {some.val_check_interval}" if some else "no run finished"
    lines = [
        f"# Study `{cfg.name}`: the paper's off-policy claims on a tiny LLM",
        "",
        f"Produced by `{command}`. Runs complete: {done} of {total}.",
        "",
        *family_lines(rows),
        "",
        "## What was run",
        "",
        f"- Base (every run): {', '.join(f'`{b}`' for b in cfg.base)}"
        + (f", then {_overrides_text(cfg.base_overrides)}" if cfg.base_overrides else "") + f"; {steps}.",
        f"- Seeds {list(cfg.seeds)}, paired: every arm of seed S starts from the one warm-up of seed S "
        "(`warmup/seed<S>/`, the same weights bitwise) and samples with seed S.",
    ]
    if warmups:
        lines.append("- Warm-ups: " + "; ".join(
            f"seed {s}: {w['warmup/steps']:.0f} steps to check-set accuracy {100 * w['warmup/acc']:.1f}%"
            for s, w in sorted(warmups.items())) + ".")
    lines += [
        "- Settings (`model.sync`): " + ", ".join(f"`{s.name}` ({s.describe()})" for s in cfg.settings) + ".",
        "- Arms: " + "; ".join(f"`{a.name}` = preset `{a.preset}`"
                               + (f" + {_overrides_text(a.overrides)}" if a.overrides else "")
                               + (f" + configs {', '.join(a.configs)}" if a.configs else "")
                               + (f" (settings: {', '.join(a.settings)})" if a.settings is not None else "")
                               for a in cfg.arms) + ".",
        "- Statistics, per seed, of the held-out greedy accuracy curve (`val/acc`; in accuracy points below): "
        + "; ".join(f"`{k}` = {v}" for k, v in STATISTICS.items()).replace("`last_evals`", str(cfg.last_evals))
        .replace("`collapse_floor`", f"{100 * cfg.collapse_floor:.0f}%") + ".",
        f"- Statistic of a claim: the per-seed paired difference Delta = statistic(a) - statistic(b) over the seeds "
        f"both cells completed; its mean, {100 * LEVEL:.0f}% Student-t interval and tests (`reclight.stats`, the "
        f"bandit bench's code). Fewer than {MIN_SEEDS} paired seeds: no test (inconclusive).",
        f"- Verdicts, with one margin delta = {100 * cfg.margin:g} accuracy points fixed in the study config before "
        "running (a claim on tokens or steps states its own): **holds** = the test of \"claim false\" rejects; "
        "**contradicted** = the test of \"claim true\" rejects; **inconclusive** = neither.",
        "",
        *rules_table(),
        "",
        family_text(rows),
        "",
        "## Claims",
        "",
        *claims_table(rows),
        "",
        f"![claims]({CLAIMS_PLOT})",
        "",
        f"`{CLAIMS_PLOT}`: every row's mean Delta with its 95% interval, the margin dashed, colour = per-row verdict, "
        "the adjusted verdict written for primary rows; degenerate and binary rows have no interval (marker or "
        "counts only).",
        "",
        *power_section(rows),
        *sources_section(cfg),
    ]
    for setting in cfg.settings:
        if setting.name in cells:
            lines += ["", f"## Cells: `{setting.name}` ({setting.describe()})", "",
                      *cells_table(cfg, setting.name, cells[setting.name])]
    lines += ["", "## Plots", "", "Per setting: held-out accuracy (thin lines: each seed; thick: the mean over "
              "seeds; band: its 95% Student-t interval over seeds), clip fraction, entropy and `kl/init` (log scale) "
              "(10-step moving averages, mean over seeds). Each arm keeps one colour in every figure.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    if samples:
        lines += ["", *samples]
    missing = [f"`{r.folder}`" for cell in runs.values() for r in cell.values() if not r.complete]
    lines += ["", "## Runs", "",
              "Each run folder holds `run.json` with its exact `reclight fit` command (`reclight study --config ... "
              "--dry-run` prints them all); `reclight study report DIR` rebuilds this report from the folders."]
    if missing:
        lines += ["", f"Incomplete or missing ({len(missing)}): " + ", ".join(missing) + "."]
    return lines


def _clean(x: Any) -> Any:
    """JSON-ready: NaN -> null, tuples -> lists, paths and other objects -> strings."""
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def _warmups(cfg: StudyConfig) -> dict[int, dict[str, Any]]:
    out = {}
    for seed in cfg.seeds:
        path = warmup_folder(cfg, seed) / "warmup.json"
        if path.is_file():
            out[seed] = json.loads(path.read_text())
    return out


def write_report(folder: str | Path, command: str | None = None, log=print) -> Path:
    """Aggregate the study in ``folder`` (its ``study.yaml`` and run folders) into
    ``report.md``, ``summary.json``, ``claims.png`` and ``<setting>.png``; returns the report's path."""
    folder = Path(folder)
    study = folder / STUDY_FILE
    if not study.is_file():
        raise ValueError(f"DIR={str(folder)!r} is not valid; accepted: a study folder holding {STUDY_FILE} "
                         "(written by `reclight study --config ...`, also with --dry-run)")
    cfg = load_study(study, {"out_dir": str(folder)}, check_files=False, field="DIR")
    runs = collect(cfg)
    rows = claim_rows(cfg, runs)
    cells: dict[str, dict[str, Any]] = {}
    for (setting, arm), cell in runs.items():
        cells.setdefault(setting, {})[arm] = cell_summary(cfg, cell)
    from reclight.study.plots import plot_claims, plot_settings

    plot_claims(rows, folder / CLAIMS_PLOT)
    plots = plot_settings(cfg, runs, folder)
    warmups = _warmups(cfg)
    command = command or f"reclight study report {folder}"
    report = folder / "report.md"
    samples = samples_section(cfg, runs, folder)
    report.write_text("\n".join(render(cfg, rows, cells, runs, warmups, plots, command, samples)) + "\n")
    curves: dict[str, dict[str, dict[str, list]]] = {}
    for (setting, arm), cell in runs.items():
        curves.setdefault(setting, {})[arm] = {str(seed): r.evals for seed, r in cell.items() if r.complete}
    primary = [r for r in rows if r["family"] == "primary"]
    headline = count_line(primary, "adjusted_verdict")
    summary = {"study": cfg.to_dict(), "counts_line": f"primary, Holm-adjusted: {headline}",
               "counts": {"primary_adjusted": count_verdicts(primary, "adjusted_verdict"),
                          **{f: count_verdicts(r for r in rows if r["family"] == f) for f in FAMILIES}},
               "alpha": ALPHA, "min_seeds": MIN_SEEDS, "rows": rows,
               "cells": cells, "curves": curves, "warmups": warmups,
               "runs": [{"folder": str(r.folder), "complete": r.complete, "samples": r.samples}
                        for cell in runs.values() for r in cell.values()]}
    (folder / "summary.json").write_text(json.dumps(_clean(summary), indent=1) + "\n")
    log(f"primary, Holm-adjusted: {headline}; wrote {report}, summary.json, {CLAIMS_PLOT} and {len(plots)} "
        "setting plot(s)")
    return report
