"""The greedy evaluation decodes with the fast engine where it applies: the same tokens, masks,
rewards and lengths as Hugging Face greedy ``generate`` (fp32, on a 4-layer tiny Llama and 300
arithmetic prompts of different lengths), also after the weights change between evaluations (the
kept engine refreshes its copy), and HF ``generate`` wherever the engine does not apply."""

from __future__ import annotations

import dataclasses

import torch

import reclight.trainer.evaluation as ev
from reclight.models.loading import load_causal_lm
from reclight.models.tiny import TinyModelConfig, build_tiny
from reclight.tasks.arithmetic import Arithmetic

SMALL = TinyModelConfig(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=160, max_positions=64)


def _both(model, tok, task, examples, monkeypatch):
    fast = ev.greedy_eval(model, tok, task, examples, max_new_tokens=5)
    with monkeypatch.context() as m:
        m.setattr(ev, "_fast_greedy", lambda *a, **k: None)
        hf = ev.greedy_eval(model, tok, task, examples, max_new_tokens=5)
    return fast, hf


def test_fast_greedy_equals_hf_greedy_and_follows_the_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, tok = load_causal_lm(str(build_tiny(tmp_path, SMALL, seed=0)))
    task = Arithmetic(digits=2, val_size=300, test_size=10, split_seed=0)
    examples = [dataclasses.replace(e, prompt=e.prompt * (1 + i % 2)) for i, e in enumerate(task.examples("val"))]
    # round 0: the random model; round 1: after moving every weight (the kept engine must follow)
    for round_ in range(2):
        fast, hf = _both(model, tok, task, examples, monkeypatch)
        assert ev._ENGINES.get(model) is not None  # the fast path ran (and is kept for the next call)
        for a, b in zip(fast, hf):
            assert torch.equal(a, b), round_
        assert hf[2].unique().numel() > 1 or round_ == 0  # lengths vary once the model has moved
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)


def test_where_the_fast_engine_does_not_apply_hf_generate_decodes(tmp_path):
    model, tok = load_causal_lm(str(build_tiny(tmp_path, SMALL, seed=0)))

    class Stops(Arithmetic):
        @property
        def stop_strings(self):
            return ("=",)

    assert ev._fast_greedy(model, tok, Arithmetic(digits=1, val_size=5, test_size=5), 3) is not None
    assert ev._fast_greedy(model, tok, Stops(digits=1, val_size=5, test_size=5), 3) is None
    model.config.model_type = "qwen3_moe"  # not the Llama block the engine implements
    assert ev._fast_greedy(model, tok, Arithmetic(digits=1, val_size=5, test_size=5), 3) is None
