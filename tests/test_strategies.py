"""Strategy configs: the FSDP config parses to a real FSDPStrategy whose wrap policy shards
exactly the decoder layers (FSDP itself needs a GPU; Lightning refuses it on CPU)."""

from pathlib import Path

import pytest

from reclight.cli import main
from reclight.fsdp import wrap_decoder_layers

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp_config_resolves_the_wrap_policy(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "configs/gsm8k_qwen.yaml"), "--config",
              str(ROOT / "configs/strategy/fsdp.yaml"), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "lightning.pytorch.strategies.FSDPStrategy" in out
    assert "auto_wrap_policy: reclight.fsdp.wrap_decoder_layers" in out
    assert "sharding_strategy: FULL_SHARD" in out


def test_wrap_policy_selects_decoder_layers_of_a_llama():
    """On a 2-layer Llama: recursion always continues, and of all submodules exactly the two
    LlamaDecoderLayer instances are wrapped (not attention, MLP, norms or embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    wrapped = [name for name, m in model.named_modules() if wrap_decoder_layers(m, False, 0)]
    assert wrapped == ["model.layers.0", "model.layers.1"]
    assert all(wrap_decoder_layers(m, True, 0) for m in model.modules())
