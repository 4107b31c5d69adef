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


def test_greedy_eval_in_pieces_on_threads_decodes_the_same_tokens(tmp_path, monkeypatch):
    """Pieces of 64 prompts (300 prompts: 5 pieces) side by side on 2 threads: bitwise the pieces
    in turn at one intra-op thread, and the same scores as the whole batch; the module hands the
    rollout engine's pieces (``model.engine.fast``: micro_batch_size x K rows, its threads) to
    every greedy evaluation, the warm-up's checks included."""
    from conftest import fit_micro
    from reclight.engines.config import EngineConfig, FastEngineOptions
    from reclight.kernels.threads import usable_threads
    from reclight.trainer.warmup import WarmupConfig
    import reclight.trainer.module as module_lib
    import reclight.trainer.warmup as warmup_lib

    model, tok = load_causal_lm(str(build_tiny(tmp_path, SMALL, seed=0)))
    with torch.no_grad():  # a model whose answers vary, so equal scores mean something
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    task = Arithmetic(digits=2, val_size=300, test_size=10, split_seed=0)
    examples = list(task.examples("val"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = ev.greedy_eval(model, tok, task, examples, max_new_tokens=5)
        in_turn = ev.greedy_eval(model, tok, task, examples, max_new_tokens=5, micro_batch_size=64)
        side_by_side = ev.greedy_eval(model, tok, task, examples, max_new_tokens=5, micro_batch_size=64, threads=2)
    finally:
        torch.set_num_threads(before)
    engine = ev._ENGINES[model]
    assert (engine.micro_batch_size, engine._pieces.threads) == (64, usable_threads(2))
    assert whole[2].unique().numel() > 1  # lengths vary
    for a, b, c in zip(whole, in_turn, side_by_side):
        assert torch.equal(b, c) and torch.equal(a, b)

    seen = []
    for lib in (module_lib, warmup_lib):
        real = lib.greedy_eval
        monkeypatch.setattr(lib, "greedy_eval", lambda *a, real=real, lib=lib, **kw: seen.append(
            (lib.__name__, kw.get("micro_batch_size"), kw.get("threads"))) or real(*a, **kw))
    warm = WarmupConfig(target_accuracy=1.0, max_steps=1, batch_size=4, check_every=1, check_size=4)
    fit_micro(tmp_path / "fit", 1, warmup=warm,
              engine=EngineConfig(name="fast", fast=FastEngineOptions(micro_batch_size=1, threads=2)))
    assert {s[0] for s in seen} == {module_lib.__name__, warmup_lib.__name__}
    assert {s[1:] for s in seen} == {(3, 2)}  # 1 prompt x K=3 samples a piece, 2 threads
