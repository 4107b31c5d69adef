"""The real ``reclight`` entry point: every shipped config parses, a 2-step smoke fit trains
every parameter, ``fit`` twice in one folder works, and the GPU config's structure runs with
the tiny model on CPU."""

from pathlib import Path

import pytest
import torch

from reclight.algorithms import PRESETS
from reclight.trainer.cli import main

ROOT = Path(__file__).resolve().parents[2]
# configs/bandits and configs/study are not `reclight fit` configs (tests/bandits, tests/study parse them)
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"bandits", "study"} & set(p.parts))
BASES = [p for p in CONFIGS if p.parent.name == "configs"]


def test_every_preset_has_a_config():
    assert {p.stem for p in (ROOT / "configs" / "algo").glob("*.yaml")} == set(PRESETS)
    assert {p.stem for p in (ROOT / "configs" / "sync").glob("*.yaml")} == {"on_policy", "periodic", "lag", "offline"}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses_through_the_cli(cfg, capsys):
    """Base configs alone; algo/sync configs composed onto the arithmetic base. The module is
    instantiated too, so a bad preset or override fails here (before any model load)."""
    args = ["--config", str(cfg)] if cfg in BASES else ["--config", str(ROOT / "configs/arithmetic.yaml"), "--config", str(cfg)]
    with pytest.raises(SystemExit) as e:
        main(["fit", *args, "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "sync:" in printed
    if cfg.parent.name == "algo":
        assert f"algorithm:\n    preset: {cfg.stem}\n" in printed
        cli = main(args, run=False)
        assert cli.model.algo == PRESETS[cfg.stem] and cli.model.policy is None


MOVED = [
    (["--model.lr", "0.1"], "model.lr moved to model.optim.lr"),
    (["--model.tiny_dir", "x"], "model.tiny_dir moved to model.policy.tiny_dir"),
    (["--model.engine", "fast"], "model.engine='fast' is a group now; write model.engine.name: fast"),
    (["--model.train_forward", "fused_compiled"],
     "model.train_forward='fused_compiled' is a group now; write model.train_forward: {impl: fused, compile: true}"),
    (["--model.engine_options", "{compile_decode: true}"], "model.engine_options moved to model.engine.fast"),
    (["--sync.sync_interval", "3"], "sync moved to model.sync"),
]


@pytest.mark.parametrize("args, expected", MOVED, ids=[a[0] for a, _ in MOVED])
def test_old_flat_keys_name_their_new_key(args, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "configs/smoke_test.yaml"), *args], run=False)
    assert e.value.code == 2
    assert expected in capsys.readouterr().err


def test_old_flat_keys_in_a_yaml_file_name_their_new_key(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  engine: fast\n  grad_clip: 0.5\n  tiny: {hidden_size: 8}\nsync: {sync_offset: 2}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(old)], run=False)
    err = capsys.readouterr().err
    for part in ("model.engine='fast' is a group now; write model.engine.name: fast",
                 "model.grad_clip moved to model.optim.grad_clip", "model.tiny moved to model.policy.tiny",
                 "sync moved to model.sync"):
        assert part in err, part


def test_bad_preset_fails_with_clear_message(capsys):
    for args, expected in ((["--model.algorithm.preset", "rec_typo"],
                            "model.algorithm.preset='rec_typo' is not valid; accepted: reinforce, grpo"),
                           (["--model.algorithm.eps_hi", "0.3"], "model.algorithm has no field 'eps_hi'")):
        with pytest.raises(SystemExit) as e:
            main(["--config", str(ROOT / "configs/arithmetic.yaml"), *args], run=False)
        assert e.value.code == 2 and expected in capsys.readouterr().err


def test_algorithm_group_in_help_and_yaml(tmp_path):
    """model.algorithm is a typed group: a preset plus every AlgorithmConfig field (null: the
    preset's value), composable from YAML files and the command line."""
    cfg = tmp_path / "arm.yaml"
    cfg.write_text("model:\n  algorithm: {eps_high: 0.28}\n")
    cli = main(["--config", str(ROOT / "configs/arithmetic.yaml"), "--config", str(ROOT / "configs/algo/dapo.yaml"),
                "--config", str(cfg), "--model.algorithm.kl_coef", "0.01"], run=False)
    assert cli.model.algo == PRESETS["dapo"].replace(eps_high=0.28, kl_coef=0.01)


def _smoke(tmp_path, *extra):
    return main(["fit", "--config", str(ROOT / "configs/smoke_test.yaml"),
                 "--model.policy.tiny_dir", str(tmp_path / "tiny"), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
                 "--data.task", "conftest.DigitTask", *extra])


