"""The supervised warm-up's stop rule, with the greedy accuracy scripted: it checks at steps
0, check_every, 2 check_every, ... and stops at the first check that reaches the target; out of
steps, it checks once more so the reported accuracy is current. It checks on the task's
``check`` split, never on ``val`` (what every RL evaluation scores)."""

import dataclasses

import pytest
import torch

import reclight.trainer.warmup as warmup_lib
from conftest import MICRO, DigitTask
from reclight.models.loading import load_causal_lm
from reclight.models.tiny import build_tiny
from reclight.tasks.base import Example
from reclight.trainer.warmup import WarmupConfig, supervised_warmup


def _run(tmp_path, monkeypatch, accuracies, cfg, wrap=lambda tok: tok, checked=None):
    checks = []

    def greedy_eval(model, tokenizer, task, examples, **kw):
        acc = accuracies[len(checks)]
        checks.append(len(examples))
        if checked is not None:
            checked.append([e.prompt for e in examples])
        n = len(examples)
        correct = torch.arange(n) < round(acc * n)
        return correct, correct.float(), torch.ones(n)

    monkeypatch.setattr(warmup_lib, "greedy_eval", greedy_eval)
    model, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=0)))
    tok = wrap(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logged = []
    stats = supervised_warmup(model, tok, DigitTask(), cfg, seed=0, max_new_tokens=3,
                              log=lambda m, step: logged.append((step, sorted(m))))
    moved = any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    return stats, checks, logged, moved


def test_stops_at_the_first_check_that_reaches_the_target(tmp_path, monkeypatch):
    cfg = WarmupConfig(target_accuracy=0.4, max_steps=50, batch_size=4, check_every=2, check_size=10)
    stats, checks, logged, moved = _run(tmp_path, monkeypatch, [0.1, 0.3, 0.5, 0.9], cfg)
    assert stats["warmup/steps"] == 4 and stats["warmup/acc"] == pytest.approx(0.5)  # checks at steps 0, 2, 4
    assert checks == [10, 10, 10]  # on the first check_size check examples (DigitTask has 10)
    assert logged == [(0, ["warmup/acc"]), (2, ["warmup/acc", "warmup/loss"]), (4, ["warmup/acc", "warmup/loss"])]
    assert moved


def test_it_checks_on_the_check_split_disjoint_from_val(tmp_path, monkeypatch):
    """Every check scores the first check_size problems of the task's check split, none of which
    is a val problem (before: the last check_size val problems, so the warm-up stopped on the
    problems every RL evaluation scores). DigitTask: 100 one-digit pairs, 10 val, 10 test, 10
    check; check_size=6 takes the first 6 of the check split."""
    cfg = WarmupConfig(target_accuracy=0.4, max_steps=50, batch_size=4, check_every=2, check_size=6)
    checked = []
    _run(tmp_path, monkeypatch, [0.1, 0.5], cfg, checked=checked)
    task = DigitTask()
    check = [e.prompt for e in task.examples("check")]
    assert len(check) == 10 and checked == [check[:6], check[:6]]
    assert not set(check) & {e.prompt for e in task.examples("val")}


def test_a_start_at_the_target_trains_nothing(tmp_path, monkeypatch):
    cfg = WarmupConfig(target_accuracy=0.4, max_steps=50, batch_size=4, check_every=2, check_size=10)
    stats, checks, _, moved = _run(tmp_path, monkeypatch, [0.4], cfg)
    assert stats["warmup/steps"] == 0 and stats["warmup/acc"] == pytest.approx(0.4) and checks == [10] and not moved


def test_out_of_steps_checks_once_more(tmp_path, monkeypatch):
    cfg = WarmupConfig(target_accuracy=1.0, max_steps=3, batch_size=4, check_every=2, check_size=5)
    stats, checks, logged, _ = _run(tmp_path, monkeypatch, [0.0, 0.2, 0.6], cfg)
    # checks at steps 0 and 2 (below target), the loop ends at step 3, then the final check
    assert stats["warmup/steps"] == 3 and stats["warmup/acc"] == pytest.approx(0.6) and checks == [5, 5, 5]
    assert [s for s, _ in logged] == [0, 2]


@pytest.mark.parametrize("field, value, accepted", [
    ("target_accuracy", 1.5, "[0, 1]"), ("max_steps", 0, "an integer >= 1"), ("lr", 0.0, "lr > 0"),
    ("lr", float("inf"), "lr > 0 (a finite number)"), ("check_every", True, "an integer >= 1"),
])
def test_bad_values_name_the_field(field, value, accepted):
    with pytest.raises(ValueError) as e:
        WarmupConfig(**{field: value})
    assert str(e.value) == f"model.warmup.{field}={value!r} is not valid; accepted: {accepted}"


class _ListEosNoPad:
    """A tokenizer as some generation configs have it: ``eos_token_id`` a list (the first is the
    one to write) and no pad id. Everything else is the wrapped tokenizer's (None: a digit
    tokenizer, digit d -> id 10 + d)."""

    eos_token_id = [7, 9]
    pad_token_id = None

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, text, **kw):
        if self.inner is not None:
            return self.inner(text, **kw)
        if isinstance(text, list):
            return {"input_ids": [[10 + int(c) for c in t] for t in text]}
        return {"input_ids": [10 + int(c) for c in text]}

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_answer_tokens_with_a_list_eos_and_no_pad_id():
    """Answers "12" and "3": ids 11 12 then EOS 7 (the first of [7, 9]); the short row is padded
    with 7 too (no pad id: the first EOS id), and its pad is masked out. Prompts "45" and "6" are
    left-padded with the same 7."""
    examples = [Example(prompt="45", answer="12", uid="a"), Example(prompt="6", answer="3", uid="b")]
    pid, pmask, ids, mask = warmup_lib._EncodedExamples(_ListEosNoPad(), examples, None).batch([0, 1])
    assert pid.tolist() == [[14, 15], [7, 16]] and pmask.tolist() == [[True, True], [False, True]]
    assert ids.tolist() == [[11, 12, 7], [13, 7, 7]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]


