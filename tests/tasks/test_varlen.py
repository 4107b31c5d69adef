"""The embedded variable-length addition task: splits, reward, the length/level relation of the
gold answers, its fit to the tiny tokenizer and to configs/varlen.yaml, and bad arguments."""

from collections import Counter
from pathlib import Path

import pytest
import yaml

from reclight.models.tiny import TinyModelConfig, build_tokenizer
from reclight.tasks.varlen import VarLenAddition, split_sizes

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "check", "val", "test")


def _prompts(task, split):
    return [e.prompt for e in task.examples(split)]


def test_splits_are_deterministic_disjoint_and_level_balanced():
    task = VarLenAddition()
    assert all(_prompts(VarLenAddition(), s) == _prompts(task, s) for s in SPLITS)
    assert _prompts(VarLenAddition(split_seed=99), "val") != _prompts(task, "val")
    distinct = {s: set(_prompts(task, s)) for s in SPLITS}
    assert all(not distinct[a] & distinct[b] for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:])
    levels = {s: Counter(task.level(e) for e in task.examples(s)) for s in SPLITS}
    # held-out sizes by water-filling (module doc): level 1 gives 100 // 5 = 20, the rest share the remainder
    assert levels["val"] == {1: 20, 2: 240, 3: 240} and levels["test"] == {1: 20, 2: 490, 3: 490}
    assert levels["check"] == levels["val"]  # check_size=None: as large as val, spread the same way
    assert levels["train"] == {1: 10_000, 2: 10_000, 3: 10_000}
    # level 1 keeps 100 - 20 - 20 - 20 = 40 distinct training pairs, cycled to 10,000 entries
    assert len({p for p in distinct["train"] if len(p) == 4}) == 40
    # check is shuffled across levels: the warm-up's slice of it (its first 200) holds every level
    assert set(Counter(task.level(e) for e in task.examples("check")[:200])) == {1, 2, 3}
    # a level's split does not depend on the other levels present (only the order across levels does)
    alone = VarLenAddition(min_digits=2, max_digits=2, val_size=240, test_size=490)
    assert set(_prompts(alone, "val")) == {p for p in distinct["val"] if p.index("+") == 2}


def test_gold_answers_and_reward_on_hand_made_responses():
    task = VarLenAddition()
    every = {e.prompt: e for s in SPLITS for e in task.examples(s)}
    ex = every["38+64="]  # 38 + 64 = 102, written least-significant digit first
    assert ex.answer == "201" and ex.uid == "varlen/38+64"
    assert task.reward("201", ex) == 1.0 and task.reward(" 201\n", ex) == 1.0
    for wrong in ("102", "2010", "20", "0201", "", "201 201"):
        assert task.reward(wrong, ex) == 0.0, wrong
    assert every["7+5="].answer == "21" and every["10+20="].answer == "03"
    assert every["0+0="].answer == "0" and task.level(every["0+0="]) == 1
    usual = VarLenAddition(reverse_answer=False)
    ex_usual = next(e for s in SPLITS for e in usual.examples(s) if e.prompt == "38+64=")
    assert ex_usual.answer == "102" and usual.reward("102", ex_usual) == 1.0 and usual.reward("201", ex_usual) == 0.0


def test_answer_length_rises_with_the_level():
    """Every pair of levels 1 and 2 (the splits partition them when train_per_level covers the rest).

    Level 1, a, b in 0..9 (100 pairs): a + b <= 9 for sum_{a=0..9} (10 - a) = 55 pairs (1 digit), 45 have 2.
    Level 2, a, b in 10..99 (8,100 pairs): a + b >= 100 for sum_a (99 - max(10, 100 - a) + 1), which is a for
    a = 10..90 (sum 4,050) and 90 for a = 91..99 (810): 4,860 pairs with 3 digits, 3,240 with 2.
    Mean lengths 1.45 and (3,240 * 2 + 4,860 * 3) / 8,100 = 2.6 digits; responses add one EOS token.
    """
    task = VarLenAddition(max_digits=2, val_size=50, test_size=50, train_per_level=10_000)
    every = {e.prompt: e for s in SPLITS for e in task.examples(s)}
    assert len(every) == 100 + 8_100  # all pairs of both levels, each in exactly one split
    lengths = {d: Counter(len(e.answer) for e in every.values() if task.level(e) == d) for d in (1, 2)}
    assert lengths == {1: {1: 55, 2: 45}, 2: {2: 3_240, 3: 4_860}}
    mean = {d: sum(n * c for n, c in lengths[d].items()) / sum(lengths[d].values()) for d in (1, 2)}
    assert mean == {1: 1.45, 2: 2.6}
    assert max(lengths[1]) <= min(lengths[2])  # no level-1 answer is longer than a level-2 one


