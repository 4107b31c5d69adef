"""``reclight study replicate DIR --seeds S ...``: a study's primary claims on fresh seeds, and
how far the replication agrees with the original.

The replication is a study of its own, in its own folder (default ``DIR/replicate-<seeds>/``,
e.g. ``DIR/replicate-101-102-103/``: its ``study.yaml``, ``warmup/``, ``runs/``, report), so
its runs never mix with the original's and ``reclight study report`` reads either folder alone.
Its config is the original's (the same base, overrides, arms and settings, read from
``DIR/study.yaml``) restricted to what the primary claims compare: the primary claims only, the
settings and arms of their cells, each arm under the settings of those cells, and the new seeds
(none of which may be one of the original's: the same seed repeats the same run bitwise). Each
primary claim keeps exactly its report rows (checked), so row for row the two reports compare
the same cells; the replication's family is the same primary family (the same adjustment).
A learning-rate axis (``lrs``) is written out as its settings, each with its ``lr``: the same
setting names, ``--model.optim.lr`` and run folders.

The agreement (``agreement.md`` and ``agreement.json`` in the replication folder, and on
stdout), per primary row: the original's verdict (per row and family-adjusted) with its mean
Delta and 95% interval, the replication's, whether the replication's mean Delta has the
original's sign, and whether the replication's interval covers the original mean. Both sides
are recomputed from the run folders (:func:`reclight.study.report.claim_rows`), not read from
an old ``summary.json``.

A study whose claims carry no ``family`` (written before the field existed) has every claim
replicated, as one family.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from reclight.checks import invalid
from reclight.study.config import PAPER, StudyConfig, claim_cells, load_study, study_from_dict

AGREEMENT = "agreement.md"
RAW_UNITS = {"len_trained": "tokens", "staleness": "steps"}
"""Statistics in their own units (the others in accuracy points, x 100), as in the report."""


def is_primary(claim: Any) -> bool:
    return getattr(claim, "family", "primary") == "primary"


def load_original(folder: str | Path) -> StudyConfig:
    """The study in ``folder`` (its ``study.yaml``, out_dir = ``folder``), its config files
    required (the replication runs them, from the folder the study was started in)."""
    from reclight.study.report import STUDY_FILE

    study = Path(folder) / STUDY_FILE
    if not study.is_file():
        raise invalid("DIR", str(folder), f"a study folder holding {STUDY_FILE} (written by `reclight study --config "
                      "...`, also with --dry-run)")
    return load_study(study, {"out_dir": str(folder)})


def default_out_dir(folder: str | Path, seeds: list[int]) -> str:
    return str(Path(folder) / ("replicate-" + "-".join(str(s) for s in seeds)))


def replicate_config(cfg: StudyConfig, seeds: list[int], out_dir: str | None = None,
                     workers: int | None = None) -> StudyConfig:
    """The replication study of ``cfg``'s primary claims on ``seeds`` (module docstring)."""
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise invalid("--seeds", list(seeds), "distinct integers >= 0")
    again = [s for s in seeds if s in cfg.seeds]
    if again:
        raise invalid("--seeds", list(seeds), f"fresh seeds, none of the study's {list(cfg.seeds)} ({again} repeat its "
                      "runs bitwise: a replication needs new warm-ups and samples)")
    out = out_dir or default_out_dir(cfg.out_dir, seeds)
    if Path(out).resolve() == Path(cfg.out_dir).resolve():
        raise invalid("--out_dir", out, f"a folder other than the study's own {cfg.out_dir} (its runs would mix with "
                      "the original's)")
    primary = [c for c in cfg.claims if is_primary(c)]
    if not primary:
        raise invalid("DIR", cfg.out_dir, "a study with at least one primary claim (family: primary) to replicate")
    cells = {cell for c in primary for pair in claim_cells(cfg, c) for cell in pair}  # (arm, setting)
    raw = cfg.to_dict()
    if "lrs" in raw:  # a learning-rate axis: its settings written out one by one, each with its lr
        raw["lrs"] = None
    raw.update(name=f"{cfg.name}-replicate", out_dir=out, seeds=list(seeds),
               claims=[d for c, d in zip(cfg.claims, raw["claims"]) if is_primary(c)],
               settings=[s.name if PAPER.get(s.name) == s else dataclasses.asdict(s) for s in cfg.settings
                         if any(s.name == st for _, st in cells)],
               arms={a.name: {**raw["arms"][a.name], "settings": [s.name for s in cfg.settings if (a.name, s.name)
                                                                  in cells]}
                     for a in cfg.arms if any(a.name == arm for arm, _ in cells)})
    if workers is not None:
        raw["workers"] = workers
    rep = study_from_dict(raw)
    for claim, same in zip(primary, rep.claims):
        if claim_cells(cfg, claim) != claim_cells(rep, same):  # a restriction that changed a claim's rows
            raise AssertionError(f"claim {claim.text!r}: rows {claim_cells(rep, same)} != {claim_cells(cfg, claim)}")
    return rep


