"""GSM8K reward: hand-checked answer extraction, then the real test set's gold answers."""

from decimal import Decimal
from pathlib import Path

import pytest

from reclight.tasks import GSM8K, DataError, Example
from reclight.tasks.gsm8k import extract_answer

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
GSM8K_DIR = DATA / "gsm8k"
needs_data = pytest.mark.skipif(
    not (GSM8K_DIR / "test.jsonl").is_file(),
    reason=f"GSM8K reference data not found at {GSM8K_DIR.resolve()}",
)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so 9 * 2 = 18\n#### 18", "18"),
        ("#### 18.0", "18"),  # compared numerically below; Decimal("18.0") == 18
        ("#### $1,000.", "1000"),
        ("#### 1{,}000 dollars", "1000"),
        ("#### -7 degrees", "-7"),
        ("16-3-4=9 eggs", "9"),  # "-3", "-4" follow a digit: subtraction, not negatives
        ("She has 5 apples and buys 3 more, so 8.", "8"),  # no marker: last number
        ("#### Step 1\nadd 2 and 3\n#### 5", "5"),  # last marker with a number wins
        ("#### 5\n#### Summary\nthat is all", "5"),  # a trailing heading has no number
        ("#### The answer is 12 (dozen 2)", "12"),  # first number on the marker's line
        ("1,2 and 3", "3"),  # "1,2" is not a thousands group
        ("1,234,567", "1234567"),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == Decimal(expected)


@pytest.mark.parametrize("response", ["", "   ", "no digits here", "####"])
def test_no_number_scores_zero(response):
    assert extract_answer(response) is None
    ex = Example(prompt="q", answer="18", uid="u")
    assert GSM8K().reward(response, ex) == 0.0 and not GSM8K().correct(response, ex)


def test_broken_gold_answer_raises():
    with pytest.raises(ValueError, match="non-numeric answer 'eighteen'"):
        GSM8K().reward("#### 18", Example(prompt="q", answer="eighteen", uid="u"))


@needs_data
def test_real_splits_sizes():
    """Published sizes: 7473 train rows, 1319 test rows; val_size=200 and check_size=None (= 200)
    leave 7073 for train; max_examples caps each split after the split, so val is unchanged by it."""
    task = GSM8K(data_dir=str(GSM8K_DIR))
    sizes = tuple(len(task.examples(s)) for s in ("train", "check", "val", "test"))
    assert sizes == (7073, 200, 200, 1319)
    capped = GSM8K(data_dir=str(GSM8K_DIR), max_examples=50)
    assert capped.examples("val") == task.examples("val")[:50]
    assert task.examples("test")[0].uid == "gsm8k/test.jsonl:1"
    assert task.examples("test")[0].answer == "18"


@needs_data
def test_real_test_set_gold_answers_score_exactly():
    """Score the full gold solutions of all 1319 test problems as if a model wrote them.

    - as published: 1319/1319 correct;
    - final number + 1: 0/1319;
    - final number reformatted ("#### $1,234.0 dollars."): 1319/1319;
    - "#### N" line removed: the last-number fallback then reads the reasoning's last number,
      which is the answer for 1283 of 1319 (measured; the other 36 end on an intermediate
      number). This pins down the fallback's behaviour rather than a format requirement.
    """
    import json

    task = GSM8K(data_dir=str(GSM8K_DIR))
    examples = task.examples("test")
    golds = [json.loads(line)["answer"] for line in (GSM8K_DIR / "test.jsonl").open()]
    assert len(golds) == len(examples) == 1319
    reasoning = [g.rsplit("####", 1)[0] for g in golds]

    def score(responses):
        return sum(task.reward(r, e) for r, e in zip(responses, examples))

    assert score(golds) == 1319
    assert score([r + f"#### {int(e.answer) + 1}" for r, e in zip(reasoning, examples)]) == 0
    reformatted = [r + f"#### ${int(e.answer):,}.0 dollars." for r, e in zip(reasoning, examples)]
    assert score(reformatted) == 1319
    assert score(reasoning) == 1283


@pytest.mark.parametrize("gold, problem", [
    ("3/4", "a fraction, which would be read as its numerator"),
    ("1e3", "scientific notation, which would be read as its mantissa"),
    ("2 or 3", "2 numbers on one line (the gold value is ambiguous)"),
])
def test_ambiguous_gold_answer_is_refused_naming_file_and_line(tmp_path, gold, problem):
    """Issue #17, item 5: before, `#### 3/4` was read as 3."""
    import json

    rows = [json.dumps({"question": "q", "answer": "#### 4"}), json.dumps({"question": "q", "answer": f"x\n#### {gold}"})]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        GSM8K(data_dir=str(tmp_path), val_size=0).examples("train")
    assert str(e.value) == (f"{tmp_path / 'train.jsonl'}:2: field 'answer' ends with '#### {gold}', {problem}; "
                            "accepted: '#### <number>' with one integer or decimal (e.g. '#### 0.75'), as every GSM8K "
                            "gold answer is")
    for fine in ("1,000", "$18.50", "-3 dollars"):
        (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": f"#### {fine}"}) + "\n")
        GSM8K(data_dir=str(tmp_path), val_size=0).examples("train")