def test_held_out_sizes_by_water_filling():
    """In order of pool size each level takes min(pool // 5, ceil(left / levels left))."""
    assert split_sizes(500, [100, 8_100, 810_000]) == [20, 240, 240]
    assert split_sizes(1_000, [100, 8_100, 810_000]) == [20, 490, 490]
    assert split_sizes(10, [100, 8_100, 810_000]) == [4, 3, 3]  # ceil(10 / 3) = 4, then 6 / 2, then 3
    assert split_sizes(7, [8_100, 100]) == [3, 4]  # the smaller pool goes first wherever it is listed
    assert split_sizes(30, [100]) == [20]  # short: the caller refuses it


def test_fits_the_tiny_tokenizer_and_the_config():
    """Every character is in the tiny vocabulary (no <unk>), and prompt + the longest response fit
    the config's max_new_tokens and the model's positions."""
    cfg = yaml.safe_load((ROOT / "configs/varlen.yaml").read_text())
    task = VarLenAddition(**cfg["data"]["task"]["init_args"])
    tok = build_tokenizer()
    unk = tok.unk_token_id
    max_new = cfg["model"]["sampling"]["max_new_tokens"]
    positions = TinyModelConfig(**cfg["model"]["policy"]["tiny"]).max_positions
    longest = max((e for s in SPLITS for e in task.examples(s)), key=lambda e: len(e.prompt) + len(e.answer))
    assert (len(longest.prompt), len(longest.answer)) == (8, 4)  # "ddd+ddd=" and a 4-digit sum
    for e in (longest, task.examples("val")[0], task.examples("test")[0]):
        ids = tok(e.prompt + e.answer, add_special_tokens=False)["input_ids"]
        assert unk not in ids and tok.decode(ids) == e.prompt + e.answer
    assert len(longest.answer) + 1 <= max_new and len(longest.prompt) + max_new <= positions
    assert task.stop_strings == ()  # the fast engine takes no stop strings


@pytest.mark.parametrize("kwargs, message", [
    ({"max_digits": 0}, "data.task.init_args.max_digits=0 is not valid; accepted: an integer in [1, 6]"),
    ({"max_digits": 7}, "data.task.init_args.max_digits=7 is not valid; accepted: an integer in [1, 6]"),
    ({"min_digits": 4}, "data.task.init_args.min_digits=4 is not valid; accepted: an integer in [1, max_digits=3]"),
    ({"val_size": 0}, "data.task.init_args.val_size=0 is not valid; accepted: an integer >= 1"),
    ({"max_digits": 1, "val_size": 5, "test_size": 21},
     "data.task.init_args.test_size=21 is not valid; accepted: an integer in [1, 20] for level 1 (a held-out"),
    ({"max_digits": 2, "val_size": 1641},  # 100 // 5 + 8,100 // 5 = 1,640
     "data.task.init_args.val_size=1641 is not valid; accepted: an integer in [1, 1640] for levels 1 to 2"),
    ({"train_per_level": 0}, "data.task.init_args.train_per_level=0 is not valid; accepted: an integer >= 1"),
    ({"split_seed": 1.5}, "data.task.init_args.split_seed=1.5 is not valid; accepted: an integer"),
    ({"reverse_answer": "yes"}, "data.task.init_args.reverse_answer='yes' is not valid; accepted: true or false"),
])
def test_rejects_bad_args(kwargs, message):
    with pytest.raises(ValueError) as e:
        VarLenAddition(**kwargs)
    assert message in str(e.value)


def test_rejects_unknown_split():
    with pytest.raises(ValueError, match=r"split='dev' is not available"):
        VarLenAddition(max_digits=1, val_size=5, test_size=5).examples("dev")