def test_warmup_trains_with_a_list_eos_and_no_pad_id(tmp_path, monkeypatch):
    """The whole warm-up with such a tokenizer (the tiny model's, its EOS given as a list with an
    extra id, its pad id removed): it trains (the weights move) and stops at the target."""
    def wrap(tok):
        odd = _ListEosNoPad(tok)
        odd.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
        return odd

    cfg = WarmupConfig(target_accuracy=0.4, max_steps=50, batch_size=4, check_every=2, check_size=10)
    stats, _, _, moved = _run(tmp_path, monkeypatch, [0.1, 0.5], cfg, wrap=wrap)
    assert stats["warmup/steps"] == 2 and moved


def test_examples_tokenized_once_give_the_per_step_tensors(tmp_path):
    """The warm-up tokenizes its training examples once and pads each step's batch from the
    stored ids: the same four tensors as encode_prompts and a per-answer tokenization (answer
    tokens, EOS, right-padded with the pad id) on that batch (prompts of different lengths,
    left-padded), for random batches."""
    from reclight.models.tokens import encode_prompts

    _, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=0)))
    examples = [e for e in DigitTask().examples("train")]
    examples = [dataclasses.replace(e, prompt=e.prompt * (1 + i % 3), answer=e.answer * (1 + i % 2))
                for i, e in enumerate(examples)]
    encoded = warmup_lib._EncodedExamples(tok, examples, None)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = torch.randint(len(examples), (7,), generator=gen).tolist()
        batch = [examples[i] for i in idx]
        rows = [tok(e.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for e in batch]
        T = max(map(len, rows))
        aid = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
        amask = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in rows])
        want = (*encode_prompts(tok, [e.prompt for e in batch]), aid, amask)
        got = encoded.batch(idx)
        assert len({t.shape[1] for t in want[:2]}) == 1 and want[1].sum(1).unique().numel() > 1  # padding happened
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)
