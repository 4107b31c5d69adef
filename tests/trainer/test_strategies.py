"""Strategy configs: the FSDP config parses to Lightning's ModelParallelStrategy (FSDP2), and
the policy sharding rule selects exactly the decoder layers. The 2-process FSDP run itself is
tests/trainer/test_fsdp.py."""

from pathlib import Path

import pytest

from reclight.trainer.cli import main
from reclight.models.fsdp import is_decoder_layer, shard_policy

ROOT = Path(__file__).resolve().parents[2]


def test_fsdp_config_resolves_to_model_parallel_strategy(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "configs/gsm8k_qwen.yaml"), "--config",
              str(ROOT / "configs/strategy/fsdp.yaml"), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "lightning.pytorch.strategies.ModelParallelStrategy" in out
    assert "tensor_parallel_size: 1" in out and "data_parallel_size: 8" in out


def test_decoder_layers_are_the_shard_units():
    """On a 2-layer Llama exactly the two LlamaDecoderLayer modules match (not attention, MLP,
    norms or embeddings); a model without decoder layers is refused with a clear message."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    assert [name for name, m in model.named_modules() if is_decoder_layer(m)] == ["model.layers.0", "model.layers.1"]
    with pytest.raises(ValueError, match="no \\*DecoderLayer modules to shard"):
        shard_policy(torch.nn.Linear(2, 2), mesh=None)
