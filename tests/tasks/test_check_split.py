"""Every task's ``check`` split (where the supervised warm-up decides to stop) shares no prompt
with ``val`` (what every ``val/acc`` scores), ``train`` or ``test``; it is deterministic, comes
out of the training pool, and leaves ``val`` and ``test`` as they were before it existed.

Before: the warm-up stopped on the last ``check_size`` problems of ``val`` itself."""

import json
import random
from pathlib import Path

import pytest

from reclight.tasks import GSM8K, Math500, VarLenAddition
from reclight.tasks.arithmetic import Arithmetic

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _prompts(task, split):
    return [e.prompt for e in task.examples(split)]


def _assert_held_out(task, n_check):
    """check has ``n_check`` distinct prompts, none of them in val, test or train."""
    check = _prompts(task, "check")
    assert len(check) == len(set(check)) == n_check
    for split in ("val", "test", "train"):
        assert not set(check) & set(_prompts(task, split)), split


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_arithmetic_check_is_held_out_of_the_training_pool():
    """2-digit pairs: 10,000 = 1000 test + 500 val + 500 check + 8000 train; with
    check_size=200, 200 check and 8300 train. val and test do not depend on check_size."""
    task = Arithmetic()
    _assert_held_out(task, 500)
    small = Arithmetic(check_size=200)
    _assert_held_out(small, 200)
    assert len(small.examples("train")) == 8300 and _prompts(small, "check") == _prompts(task, "check")[:200]
    for split in ("val", "test"):
        assert _prompts(small, split) == _prompts(task, split)
    with pytest.raises(ValueError, match=r"Arithmetic.check_size=0 is not valid; accepted: None or an integer >= 1"):
        Arithmetic(check_size=0)
    with pytest.raises(ValueError, match=r"Arithmetic.val_size \+ test_size \+ check_size = 100 is not valid for "
                                         r"digits=1; accepted: fewer than 100"):
        Arithmetic(digits=1, val_size=10, test_size=10, check_size=80)


def test_varlen_check_is_held_out_of_the_training_pool():
    task = VarLenAddition()
    _assert_held_out(task, 500)
    assert _prompts(VarLenAddition(check_size=100), "val") == _prompts(task, "val")
    with pytest.raises(ValueError, match=r"data.task.init_args.check_size=200000 is not valid; accepted: an integer "
                                         r"in \[1, 163640\]"):
        VarLenAddition(check_size=200_000)


def _gsm8k_file(folder, n):
    _write(folder / "train.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(n)])
    _write(folder / "test.jsonl", [{"question": f"t{i}", "answer": f"#### {i}"} for i in range(5)])


@pytest.mark.parametrize("seed", range(5))
def test_gsm8k_check_is_a_second_slice_of_the_train_file(tmp_path, seed):
    """40 train-file rows, val_size=10, check_size=None (= 10): 20 left to train; the slices
    change with the seed but never overlap."""
    _gsm8k_file(tmp_path, 40)
    task = GSM8K(data_dir=str(tmp_path), val_size=10, seed=seed)
    _assert_held_out(task, 10)
    assert len(task.examples("train")) == 20
    assert _prompts(GSM8K(data_dir=str(tmp_path), val_size=10, seed=seed), "check") == _prompts(task, "check")


@pytest.mark.skipif(not (DATA / "gsm8k" / "train.jsonl").is_file(), reason="GSM8K data not found")
def test_gsm8k_real_check_split():
    _assert_held_out(GSM8K(data_dir=str(DATA / "gsm8k")), 200)


@pytest.mark.parametrize("seed", range(5))
def test_math500_check_never_holds_a_test_problem(tmp_path, seed):
    """MATH-500's val is a subset of its test file, so test cannot give a check set. A train file
    of 30 problems, 10 of which repeat test problems (val's 5 among them): check_size=15 draws
    from the 20 others only, so it holds none of val; train keeps the other 15."""
    test = [{"problem": f"t{i}", "answer": "1"} for i in range(20)]
    _write(tmp_path / "test.jsonl", test)
    held = Math500(data_dir=str(tmp_path), val_size=5, seed=seed).examples("val")
    val = {e.prompt for e in held}
    repeats = [test[int(e.uid.rsplit(":", 1)[1]) - 1] for e in held]  # the val problems, by line
    repeats += [r for r in test if r not in repeats][: 10 - len(repeats)]
    train = [{"problem": f"p{i}", "answer": "2"} for i in range(20)] + repeats
    random.Random(seed).shuffle(train)
    _write(tmp_path / "train.jsonl", train)
    task = Math500(data_dir=str(tmp_path), train_file="train.jsonl", val_size=5, check_size=15, seed=seed)
    check = set(_prompts(task, "check"))
    assert len(check) == 15 and not check & set(_prompts(task, "test")) and not check & val
    assert not check & set(_prompts(task, "train")) and len(task.examples("train")) == 15
    with pytest.raises(ValueError, match=r"Math500: check_size=20 is not valid for .*train.jsonl; accepted: at most "
                                         r"19 \(its 30 problems, less 10 also in the test file, less one"):
        Math500(data_dir=str(tmp_path), train_file="train.jsonl", val_size=5, check_size=20).examples("check")
