"""A study writes only under its own folder (``out_dir``). Before: its warm-ups built the embedded
tiny model under ``outputs/tiny-model/`` of the folder the study ran from (the base config's
``model.policy.tiny_dir``)."""

import os
import subprocess
import sys

import pytest
from study_helpers import MICRO_POLICY, micro_study, write_study

from reclight.study.cli import main
from reclight.study.config import study_from_dict
from reclight.study.plan import make_plan, validate_commands
from reclight.study.warmup import warmup_finished


def _tree(folder):
    return {p for p in folder.rglob("*")}


def test_a_study_warmup_writes_nothing_outside_out_dir(tmp_path, monkeypatch):
    """The micro study's dry run (in-process) and its one warm-up (``reclight study warmup``, a
    subprocess run from an empty folder, with TMPDIR an empty folder too): every new path under
    tmp_path lies under out_dir, the tiny model included, and both folders stay empty. Every
    run's command builds its tiny model there too. (HOME is left alone: libraries keep per-user
    caches there, e.g. matplotlib's font list, which are not the study's output.)"""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    out = tmp_path / "study"
    study = micro_study(tmp_path, seeds=[0])
    path = write_study(tmp_path / "micro.yaml", study)
    monkeypatch.chdir(cwd)
    assert main(["--config", str(path), "--dry-run"]) == 0
    before = _tree(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "-m", "reclight.study", "warmup", str(out), "--seed", "0"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = _tree(tmp_path) - before
    assert warmup_finished(out / "warmup" / "seed0")
    outside = sorted(str(p) for p in new if not p.is_relative_to(out))
    assert outside == []
    tiny = out / "tiny-model" / "llama-h16-l1-a2-i32-p32-s0"
    assert (tiny / "config.json").is_file() and tiny in new
    assert not _tree(cwd) and not _tree(tmp)
    cfg = study_from_dict(study)
    runs = [j for j in make_plan(cfg, validate_commands(cfg)) if not j.is_warmup]
    assert runs and all(f"--model.policy.tiny_dir={out / 'tiny-model'}" in j.argv for j in runs)


@pytest.mark.parametrize("overrides", [{"model.policy.tiny_dir": "outputs/tiny"},
                                       {"model.policy": {**MICRO_POLICY, "tiny_dir": "outputs/tiny"}}])
def test_the_study_config_may_not_move_the_tiny_model(tmp_path, overrides):
    study = micro_study(tmp_path)
    study["base_overrides"] = {**study["base_overrides"], **overrides}
    key = next(iter(overrides))
    with pytest.raises(ValueError) as e:
        study_from_dict(study)
    assert str(e.value).startswith(f"base_overrides.{key}={overrides[key]!r} is not valid; accepted: any key but ")
    assert "the tiny model under out_dir/tiny-model" in str(e.value)