def _key(row: dict[str, Any]) -> tuple:
    return row["claim"], row["a"], row["b"], row["statistic"], row["rule"]


def _same_sign(a: float, b: float) -> bool | None:
    if math.isnan(a) or math.isnan(b):
        return None
    return (a > 0) - (a < 0) == (b > 0) - (b < 0)


def _covers(row: dict[str, Any], x: float) -> bool | None:
    if math.isnan(row["lo"]) or math.isnan(x):
        return None  # no interval (too few seeds, a degenerate or a binary sample)
    return row["lo"] <= x <= row["hi"]


def agreement(original: StudyConfig, replica: StudyConfig) -> list[dict[str, Any]]:
    """Per primary row of ``original``: both sides' verdicts, means and intervals, same sign,
    covers (module docstring)."""
    from reclight.study.report import claim_rows, collect

    before = {_key(r): r for r in claim_rows(original, collect(original)) if r.get("family", "primary") == "primary"}
    after = {_key(r): r for r in claim_rows(replica, collect(replica))}
    out = []
    for key, o in before.items():
        r = after[key]
        out.append({"claim": o["claim"], "setting": o["setting"], "statistic": o["statistic"], "rule": o["rule"],
                    "a": o["a"], "b": o["b"],
                    "original": {k: o.get(k) for k in ("verdict", "adjusted_verdict", "mean", "lo", "hi", "seeds")},
                    "replicated": {k: r.get(k) for k in ("verdict", "adjusted_verdict", "mean", "lo", "hi", "seeds")},
                    "same_verdict": r.get("adjusted_verdict", r["verdict"]) == o.get("adjusted_verdict", o["verdict"]),
                    "same_sign": _same_sign(o["mean"], r["mean"]), "covers_original_mean": _covers(r, o["mean"])})
    return out


def _num(row: dict[str, Any], x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:+.2f}" if row["statistic"] in RAW_UNITS else f"{100 * x:+.1f}"


def _side(row: dict[str, Any], side: dict[str, Any]) -> tuple[str, str]:
    verdict = {"yes": "holds", "no": "contradicted"}.get(side["verdict"], side["verdict"])
    adjusted = side.get("adjusted_verdict")
    if adjusted is not None:
        verdict += f" / {({'yes': 'holds', 'no': 'contradicted'}).get(adjusted, adjusted)}"
    ci = "" if side["lo"] is None or math.isnan(side["lo"]) else f" [{_num(row, side['lo'])}, {_num(row, side['hi'])}]"
    return verdict, f"{_num(row, side['mean'])}{ci} ({side['seeds']})"


def _yes(x: bool | None) -> str:
    return "-" if x is None else ("yes" if x else "**no**")


def headline(rows: list[dict[str, Any]]) -> str:
    n = len(rows)
    count = {k: sum(bool(r[k]) for r in rows) for k in ("same_verdict", "same_sign", "covers_original_mean")}
    return (f"{n} primary rows: same verdict {count['same_verdict']} of {n}; same sign of the mean Delta "
            f"{count['same_sign']} of {n}; the replication's interval covers the original mean "
            f"{count['covers_original_mean']} of {n}.")


def agreement_lines(original: StudyConfig, replica: StudyConfig, rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"# Replication of study `{original.name}`: its primary claims on seeds {list(replica.seeds)}", "",
             f"Original: `{original.out_dir}` (seeds {list(original.seeds)}); replication: `{replica.out_dir}` "
             "(its own report.md). Mean Delta and its 95% interval in accuracy points (x 100) or the statistic's "
             "units; seeds in brackets; verdicts per row / family-adjusted.", "", f"**{headline(rows)}**", "",
             "| claim | setting | rule | original verdict | original mean Delta [95% CI] (seeds) | replicated verdict "
             "| replicated mean Delta [95% CI] (seeds) | same sign | covers original mean |", "|---" * 9 + "|"]
    for r in rows:
        (ov, om), (rv, rm) = _side(r, r["original"]), _side(r, r["replicated"])
        lines.append(f"| {r['claim']} | {r['setting']} | {r['rule']} | {ov} | {om} | {rv} | {rm} | "
                     f"{_yes(r['same_sign'])} | {_yes(r['covers_original_mean'])} |")
    return lines


def _clean(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return [_clean(v) for v in x] if isinstance(x, (list, tuple)) else x


def write_agreement(original: StudyConfig, replica: StudyConfig, log=print) -> Path:
    """``agreement.md`` and ``agreement.json`` in the replication folder; returns the .md path."""
    rows = agreement(original, replica)
    lines = agreement_lines(original, replica, rows)
    folder = Path(replica.out_dir)
    (folder / AGREEMENT).write_text("\n".join(lines) + "\n")
    (folder / "agreement.json").write_text(json.dumps(_clean({"original": original.out_dir,
                                                              "replication": replica.out_dir, "rows": rows}),
                                                      indent=1) + "\n")
    log(f"{headline(rows)} Wrote {folder / AGREEMENT}")
    return folder / AGREEMENT
