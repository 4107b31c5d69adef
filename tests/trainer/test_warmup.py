"""The supervised warm-up's stop rule, with the greedy accuracy scripted: it checks at steps
0, check_every, 2 check_every, ... and stops at the first check that reaches the target; out of
steps, it checks once more so the reported accuracy is current."""

import pytest
import torch

import reclight.trainer.warmup as warmup_lib
from conftest import MICRO, DigitTask
from reclight.models.loading import load_causal_lm
from reclight.models.tiny import build_tiny
from reclight.trainer.warmup import WarmupConfig, supervised_warmup


def _run(tmp_path, monkeypatch, accuracies, cfg):
    checks = []

    def greedy_eval(model, tokenizer, task, examples, **kw):
        acc = accuracies[len(checks)]
        checks.append(len(examples))
        n = len(examples)
        correct = torch.arange(n) < round(acc * n)
        return correct, correct.float(), torch.ones(n)

    monkeypatch.setattr(warmup_lib, "greedy_eval", greedy_eval)
    model, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=0)))
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
    assert checks == [10, 10, 10]  # on the last check_size val examples (DigitTask has 10)
    assert logged == [(0, ["warmup/acc"]), (2, ["warmup/acc", "warmup/loss"]), (4, ["warmup/acc", "warmup/loss"])]
    assert moved


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
    assert str(e.value) == f"WarmupConfig.{field}={value!r} is not valid; accepted: {accepted}"
