"""Bad input never corrupts a run (issue #5, item 3). Every case of docs/reliability.md:

- configs and data: the real ``reclight fit`` entry point fails with a message naming the
  field, the value and what is accepted, BEFORE any model is loaded (the tiny model's folder is
  never created);
- rewards, numerics and degenerate rollouts: short in-process fits of the micro model; the
  documented fallback is applied, logged as a metric, and the run stops past its limit.
"""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import reclight.trainer.module as module_lib
from conftest import DigitTask, micro_module, micro_trainer
from reclight.models.tokens import eos_ids
from reclight.tasks import DataError
from reclight.trainer.checkpoint import CheckpointError
from reclight.trainer.cli import main
from reclight.trainer.config import GuardsConfig
from reclight.trainer.data import RLDataModule
from reclight.trainer.guards import NonFiniteGuard
from reclight.trainer.metrics import rollout_health
from reclight.trainer.module import RLModule

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke_test.yaml"


def fit_args(tmp_path, *extra):
    return ["fit", "--config", str(SMOKE), "--model.policy.tiny_dir", str(tmp_path / "tiny"), "--trainer.logger", "false",
            "--data.task", "conftest.DigitTask", *extra]


# -- configs ------------------------------------------------------------------------------------
CONFIG_CASES = {
    "unknown preset": (["--model.algorithm.preset", "rec_typo"],
                       "model.algorithm.preset='rec_typo' is not valid; accepted: reinforce, grpo, rec_oneside_is"),
    "preset as a string": (["--model.algorithm", "grpo"],
                           "model.algorithm='grpo' is a group now; write model.algorithm.preset: grpo"),
    "old overrides": (["--model.algorithm_overrides", "{eps_low: 0.3}"],
                      "model.algorithm_overrides moved to model.algorithm (its fields sit beside the preset now"),
    "unknown algorithm field": (["--model.algorithm.eps_hi", "0.3"],
                                "model.algorithm.eps_hi=0.3 is not valid: model.algorithm has no field 'eps_hi'; "
                                "accepted: preset, clip_mode, eps_low"),
    "eps_low": (["--model.algorithm.eps_low", "1.5"],
                "model.algorithm.eps_low=1.5 is not valid; accepted: 0 < eps_low < 1"),
    "eps_high": (["--model.algorithm.eps_high", "0"],
                 "model.algorithm.eps_high=0.0 is not valid; accepted: eps_high > 0"),
    "coefficient": (["--model.algorithm.preset", "opmd", "--model.algorithm.regularizer_coef", "-1"],
                    "model.algorithm.regularizer_coef=-1.0 is not valid; accepted: regularizer_coef >= 0"),
    "weight temperature": (["--model.algorithm.preset", "red_weight", "--model.algorithm.weight_temperature", "0"],
                           "model.algorithm.weight_temperature=0.0 is not valid; accepted: weight_temperature > 0"),
    "sampling temperature": (["--model.sampling.temperature", "0"],
                             "model.sampling.temperature=0.0 is not valid; accepted: a number > 0"),
    "K=1": (["--model.sampling.num_samples", "1"],
            "model.sampling.num_samples=1 is not valid; accepted: an integer >= 2 (K, the group size"),
    "K=1 with grpo": (["--model.algorithm.preset", "grpo", "--model.sampling.num_samples", "1"],
                      "model.sampling.num_samples=1 is not valid; accepted: an integer >= 2"),
    "negative sync_offset": (["--model.sync.sync_offset", "-1"],
                             "model.sync.sync_offset=-1 is not valid; accepted: an integer >= 0"),
    "zero sync_interval": (["--model.sync.sync_interval", "0"],
                           "model.sync.sync_interval=0 is not valid; accepted: an integer >= 1"),
    "micro_batch_size": (["--model.train_forward.micro_batch_size", "0"],
                         "model.train_forward.micro_batch_size=0 is not valid; accepted: None or an integer >= 1"),
    "prompts_per_step 0": (["--data.prompts_per_step", "0"],
                           "data.prompts_per_step=0 is not valid; accepted: an integer >= 1"),
    # issue #25: the error names the setting the user typed, not the derived 4000 prompts per step
    "oversample > data": (["--data.oversample", "1000"],
                          "data.oversample=1000.0 is not valid; accepted: at most 17.5 with data.prompts_per_step=4 "
                          "and 70 train prompts (a step samples ceil(oversample x prompts_per_step) = 4000 prompts)"),
    "prompts_per_step > data": (["--data.prompts_per_step", "100000"],
                                "data.prompts_per_step=100000 is not valid; accepted: at most "),
    "model path": (["--model.policy.name_or_path", "/nonexistent/reclight-model"],
                   "model.policy.name_or_path='/nonexistent/reclight-model' is not valid: no such folder; "
                   "accepted: a folder written by save_pretrained"),
    "lr": (["--model.optim.lr", "0"], "model.optim.lr=0.0 is not valid; accepted: lr > 0"),
    "max_failed_reward_frac": (["--model.guards.max_failed_reward_frac", "1.5"],
                               "model.guards.max_failed_reward_frac=1.5 is not valid; accepted: a number in [0, 1]"),
    "max_consecutive_skips": (["--model.guards.max_consecutive_skips", "0"],
                              "model.guards.max_consecutive_skips=0 is not valid; accepted: an integer >= 1"),
    "lr_warmup_steps": (["--model.optim.lr_warmup_steps", "-1"],
                        "model.optim.lr_warmup_steps=-1 is not valid; accepted: an integer >= 0"),
    "weight_decay": (["--model.optim.weight_decay", "-0.1"],
                     "model.optim.weight_decay=-0.1 is not valid; accepted: weight_decay >= 0"),
    "betas": (["--model.optim.betas", "[0.9, 1.0]"], "model.optim.betas=(0.9, 1.0) is not valid; accepted: two finite numbers in [0, 1)"),
    "grad_clip": (["--model.optim.grad_clip", "-1"],
                  "model.optim.grad_clip=-1.0 is not valid; accepted: grad_clip >= 0 (0 disables)"),
    # issue #17, item 4: non-finite and nonsense settings (YAML's .inf / .nan pass `lr > 0` by hand)
    "lr inf": (["--model.optim.lr", ".inf"], "model.optim.lr=inf is not valid; accepted: lr > 0 (a finite number)"),
    "grad_clip nan": (["--model.optim.grad_clip", ".nan"],
                      "model.optim.grad_clip=nan is not valid; accepted: grad_clip >= 0 (0 disables) (a finite number)"),
    "weight_decay inf": (["--model.optim.weight_decay", ".inf"],
                         "model.optim.weight_decay=inf is not valid; accepted: weight_decay >= 0 (a finite number)"),
    "eval_size 0": (["--data.eval_size", "0"], "data.eval_size=0 is not valid; accepted: None or an integer >= 1"),
    "eval_batch_size 0": (["--data.eval_batch_size", "0"], "data.eval_batch_size=0 is not valid; accepted: an integer >= 1"),
    "eval_max_new_tokens 0": (["--model.monitor.eval_max_new_tokens", "0"],
                              "model.monitor.eval_max_new_tokens=0 is not valid; accepted: None or an integer >= 1"),
    "eval_max_new_tokens -3": (["--model.monitor.eval_max_new_tokens", "-3"],
                               "model.monitor.eval_max_new_tokens=-3 is not valid; accepted: None or an integer >= 1"),
    "float16 on CPU": (["--model.policy.dtype", "float16"],
                       "model.policy.dtype='float16' is not valid on the CPU: float16 master weights make AdamW round "
                       "small updates away"),
    "max_abs_reward": (["--model.guards.max_abs_reward", "0"],
                       "model.guards.max_abs_reward=0.0 is not valid; accepted: max_abs_reward > 0"),
    # issue #17, item 3: responses longer than the model's positions (the smoke model has 64)
    "max_new_tokens 100000": (["--model.sampling.max_new_tokens", "100000"],
                              "model.sampling.max_new_tokens=100000 is not valid; accepted: at most 63 with the embedded "
                              "tiny model (model.policy.tiny.max_positions): it has 64 positions"),
    "eval_max_new_tokens 64": (["--model.monitor.eval_max_new_tokens", "64"],
                               "model.monitor.eval_max_new_tokens=64 is not valid; accepted: at most 63 with the "
                               "embedded tiny model"),
    # issue #25
    "seed_everything -5": (["--seed_everything", "-5"],
                           "seed_everything=-5 is not valid; accepted: an integer in [0, 4294967295] (numpy's seed "
                           "range), or true for a random seed"),
    "num_samples 200000": (["--model.sampling.num_samples", "200000"],
                           "one training step would generate up to 4,000,000 response tokens per rank: 4 prompts "
                           "(data.prompts_per_step=4 over 1 rank) x model.sampling.num_samples=200000 x "
                           "model.sampling.max_new_tokens=5, more than model.guards.max_step_tokens=2,000,000; "
                           "accepted: at most 2,000,000 (lower one of those settings), or raise the bound on a machine that can "
                           "generate that much in one step: --model.guards.max_step_tokens 4000000"),
    "max_step_tokens 0": (["--model.guards.max_step_tokens", "0"],
                          "model.guards.max_step_tokens=0 is not valid; accepted: an integer >= 1"),
    "allow_changes without ckpt_path": (["--allow_changes", "[model.optim.lr]"],
                                        "--allow_changes=['model.optim.lr'] is not valid; accepted: nothing without "
                                        "--ckpt_path"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_fails_before_any_model_load(tmp_path, case, capsys):
    """A key that names nothing or a choice the field does not accept stops the parser (exit
    status 2, the message on stderr); a value a group's checks refuse raises ValueError."""
    extra, expected = CONFIG_CASES[case]
    with pytest.raises((ValueError, SystemExit)) as e:
        main(fit_args(tmp_path, *extra))
    message = str(e.value) if isinstance(e.value, ValueError) else capsys.readouterr().err
    assert isinstance(e.value, ValueError) or e.value.code == 2
    assert expected in " ".join(message.split())
    assert not (tmp_path / "tiny").exists()  # the model was never built nor loaded


def test_the_step_bound_passes_the_papers_gpu_shape():
    """configs/gsm8k_qwen.yaml (96 prompts x 8 samples x 1024 new tokens on one GPU) and twice its
    samples are under the default model.guards.max_step_tokens; three times is not, unless the
    bound is raised."""
    from reclight.trainer.cli import check_step_tokens

    qwen = ["--config", str(ROOT / "configs" / "gsm8k_qwen.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.logger", "false"]
    cli = main(qwen, run=False)
    assert check_step_tokens(cli.model, cli.datamodule, cli.trainer) == 96 * 8 * 1024 == 786_432
    cli = main([*qwen, "--model.sampling.num_samples", "16"], run=False)
    assert check_step_tokens(cli.model, cli.datamodule, cli.trainer) == 1_572_864
    with pytest.raises(ValueError, match=r"up to 2,359,296 response tokens per rank: 96 prompts .* --model.guards."
                                         r"max_step_tokens 2359296$"):
        main([*qwen, "--model.sampling.num_samples", "24"], run=False)
    cli = main([*qwen, "--model.sampling.num_samples", "24", "--model.guards.max_step_tokens", "2359296"], run=False)
    assert cli.model.sampling.num_samples == 24


def test_non_finite_values_from_a_yaml_file(tmp_path):
    cfg = tmp_path / "inf.yaml"
    cfg.write_text("model:\n  optim: {lr: .inf}\n")
    with pytest.raises(ValueError, match=r"model.optim.lr=inf is not valid; accepted: lr > 0 \(a finite number\)"):
        main(fit_args(tmp_path, "--config", str(cfg)))
    assert not (tmp_path / "tiny").exists()


def test_eval_max_new_tokens_is_taken_as_given():
    """Before, `eval_max_new_tokens or max_new_tokens` replaced a falsy cap silently; only null
    means "the sampling cap" now."""
    from reclight.engines.base import SamplingConfig
    from reclight.trainer.config import MonitorConfig

    sampling = SamplingConfig(max_new_tokens=7)
    assert RLModule(sampling=sampling, warmup=None).eval_max_new_tokens == 7
    assert RLModule(sampling=sampling, warmup=None, monitor=MonitorConfig(eval_max_new_tokens=3)).eval_max_new_tokens == 3


def test_model_folder_with_non_finite_weights_names_the_tensor(tmp_path):
    """Before: a raw sampling error (hf engine) or every step skipped with "lower model.lr" (fast)."""
    from transformers import AutoModelForCausalLM

    from reclight.models.tiny import TinyModelConfig, build_tiny

    folder = build_tiny(tmp_path / "models", TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        model.model.layers[0].mlp.up_proj.weight[0, :2] = float("inf")
    model.save_pretrained(folder)
    for engine in ("hf", "fast"):
        with pytest.raises(ValueError) as e:
            main(fit_args(tmp_path, "--model.policy.name_or_path", str(folder), "--model.engine.name", engine))
        assert str(e.value) == (
            f"model.policy.name_or_path={str(folder)!r} is not valid: its weights are not finite (tensor "
            "'model.layers.0.mlp.up_proj.weight' [64, 32] holds 0 NaN and 2 inf of 2048 values); accepted: a model "
            "whose every weight is finite (re-download or re-convert it)")


def test_model_folder_without_config_json(tmp_path):
    folder = tmp_path / "empty_model"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"name_or_path='.*empty_model' is not valid: the folder has no config.json"):
        main(fit_args(tmp_path, "--model.policy.name_or_path", str(folder)))


def test_unknown_field_on_the_command_line_and_in_yaml(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(fit_args(tmp_path, "--model.learning_rate", "0.1"))
    assert e.value.code == 2 and "unrecognized arguments: --model.learning_rate 0.1" in capsys.readouterr().err
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model:\n  learning_rate: 0.1\n")
    with pytest.raises(SystemExit) as e:
        main(fit_args(tmp_path, "--config", str(cfg)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: Subcommand 'fit' does not accept option 'model.learning_rate'" in err, err
    assert not (tmp_path / "tiny").exists()


def test_prompts_per_step_must_divide_by_the_ranks():
    class FakeTrainer:
        world_size, global_rank, max_steps = 3, 0, 5

    dm = RLDataModule(task=DigitTask(), prompts_per_step=4)
    dm.trainer = FakeTrainer()
    with pytest.raises(ValueError, match=r"data.prompts_per_step=4 is not valid; accepted: a multiple of the 3 "
                                         r"data-parallel ranks"):
        dm.setup("fit")


# -- data through the CLI (the loaders' own cases: tests/tasks/test_data.py) --------------------
def gsm8k_args(tmp_path, lines):
    data = tmp_path / "gsm8k"
    data.mkdir()
    if isinstance(lines, bytes):
        (data / "train.jsonl").write_bytes(lines)
    else:
        (data / "train.jsonl").write_text("".join(line + "\n" for line in lines))
    (data / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    return data, fit_args(tmp_path, "--data.task", "reclight.tasks.GSM8K", "--data.task.init_args.data_dir", str(data),
                          "--data.task.init_args.val_size", "1")


GOOD = json.dumps({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"})


@pytest.mark.parametrize("lines, expected", [
    ([GOOD, GOOD, '{"question": "x", "answer": '], "train.jsonl:3: malformed JSON"),
    ([GOOD, json.dumps({"question": "q"}), GOOD], "train.jsonl:2: missing required field 'answer'; fields present: ['question']"),
    ([], "empty data set: "),
    # issue #17, item 5 (before: a UnicodeDecodeError naming neither file nor line; 3/4 read as 3)
    ((GOOD + "\n" + GOOD + "\n").encode("utf-16"), "train.jsonl:1: the file is UTF-16 (little-endian) (it starts with "
                                                   "the byte-order mark b'\\xff\\xfe'); accepted: UTF-8 JSON Lines"),
    ((GOOD + "\n" + json.dumps({"question": "caf\u00e9?", "answer": "#### 4"}, ensure_ascii=False) + "\n").encode("latin-1"),
     "train.jsonl:2: not valid UTF-8 (byte b'\\xe9' at column 18: invalid continuation byte)"),
    ([GOOD, json.dumps({"question": "q", "answer": "1/2 + 1/4\n#### 3/4"})],
     "train.jsonl:2: field 'answer' ends with '#### 3/4', a fraction, which would be read as its numerator; accepted: "
     "'#### <number>' with one integer or decimal"),
    # issue #25 (before: an empty question was trained on)
    ([GOOD, json.dumps({"question": "  ", "answer": "#### 4"}), GOOD],
     "train.jsonl:2: field 'question'='  ' is not valid; accepted: a non-empty text"),
], ids=["malformed", "missing field", "empty", "utf-16", "latin-1", "fraction gold", "empty question"])
def test_bad_data_file_through_the_cli(tmp_path, lines, expected):
    data, args = gsm8k_args(tmp_path, lines)
    with pytest.raises(DataError) as e:
        main(args)
    assert expected in str(e.value) and str(data / "train.jsonl") in str(e.value)
    assert not (tmp_path / "tiny").exists()


# -- checkpoints through the CLI (the file checks themselves: tests/trainer/test_checkpoint.py) ---------
def test_bad_ckpt_path_through_the_cli(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), bad)
    with pytest.raises(CheckpointError, match=r"--ckpt_path='.*model.pt' is not valid: it is a plain state dict of 2 "
                                              r"tensors .*; accepted: a checkpoint written by `reclight fit`"):
        main(fit_args(tmp_path, "--ckpt_path", str(bad)))
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"the file is truncated \(100 bytes"):
        main(fit_args(tmp_path, "--ckpt_path", str(cut)))
    assert not (tmp_path / "tiny").exists()


# -- in-process fits of the micro model ---------------------------------------------------------
class Probe(pl.Callback):
    """Per step: the rollout, the weights and optimizer state before/after, the logged metrics."""

    def __init__(self):
        self.rollouts, self.before, self.after, self.opt_before, self.opt_after, self.metrics = {}, {}, {}, {}, {}, {}

    @staticmethod
    def _opt(trainer):
        state = trainer.optimizers[0].state_dict()["state"]
        return {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()} for k, v in state.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.rollouts[step] = batch
        self.before[step] = {n: p.detach().clone() for n, p in pl_module.policy.named_parameters()}
        self.opt_before[step] = self._opt(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.after[step] = {n: p.detach().clone() for n, p in pl_module.policy.named_parameters()}
        self.opt_after[step] = self._opt(trainer)
        self.metrics[step] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def fit(tmp_path, task, max_steps, **module_kwargs):
    probe = Probe()
    module_kwargs.setdefault("log_kl_init", False)
    module = micro_module(tmp_path, **module_kwargs)
    dm = RLDataModule(task=task, prompts_per_step=2, eval_size=4, eval_batch_size=4, seed=0)
    micro_trainer(tmp_path, max_steps, [probe]).fit(module, datamodule=dm)
    return module, probe


def same(a, b):
    return set(a) == set(b) and all(
        same(a[k], b[k]) if isinstance(a[k], dict) else (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])
        for k in a)


class FlakyReward(DigitTask):
    """Raises for responses that start with a digit, returns NaN for those that start with a
    space, inf for empty ones; the digit fraction otherwise."""

    def reward(self, response, example):
        if response[:1].isdigit():
            raise ZeroDivisionError("flaky reward")
        if response[:1] == " ":
            return float("nan")
        if response == "":
            return float("inf")
        return super().reward(response, example)


class BrokenReward(DigitTask):
    def reward(self, response, example):
        raise KeyError("no such field")


def test_failed_rewards_are_counted_and_get_no_gradient_then_stop_past_the_limit(tmp_path):
    module, probe = fit(tmp_path, FlakyReward(), max_steps=4, guards=GuardsConfig(max_failed_reward_frac=1.0))
    failed = {s: int((~r.reward_valid).sum()) for s, r in probe.rollouts.items()}
    assert sum(failed.values()) > 0  # the task did fail on some samples
    for s in failed:
        assert probe.metrics[s]["reward/failed"] == failed[s]
        assert torch.isfinite(probe.rollouts[s].rewards).all()
    for p in module.policy.parameters():
        assert torch.isfinite(p).all()

    # All samples fail, limit 1.0 (never stop): no sample has a gradient, the weights stay put.
    module, probe = fit(tmp_path, BrokenReward(), max_steps=2, guards=GuardsConfig(max_failed_reward_frac=1.0))
    assert probe.metrics[1]["reward/failed"] == 6
    for s in (0, 1):
        assert same(probe.before[s], probe.after[s])

    with pytest.raises(RuntimeError) as e:
        fit(tmp_path, BrokenReward(), max_steps=2)  # default max_failed_reward_frac=0.5
    assert ("step 0: the reward function failed (raised, or returned NaN/inf, a non-number or a magnitude beyond "
            "model.guards.max_abs_reward) for 6 of 6 samples (100%), more than model.guards.max_failed_reward_frac=0.5"
            ) in str(e.value)


class OddReward(DigitTask):
    """Issue #17, item 5: the digit fraction f of the response, returned as the string "f" for
    responses that start with a digit, as 1e38 x max(f, 0.5) for those that start with a letter,
    and as a NumPy float otherwise."""

    def reward(self, response, example):
        import numpy as np

        f = super().reward(response, example)
        if response[:1].isdigit():
            return str(f)
        if response[:1].isalpha():
            return 1e38 * max(f, 0.5)
        return np.float32(f)


def test_rewards_must_be_numbers_of_sane_magnitude():
    """score() by hand: strings, None and tensors are not numbers (before: float("1.0") took the
    string); 1e38 is finite but past model.guards.max_abs_reward (before: it poisoned the loss);
    bools and NumPy numbers are numbers."""
    import numpy as np

    from reclight.models.tiny import build_tokenizer
    from reclight.rollout.scoring import score
    from reclight.tasks.base import Example

    class Given(DigitTask):
        def __init__(self, values):
            super().__init__()
            self.values = iter(values)

        def reward(self, response, example):
            return next(self.values)

    tok = build_tokenizer()
    values = ["1.0", None, torch.tensor(1.0), 1e38, -2e6, True, np.int64(3), np.float32(0.5), 1e6]
    ids = torch.full((1, len(values), 2), tok.convert_tokens_to_ids("7"))
    rewards, valid, correct, failed = score(Given(values), tok, ids, torch.ones_like(ids, dtype=torch.bool),
                                            [Example("1+1=", "2", "u")])
    assert valid[0].tolist() == [False] * 5 + [True] * 4 and failed == 5
    assert rewards[0].tolist() == [0.0] * 5 + [1.0, 3.0, 0.5, 1e6]
    assert correct[0].tolist() == [False] * 5 + [True, True, False, True]
    _, valid, _, _ = score(Given([1e38]), tok, ids[:, :1], torch.ones_like(ids[:, :1], dtype=torch.bool),
                           [Example("1+1=", "2", "u")], max_abs_reward=1e39)
    assert valid.all()  # the bound is the guard's field, not a constant


def test_non_numeric_and_absurd_rewards_are_counted_and_get_no_gradient(tmp_path, caplog):
    module, probe = fit(tmp_path, OddReward(), max_steps=3, guards=GuardsConfig(max_failed_reward_frac=1.0))
    kinds = set()
    for s, r in probe.rollouts.items():
        for ids, m, ok in zip(r.response_ids.flatten(0, 1), r.response_mask.flatten(0, 1), r.reward_valid.flatten()):
            text = module.tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
            kind = "str" if text[:1].isdigit() else "huge" if text[:1].isalpha() else "number"
            kinds.add(kind)
            assert bool(ok) == (kind == "number"), text
        assert probe.metrics[s]["reward/failed"] == int((~r.reward_valid).sum())
        assert r.rewards.abs().max() <= 1.0  # no 1e38 reached the advantages
    assert kinds == {"str", "huge", "number"}  # every kind occurred (seeded)
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert "returned str '" in caplog.text and "(accepted: a number or a bool; convert it in the reward function)" in caplog.text
    assert ("of magnitude beyond model.guards.max_abs_reward=1e+06 (rescale the reward, or raise the bound)"
            in caplog.text)


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(monkeypatch, holder, steps, kind):
    real = module_lib.policy_loss

    def policy_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        if holder["module"].global_step in steps:
            loss = loss * float("nan") if kind == "loss" else NanGrad.apply(loss)
        return loss, metrics

    monkeypatch.setattr(module_lib, "policy_loss", policy_loss)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_is_skipped_with_weights_and_optimizer_untouched(tmp_path, monkeypatch, kind):
    holder = {}
    real_init = RLModule.on_fit_start

    def on_fit_start(self):
        holder["module"] = self
        real_init(self)

    monkeypatch.setattr(RLModule, "on_fit_start", on_fit_start)
    poison(monkeypatch, holder, {1, 3}, kind)
    module, probe = fit(tmp_path, DigitTask(), max_steps=5, guards=GuardsConfig(max_consecutive_skips=2),
                        optim_kwargs=dict(lr_warmup_steps=3))
    skipped = [0, 1, 1, 2, 2]  # cumulative train/skipped_steps after steps 0..4
    for s in range(5):
        assert probe.metrics[s]["train/skipped_steps"] == skipped[s]
        if s in (1, 3):
            assert same(probe.before[s], probe.after[s]) and same(probe.opt_before[s], probe.opt_after[s])
        else:
            assert not same(probe.before[s], probe.after[s]) and not same(probe.opt_before[s], probe.opt_after[s])
    # The LR schedule counts applied updates only: steps 0, 2, 4 are updates 1, 2, 3 of the 3-update
    # warm-up (lr x 1/3, 2/3, 1); a skipped step shows the LR it would have used.
    assert [probe.metrics[s]["train/lr"] for s in range(5)] == pytest.approx([0.01, 0.02, 0.02, 0.03, 0.03])
    assert module.trainer.global_step == 5


def test_consecutive_non_finite_steps_stop_the_run(tmp_path, monkeypatch):
    holder = {}
    real_init = RLModule.on_fit_start
    monkeypatch.setattr(RLModule, "on_fit_start", lambda self: (holder.setdefault("module", self), real_init(self)))
    poison(monkeypatch, holder, {1, 2, 3, 4}, "loss")
    with pytest.raises(RuntimeError) as e:
        fit(tmp_path, DigitTask(), max_steps=6, guards=GuardsConfig(max_consecutive_skips=3))
    msg = str(e.value)
    assert msg.startswith("step 3: 3 steps in a row had a non-finite loss or gradient (this one: loss=nan")
    assert "stopping at model.guards.max_consecutive_skips=3" in msg


def test_guard_counts_and_resets():
    g = NonFiniteGuard(max_consecutive=2)
    assert [g.update(b, s, 0.0, 0.0) for s, b in enumerate([False, True, False, True])] == [False, True, False, True]
    assert g.state_dict() == {"total": 2, "consecutive": 1}
    with pytest.raises(RuntimeError, match="step 4: 2 steps in a row"):
        g.update(True, 4, float("inf"), 1.0)


# -- degenerate rollouts ------------------------------------------------------------------------
def test_rollout_health_by_hand():
    """EOS id 2, max_new_tokens 4. Group 0: (0,0) is EOS only -> empty; (0,1) four tokens, no
    EOS -> truncated; (0,2) one token + EOS. Group 1: (1,0) no token at all (mask all false) ->
    empty, not truncated; (1,1) two tokens, no EOS, shorter than 4 (a stop string) -> neither.
    Rewards: group 0 [0, 1, 0] varies; group 1 [0.5, 0.5, invalid] uniform among valid ones.
    So empty 2/6, truncated 1/6, uniform groups 1/2."""
    ids = torch.tensor([[[2, 0, 0, 0], [5, 6, 7, 8], [5, 2, 0, 0]],
                        [[0, 0, 0, 0], [5, 6, 0, 0], [5, 6, 2, 0]]])
    mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]],
                         [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]], dtype=torch.bool)
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    h = rollout_health(ids, mask, rewards, valid, eos_ids=[2], max_new_tokens=4)
    assert h["response/empty_frac"].item() == pytest.approx(2 / 6)
    assert h["response/truncated_frac"].item() == pytest.approx(1 / 6)
    assert h["reward/uniform_groups_frac"].item() == 0.5
    # A group with a single valid reward has no baseline: counted as uniform (advantage 0).
    h = rollout_health(ids, mask, rewards, torch.tensor([[True, False, False], [True, True, True]]), [2], 4)
    assert h["reward/uniform_groups_frac"].item() == 0.5


class ConstantReward(DigitTask):
    def reward(self, response, example):
        return 0.5


def test_identical_rewards_give_zero_advantage_and_leave_the_weights(tmp_path):
    module, probe = fit(tmp_path, ConstantReward(), max_steps=2)
    for s in (0, 1):
        m = probe.metrics[s]
        assert m["reward/uniform_groups_frac"] == 1.0 and m["adv/abs_mean"] == 0.0 and m["loss/policy"] == 0.0
        assert same(probe.before[s], probe.after[s])
        r = probe.rollouts[s]
        h = rollout_health(r.response_ids, r.response_mask, r.rewards, r.reward_valid, eos_ids(module.tokenizer), 3)
        assert m["response/truncated_frac"] == h["response/truncated_frac"].item()
        assert m["response/empty_frac"] == h["response/empty_frac"].item()
