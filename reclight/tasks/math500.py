"""MATH-500: competition problems with LaTeX answers, scored by math-verify.

Choices worth knowing:

- Splits. MATH-500 is a test set only. ``test`` is the whole file; ``val`` is a seeded random
  subset OF ``test`` (``val_size`` problems) for cheap periodic evaluation during training, so
  ``val`` and ``test`` overlap on purpose. ``train`` and ``check`` exist only if ``train_file``
  names a JSONL file with the same fields (e.g. the MATH train split); otherwise asking for them
  raises. ``check`` (where the supervised warm-up decides to stop) is a seeded slice of the train
  file, removed from ``train``, and never a problem of the test file: ``test`` cannot give a
  check set here, since ``val`` is part of it, and the warm-up must not stop on a problem that
  ``val/acc`` scores (a train-file row repeating a test problem is never drawn into ``check``).
  A row whose problem repeats an earlier row's is dropped (one printed line counts them) and an
  empty problem or answer is refused (:mod:`reclight.tasks.jsonl`).
- Reward. The gold ``answer`` is parsed as ``\\boxed{answer}``; the response is parsed by
  math-verify's default LaTeX + plain-expression extraction, which prefers the last
  ``\\boxed{}``. ``verify(gold, response)`` decides; the reward is 1.0 or 0.0.
  Measured on the shipped file: math-verify accepts all 500 gold ``solution`` texts against
  their ``answer`` field (500/500), in about 2 s on one CPU core.
- Threads. math-verify bounds parsing and comparison time with ``signal.alarm``, which only
  works in the main thread (elsewhere it raises ``ValueError``). The reward uses the timeout
  in the main thread and runs without one in any other thread (e.g. a rollout worker); there,
  an adversarial response could make sympy slow, which the caller has to bound.
- math-verify is imported the first time a reward is computed, so importing this module (or
  building the task from a config) does not need the ``math`` extra.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

from reclight.tasks.base import SPLITS, Example, Task, check_size_of, check_task_args
from reclight.tasks.jsonl import (
    DataError, Row, check_split_indices, drop_duplicates, held_out_indices, require_nonempty, task_rows,
)

DEFAULT_PROMPT = (
    "{problem}\n\nSolve the problem step by step. Put your final answer in \\boxed{{}}."
)

_FIELDS = {"problem": str, "answer": str}


def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError as e:
        raise ImportError(
            "the MATH-500 reward needs math-verify: install the `math` extra "
            "(`pip install 'reclight[math]'`) or `pip install math-verify`"
        ) from e
    return math_verify


@lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout: int | None) -> list:
    mv = _math_verify()
    return mv.parse("\\boxed{" + answer + "}", parsing_timeout=timeout)


def math_equal(response: str, gold_answer: str, timeout_seconds: int | None = 5) -> bool:
    """Whether math-verify finds ``response``'s final answer equal to the LaTeX ``gold_answer``.

    ``timeout_seconds`` bounds each parse and comparison, but only in the main thread; in any
    other thread it is ignored (see the module docstring). An empty response is False without
    calling math-verify.
    """
    if not response.strip():
        return False
    mv = _math_verify()
    in_main = threading.current_thread() is threading.main_thread()
    timeout = timeout_seconds if in_main else None
    gold = _parse_gold(gold_answer, timeout)
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {gold_answer!r}")
    predicted = mv.parse(response, parsing_timeout=timeout)
    return bool(predicted) and mv.verify(gold, predicted, timeout_seconds=timeout)


class Math500(Task):
    """MATH-500 problems scored by math-verify against their LaTeX ``answer``.

    Rows come from a JSONL file (fields ``problem`` and ``answer`` required; ``subject`` and
    ``level`` used by the filters; other fields ignored) or from a Hugging Face data set.

    Args:
        data_dir: folder holding ``test_file`` (and ``train_file`` if given). None loads
            ``hf_dataset`` instead (needs the optional ``datasets`` package and network).
        hf_dataset: Hugging Face data set id, used only when ``data_dir`` is None.
        test_file: JSONL file (inside ``data_dir``) for ``test`` and ``val``.
        train_file: optional JSONL file (inside ``data_dir``, same fields) for ``train`` and
            ``check``; None means the task has neither.
        val_size: number of ``test`` problems drawn (seeded) as the ``val`` subset.
        subject: keep only problems of this ``subject`` (case-insensitive, e.g. "Algebra");
            None keeps all. Rows without a ``subject`` field are dropped when it is set.
        max_level: keep only problems with ``level`` <= this (1..5); None keeps all.
        max_examples: keep only the first this-many examples of each split; None keeps all.
        prompt_template: ``str.format`` template with a ``{problem}`` field; it should ask for
            the answer in ``\\boxed{}`` (literal braces are written ``{{}}``).
        timeout_seconds: math-verify's per-parse / per-comparison limit in the main thread;
            None or 0 disables it. Ignored outside the main thread.
        seed: seed of the ``val`` subset and of the ``check`` slice.
        check_size: number of train-file problems held out as ``check`` (never in ``train``,
            never a test-file problem); None: ``val_size``.
    """

    name = "math500"

    def __init__(
        self,
        data_dir: str | None = None,
        hf_dataset: str = "HuggingFaceH4/MATH-500",
        test_file: str = "test.jsonl",
        train_file: str | None = None,
        val_size: int = 100,
        subject: str | None = None,
        max_level: int | None = None,
        max_examples: int | None = None,
        prompt_template: str = DEFAULT_PROMPT,
        timeout_seconds: int | None = 5,
        seed: int = 0,
        check_size: int | None = None,
    ) -> None:
        check_task_args("Math500", val_size=val_size, min_val_size=1, max_examples=max_examples,
                        prompt_template=prompt_template, placeholder="problem")
        self._check_n = check_size_of("Math500.check_size", check_size, val_size)
        self.data_dir = data_dir
        self.hf_dataset = hf_dataset
        self.test_file = test_file
        self.train_file = train_file
        self.val_size = val_size
        self.check_size = check_size
        self.subject = subject
        self.max_level = max_level
        self.max_examples = max_examples
        self.prompt_template = prompt_template
        self.timeout_seconds = timeout_seconds
        self.seed = seed

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this configuration can serve."""
        return SPLITS if self.train_file is not None else ("val", "test")

    def load(self, split: str) -> list[Example]:
        if split not in self.splits:
            raise ValueError(
                f"Math500: split={split!r} is not available: MATH-500 is a test set; "
                f"accepted: {', '.join(self.splits)}. Set train_file to a JSONL file with "
                f"fields {sorted(_FIELDS)} (e.g. the MATH train split) to train on this task"
            )
        source_split = "train" if split in ("train", "check") else "test"
        rows, source, uid_prefix = self._rows(source_split)
        rows = self._filter(drop_duplicates(rows, "problem", source), source)
        if source_split == "train":
            rows = self._hold_out_check(rows, source, split)
        examples = [
            Example(
                prompt=self.prompt_template.format(problem=row.record["problem"]),
                answer=row.record["answer"],
                uid=f"{uid_prefix}:{row.line}",
            )
            for row in rows
        ]
        if split == "val":
            keep = held_out_indices(len(examples), min(self.val_size, len(examples)), self.seed)
            examples = [examples[i] for i in keep]
        return examples[: self.max_examples]

    def _hold_out_check(self, rows: list[Row], source: str, split: str) -> list[Row]:
        """The ``check`` rows of the train file (``split == "check"``), or the others: a seeded
        slice of ``check_size`` rows, none of whose problems is in the test file."""
        test_rows, _, _ = self._rows("test")
        in_test = {str(r.record["problem"]).strip() for r in test_rows}
        shared = [i for i, r in enumerate(rows) if str(r.record["problem"]).strip() in in_test]
        if self._check_n > len(rows) - len(shared) - 1:
            raise DataError(
                f"Math500: check_size={self._check_n} is not valid for {source}; accepted: at most "
                f"{len(rows) - len(shared) - 1} (its {len(rows)} problems, less {len(shared)} also in the test file, "
                "less one to leave a train split; check_size=None means val_size)"
            )
        check = check_split_indices(len(rows), shared, self._check_n, self.seed)
        if split == "check":
            return [rows[i] for i in check]
        out = set(check)
        return [r for i, r in enumerate(rows) if i not in out]

    def _rows(self, source_split: str) -> tuple[list[Row], str, str]:
        if self.data_dir is None and source_split == "train":
            raise ValueError("Math500: train_file needs data_dir (no Hugging Face train split)")
        return task_rows("math500", self.data_dir, source_split, getattr(self, f"{source_split}_file"), _FIELDS,
                         hf_dataset=self.hf_dataset)

    def _filter(self, rows: list[Row], source: str) -> list[Row]:
        if self.subject is not None:
            want = self.subject.lower()
            rows = [r for r in rows if str(r.record.get("subject", "")).lower() == want]
        if self.max_level is not None:
            for r in rows:
                level = r.record.get("level")
                if not isinstance(level, int) or isinstance(level, bool):
                    raise DataError(
                        f"{source}:{r.line}: max_level={self.max_level} needs an integer field "
                        f"'level', got {level!r}"
                    )
            rows = [r for r in rows if r.record["level"] <= self.max_level]
        require_nonempty(
            rows, source, f"filtering subject={self.subject!r}, max_level={self.max_level!r}"
        )
        return rows

    def reward(self, response: str, example: Example) -> float:
        """1.0 if math-verify finds the response's final answer equal to the gold, else 0.0.

        An empty (or blank) response scores 0.0 without calling math-verify. Raises
        ``ImportError`` naming the ``math`` extra if math-verify is missing, and ``ValueError``
        if the gold answer itself cannot be parsed (a broken example, not a wrong response).
        """
        return float(math_equal(response, example.answer, self.timeout_seconds))
