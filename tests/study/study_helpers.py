"""Helpers of the study tests (no tests here): a micro study config, and synthetic run folders.

``micro_study`` is a real study on the micro model (hidden 16, 1 layer), 1-digit addition, a
2-step warm-up and 3 RL steps with an evaluation after each: every command takes seconds, most
of it importing torch and Lightning.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MICRO_POLICY = {"tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
                         "max_positions": 32}}


def micro_study(tmp_path: Path, **changes) -> dict:
    """The micro study as a dict (write it with :func:`write_study`): 2 arms x 1 setting x 2 seeds."""
    study = {
        "name": "micro",
        "out_dir": str(tmp_path / "study"),
        "base": [str(ROOT / "configs" / "smoke_test.yaml")],
        "base_overrides": {
            "trainer.max_steps": 3,
            "trainer.val_check_interval": 1,
            "model.policy": MICRO_POLICY,  # the study builds the tiny model under out_dir/tiny-model
            "model.sampling": {"num_samples": 3, "max_new_tokens": 3},
            "model.warmup": {"max_steps": 2, "check_every": 1, "check_size": 8, "batch_size": 8,
                             "target_accuracy": 1.0},
            "data.task": {"class_path": "reclight.tasks.arithmetic.Arithmetic",
                          "init_args": {"digits": 1, "val_size": 10, "test_size": 10}},
            "data.prompts_per_step": 2,
            "data.eval_size": 8,
            "data.eval_batch_size": 8,
        },
        "arms": {"reinforce": "reinforce", "clip": {"preset": "rec_oneside_nois"}},
        "settings": ["periodic"],
        "seeds": [0, 1],
        "margin": 0.05,
        "workers": 2,
        "claims": [{"text": "clipping not worse", "a": "clip", "b": "reinforce", "statistic": "final",
                    "rule": "not_worse", "family": "primary"}],
    }
    study.update(changes)
    return study


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def write_run(folder: Path, accs: list[float], *, max_steps: int, every: int, clip: float = 0.0) -> None:
    """A synthetic run folder: ``logs/config.yaml`` and ``logs/metrics.csv`` with the start-of-RL
    evaluation, one training row per step (clip/frac, policy/entropy, kl/init, reward/mean) and
    the periodic evaluations ``accs[1:]``, in the CSV logger's order and step numbering."""
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": max_steps,
                                                                  "val_check_interval": every}}))
    keys = ["clip/frac", "kl/init", "policy/entropy", "reward/mean", "step", "val/acc"]
    rows = [{"step": 0, "val/acc": accs[0]}]
    evals = iter(accs[1:])
    for t in range(max_steps):
        rows.append({"step": t, "clip/frac": clip, "kl/init": 0.01 * t, "policy/entropy": 0.5, "reward/mean": 0.4})
        if (t + 1) % every == 0:
            acc = next(evals, None)
            if acc is not None:
                rows.append({"step": t, "val/acc": acc})
    with open(logs / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


WALL_CLOCK = ("throughput/rollout_tok_s", "throughput/train_tok_s", "rollout/wait_s")
"""The metrics.csv columns that measure time, not the run."""


def run_metrics(folder: Path) -> list[dict]:
    """A run folder's logged rows without the wall-clock columns."""
    with open(folder / "logs" / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in csv.DictReader(f)]


def report_lines(out: Path) -> list[str]:
    """report.md but the line naming the command that produced it."""
    return [line for line in (out / "report.md").read_text().splitlines() if not line.startswith("Produced by")]


def run_micro_study(tmp_path: Path) -> tuple[Path, Any, list[Path], dict]:
    """The micro study with one seed (a warm-up and 2 runs) through ``reclight study``'s default
    local pool: (its YAML, its StudyConfig, the run folders, ``{folder: (run_metrics, run.json
    text)}``)."""
    from reclight.study.cli import main
    from reclight.study.config import study_from_dict
    from reclight.study.plan import run_folder

    study = micro_study(tmp_path, seeds=[0])
    path = write_study(tmp_path / "micro.yaml", study)
    cfg = study_from_dict(study)
    folders = [run_folder(cfg, s, a, 0) for s, a in cfg.cells()]
    assert main(["--config", str(path)]) == 0
    return path, cfg, folders, {f: (run_metrics(f), (f / "run.json").read_text()) for f in folders}

