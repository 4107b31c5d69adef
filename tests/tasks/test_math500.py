"""MATH-500 reward (math-verify) on the real file: gold solutions right, corrupted ones wrong,
also from a worker thread; and the lazy / guarded math-verify import."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reclight.tasks import Example, Math500

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
MATH_DIR = DATA / "math500"
needs_data = pytest.mark.skipif(
    not (MATH_DIR / "test.jsonl").is_file(),
    reason=f"MATH-500 reference data not found at {MATH_DIR.resolve()}",
)


def replace_last_boxed(solution: str, new: str) -> str:
    """Replace the content of the last ``\\boxed{...}`` (brace-matched) with ``new``."""
    start = solution.rindex("\\boxed{") + len("\\boxed{")
    end, depth = start, 1
    while depth:
        depth += {"{": 1, "}": -1}.get(solution[end], 0)
        end += 1
    return solution[:start] + new + "}" + solution[end:]


@pytest.fixture(scope="module")
def real():
    # A generous parse limit: math-verify's timeout is wall-clock, and on a starved CPU the
    # default 5 s made gold answers look unparsable. These tests check answers, not speed.
    task = Math500(data_dir=str(MATH_DIR), timeout_seconds=120)
    rows = [json.loads(line) for line in (MATH_DIR / "test.jsonl").open()]
    return task, rows, task.examples("test")


@needs_data
def test_splits(real):
    """test = all 500; val = a seeded 100-subset of test (overlap by design); no train."""
    task, rows, test = real
    val = task.examples("val")
    assert len(test) == 500 and len(val) == 100 and set(val) <= set(test)
    assert val == Math500(data_dir=str(MATH_DIR)).examples("val")
    assert test[0].uid == "math500/test.jsonl:1" and test[0].answer == rows[0]["answer"]
    algebra = Math500(data_dir=str(MATH_DIR), subject="Algebra", max_level=2).examples("test")
    assert len(algebra) == sum(r["subject"] == "Algebra" and r["level"] <= 2 for r in rows)


@needs_data
def test_gold_solutions_correct_and_corruptions_wrong(real):
    """All 500 gold ``solution`` texts verify against their ``answer`` (measured 500/500: no
    gold answer is lost to math-verify's parser). Two corruptions of the last boxed answer,
    each 0/500: ``\\boxed{<answer>+1}`` (a different value for numbers, expressions, tuples,
    intervals and equations alike) and ``\\boxed{\\text{(no answer)}}``.
    (About 2 s per pass over the 500 on an idle core.)"""
    task, rows, test = real
    assert sum(task.reward(r["solution"], e) for r, e in zip(rows, test)) == 500
    plus_one = [replace_last_boxed(r["solution"], r["answer"] + "+1") for r in rows]
    assert sum(task.reward(s, e) for s, e in zip(plus_one, test)) == 0
    no_answer = [replace_last_boxed(r["solution"], "\\text{(no answer)}") for r in rows]
    assert sum(task.reward(s, e) for s, e in zip(no_answer, test)) == 0


@needs_data
def test_reward_works_outside_the_main_thread(real):
    """math-verify's signal-based timeout raises ValueError in a worker thread; the reward
    drops the timeout there. Checked on a fixed 50-problem slice (every 10th)."""
    import math_verify

    task, rows, test = real
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="threaded environment"):
            pool.submit(math_verify.parse, "$1$", parsing_timeout=5).result()
        scores = pool.submit(
            lambda: [task.reward(r["solution"], e) for r, e in list(zip(rows, test))[::10]]
        ).result()
    assert scores == [1.0] * 50


def test_empty_response_is_zero_without_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    ex = Example(prompt="p", answer="\\frac{1}{2}", uid="u")
    assert Math500().reward("", ex) == 0.0 and Math500().reward(" \n", ex) == 0.0


def test_missing_math_verify_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    with pytest.raises(ImportError, match=r"install the `math` extra"):
        Math500().reward("\\boxed{1}", Example(prompt="p", answer="1", uid="u"))


def test_equivalent_forms():
    task = Math500()
    ex = Example(prompt="p", answer="\\frac{1}{2}", uid="u")
    responses = ["\\boxed{0.5}", "so $\\boxed{\\dfrac12}$", "\\boxed{2/4}", "\\boxed{1/3}"]
    assert [task.reward(r, ex) for r in responses] == [1.0, 1.0, 1.0, 0.0]


def test_importing_tasks_does_not_import_math_verify():
    code = "import sys, reclight.tasks; print('math_verify' in sys.modules, 'sympy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