def test_smoke_fit_changes_every_parameter_and_runs_twice(tmp_path, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    from reclight.trainer.cli import precision_choice
    from reclight.trainer.resume import run_record

    monkeypatch.chdir(tmp_path)  # the config file is saved in the run folder
    caplog.set_level("INFO")
    cli = _smoke(tmp_path)
    assert cli.trainer.global_step == 2
    # issue #20 item 2: the first lines say which precision and engine dtype were chosen, and why;
    # the run record (saved in every checkpoint) says it too
    precision, why = precision_choice()
    assert f"trainer.precision: {precision} (the default: {why})" in caplog.text
    dtype = "bfloat16" if precision.startswith("bf16") else "float32"
    assert f"model.engine.dtype null: {dtype} (follows trainer.precision {precision})" in caplog.text
    record = run_record(cli.model, cli.datamodule, cli.trainer)
    assert record["resolved.precision_reason"] == f"the default: {why}"
    assert record["resolved.engine.name"] == "fast" and record["trainer.precision"] == precision
    init = AutoModelForCausalLM.from_pretrained(next((tmp_path / "tiny").iterdir()))
    init_params = dict(init.named_parameters())
    for name, p in cli.model.policy.named_parameters():
        assert not torch.equal(p, init_params[name]), f"{name} did not change"
    cli2 = _smoke(tmp_path)  # same folder: config overwrite, tiny model reused, new log version
    assert cli2.trainer.global_step == 2
    versions = sorted(p.name for p in (tmp_path / "logs" / "smoke").iterdir() if not p.name.startswith("."))  # not the run locks
    assert versions == ["version_0", "version_1"]
    assert (tmp_path / "logs" / "smoke" / "version_1" / "metrics.csv").read_text().count("reward/mean") == 1


def test_gsm8k_config_structure_runs_with_tiny_model(tmp_path):
    """The paper's GPU config, same structure (bf16-mixed, bf16 engine, micro-batches, GSM8K
    data), with the tiny char model and sizes shrunk for a CPU."""
    data = ROOT.parent / "shared" / "data" / "gsm8k"
    if not data.is_dir():
        pytest.skip(f"GSM8K data not found at {data}")
    cli = main(["fit", "--config", str(ROOT / "configs/gsm8k_qwen.yaml"),
                "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                "--trainer.enable_checkpointing", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--model.policy.name_or_path", "null", "--model.policy.tiny_dir", str(tmp_path / "tiny"),
                "--model.policy.tiny", "{hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32, max_positions: 2048}",
                "--model.sampling.max_new_tokens", "4", "--model.train_forward.micro_batch_size", "1",
                "--data.task.init_args.data_dir", str(data), "--data.prompts_per_step", "2",
                "--data.eval_size", "4", "--data.eval_batch_size", "4"])
    assert cli.trainer.global_step == 2
    engine = cli.model.rollouts.engine  # engine auto: the fast one for the tiny Llama (HF generate for Qwen)
    assert type(engine).__name__ == "FastLlamaEngine" and engine.dtype == torch.bfloat16
    metrics = cli.trainer.callback_metrics
    assert "val/acc" in metrics and "kl/init" in metrics and "throughput/rollout_tok_s" in metrics


def test_console_script_exits_zero_after_a_successful_fit(tmp_path):
    """The installed ``reclight`` script, run as a user runs it: a successful fit must exit 0.
    (Its wrapper does ``sys.exit(entrypoint())``; returning the CLI object there printed it and
    exited 1 after every successful run.)"""
    import subprocess
    import sys

    script = Path(sys.executable).with_name("reclight")
    assert script.exists(), f"console script not installed at {script}; run `pip install -e .`"
    proc = subprocess.run(
        [str(script), "fit", "--config", str(ROOT / "configs/smoke_test.yaml"),
         "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--model.policy.tiny_dir", str(tmp_path / "tiny")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ReclightCLI object" not in proc.stdout + proc.stderr


def test_help_shows_every_fields_docstring(capsys):
    """`reclight fit --help` prints each typed field's docstring (read from the source only for
    --help: the setting is process-wide and slows every later parse, so it is reset here)."""
    from jsonargparse import set_parsing_settings

    try:
        with pytest.raises(SystemExit) as e:
            main(["fit", "--help"])
        assert e.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "--model.optim.lr LR Learning rate." in out
        assert "--model.sampling.num_samples NUM_SAMPLES K: responses per prompt" in out
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)


def test_model_groups_table_is_rlmodules_signature():
    """The CLI's key checks read MODEL_GROUPS instead of importing the module (no import cycle):
    it must list exactly RLModule's typed groups."""
    import dataclasses
    import typing

    from reclight.trainer.config import MODEL_GROUPS
    from reclight.trainer.module import RLModule

    typed = {}
    for name, tp in typing.get_type_hints(RLModule.__init__).items():
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            typed[name] = args[0]
    assert typed == MODEL_GROUPS
