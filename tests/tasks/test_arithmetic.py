"""The embedded tokenizer, tiny model cache and arithmetic task."""

import pytest

from reclight.tasks.arithmetic import Arithmetic
from reclight.models.tiny import build_tiny, build_tokenizer
from conftest import MICRO


def test_tokenizer_is_char_level_and_round_trips():
    tok = build_tokenizer()
    ids = tok("07+45=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and tok.decode(ids) == "07+45="
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "07+45="
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_build_tiny_saves_loads_and_reuses(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny(tmp_path, MICRO, seed=1)
    mtime = (path / "config.json").stat().st_mtime_ns
    assert build_tiny(tmp_path, MICRO, seed=1) == path and (path / "config.json").stat().st_mtime_ns == mtime
    assert build_tiny(tmp_path, MICRO, seed=2) != path  # another seed never reuses the folder
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 16 and len(tok) == model.config.vocab_size == 101


def test_arithmetic_splits_are_disjoint_deterministic_and_scored():
    task = Arithmetic(digits=2, val_size=500, test_size=1000, split_seed=1234)
    tr, va, te, ch = (task.examples(s) for s in ("train", "val", "test", "check"))
    # 10,000 pairs: 1000 test, 500 val, 500 check (check_size=None: val_size), the rest train
    assert (len(tr), len(va), len(te), len(ch)) == (8000, 500, 1000, 500)
    prompts = [set(e.prompt for e in s) for s in (tr, va, te, ch)]
    assert sum(map(len, prompts)) == 10_000 and len(set().union(*prompts)) == 10_000  # a partition
    assert [e.prompt for e in Arithmetic(split_seed=1234).examples("val")] == [e.prompt for e in va]
    ex = next(e for e in va)
    a, b = map(int, ex.prompt[:-1].split("+"))
    # padded by default: 2-digit operands -> 3-character sums ("007+045=" style answers "052")
    assert ex.answer == f"{a + b:03d}" and len(ex.prompt) == 6 and len(ex.answer) == 3
    assert task.reward(f" {a + b:03d}", ex) == 1.0 and task.reward(f"{a + b + 1:03d}", ex) == 0.0
    assert task.reward(f"{a + b:03d}0", ex) == 0.0
    # unpadded on request, e.g. 7 + 5: "12", and "012" is then wrong
    plain = Arithmetic(pad_answer=False)
    ex7 = next(e for e in plain.examples("train") if e.prompt == "07+05=")
    assert ex7.answer == "12" and plain.reward("12", ex7) == 1.0 and plain.reward("012", ex7) == 0.0
    padded7 = next(e for e in Arithmetic().examples("train") if e.prompt == "07+05=")
    assert padded7.answer == "012"


def test_arithmetic_rejects_bad_args():
    with pytest.raises(ValueError, match=r"digits=0 .*\[1, 9\]"):
        Arithmetic(digits=0)
    with pytest.raises(ValueError, match=r"val_size \+ test_size"):
        Arithmetic(digits=1, val_size=50, test_size=50)
    with pytest.raises(ValueError, match=r"split='dev'"):
        Arithmetic().examples("dev")
