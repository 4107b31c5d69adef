"""The defaults of the engine and the training forward (issue #15 item 2): ``auto`` picks the
fast engine and the fused forward where they apply, HF's otherwise, and says why; under a bf16
trainer precision the engine's copy is bf16 unless a dtype is set."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import DigitTask, micro_module

from reclight.engines import resolve_engine_name
from reclight.engines.base import SamplingConfig
from reclight.engines.config import EngineConfig
from reclight.trainer.config import TrainForwardConfig
from reclight.trainer.data import RLDataModule

LLAMA = SimpleNamespace(config=SimpleNamespace(model_type="llama", hidden_act="silu"))
QWEN = SimpleNamespace(config=SimpleNamespace(model_type="qwen2", hidden_act="silu"))


def test_auto_engine_is_fast_only_where_it_applies():
    auto, greedy = EngineConfig(), SamplingConfig()
    assert resolve_engine_name(auto, LLAMA, greedy) == ("fast", "")
    name, why = resolve_engine_name(auto, LLAMA, SamplingConfig(top_p=0.9))
    assert name == "hf" and why == "sampling.top_p=0.9"
    name, why = resolve_engine_name(auto, LLAMA, greedy, stop_strings=("\n",))
    assert name == "hf" and why == "the task's stop strings ('\\n',)"
    name, why = resolve_engine_name(auto, QWEN, greedy)
    assert name == "hf" and why == "model_type='qwen2' (accepted: 'llama')"
    for explicit in ("hf", "fast", "vllm"):  # an explicit choice is never changed
        assert resolve_engine_name(EngineConfig(name=explicit), QWEN, SamplingConfig(top_p=0.5)) == (explicit, "")


def test_auto_forward_is_fused_for_llama_and_hf_otherwise():
    from reclight.models.forward import resolve_forward_impl

    llama, qwen = LLAMA.config, QWEN.config
    assert resolve_forward_impl("auto", False, llama, sharded=False) == ("fused", "model.train_forward.impl auto: fused")
    assert resolve_forward_impl("auto", False, llama, sharded=True)[0] == "hf"  # FSDP
    assert resolve_forward_impl("auto", False, qwen, sharded=False) == (
        "hf", "model.train_forward.impl auto: hf (model_type='qwen2' (accepted: 'llama'))")
    assert resolve_forward_impl("hf", False, llama, sharded=False) == ("hf", None)  # explicit: no note
    with pytest.raises(ValueError, match=r"model.train_forward.impl='fused' is not valid; accepted: 'hf' or 'auto' "
                                         r"here: the fused forward does not support model_type='qwen2'"):
        resolve_forward_impl("fused", False, qwen, sharded=False)
    with pytest.raises(ValueError, match=r"model.train_forward.compile=True is not valid; accepted: false here: "
                                         r"model.train_forward.impl auto is 'hf' for this policy \(model_type='qwen2'"):
        resolve_forward_impl("auto", True, qwen, sharded=False)
    assert resolve_forward_impl("auto", True, llama, sharded=False)[0] == "fused"
    with pytest.raises(ValueError, match=r"model.train_forward.compile=True is not valid; accepted: true only with "
                                         r"model.train_forward.impl: fused"):
        TrainForwardConfig(impl="hf", compile=True)


@pytest.mark.parametrize("precision, dtype, expected", [
    ("bf16-mixed", None, torch.bfloat16),     # the CLI's default precision: a bf16 engine copy
    ("32-true", None, torch.float32),         # the policy's dtype
    ("bf16-mixed", "float32", torch.float32),  # an explicit dtype wins
])
def test_default_run_uses_the_fast_engine_and_fused_forward(tmp_path, precision, dtype, expected):
    """A real fit with the defaults: the fast engine (its weight copy in the dtype the precision
    implies) and the fused forward, and the trained (master) weights stay fp32."""
    module = micro_module(tmp_path, engine=EngineConfig(dtype=dtype), train_forward=TrainForwardConfig())
    dm = RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4, eval_batch_size=4, seed=0)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path), accelerator="cpu", devices=1, precision=precision)
    trainer.fit(module, datamodule=dm)
    engine = module.rollouts.engine
    assert type(engine).__name__ == "FastLlamaEngine" and engine.dtype == expected
    assert module.forward_impl == "fused"
    assert all(p.dtype == torch.float32 for p in module.policy.parameters())


def test_default_precision_is_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch):
    """bf16 autocast on an AVX2-only CPU is emulated (2.3x slower than fp32 on the main job), so
    the CLI's default precision is bf16-mixed only with bf16 instructions or a bf16 GPU."""
    from reclight.trainer import cli

    monkeypatch.delenv(cli.CPU_BF16_ENV, raising=False)  # the suite may run with RECLIGHT_CPU_BF16 set
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cli.cpu_has_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cli.cpu_has_bf16(str(info))
    assert not cli.cpu_has_bf16(str(tmp_path / "missing"))  # not Linux: no bf16 assumed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # RECLIGHT_CPU_BF16 overrides /proc/cpuinfo (the suite's way to run the bf16 default on an AVX2
    # machine), and the reason the CLI prints names it
    monkeypatch.setenv(cli.CPU_BF16_ENV, "1")
    assert cli.cpu_has_bf16(str(tmp_path / "missing"))
    assert cli.precision_choice() == ("bf16-mixed", "RECLIGHT_CPU_BF16=1 in the environment")
    monkeypatch.setenv(cli.CPU_BF16_ENV, "0")
    assert not cli.cpu_has_bf16(str(info)) and cli.default_precision() == "32-true"
    assert cli.trainer_defaults()["precision"] == "32-true"
    monkeypatch.setenv(cli.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=r"RECLIGHT_CPU_BF16='yes' is not valid; accepted: 1 .*, 0 .*, or unset"):
        cli.cpu_has_bf16()
    monkeypatch.delenv(cli.CPU_BF16_ENV)
    for has, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(cli, "cpu_has_bf16", lambda has=has: has)
        assert cli.default_precision() == expected
    assert "no native bf16" in cli.precision_choice()[1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert cli.default_precision() == expected
