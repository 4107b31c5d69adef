"""GSM8K: grade-school word problems scored by their final number.

Departures from the usual GSM8K harnesses, all on purpose:

- The final answer is the first number on the line of the LAST ``####`` marker that has a
  number on its line; if no marker has one, the last number anywhere in the response. Chat
  models like markdown headings (``#### Step 1``), which is why a marker alone is not trusted
  and why the last one wins. Without any marker we still grade the last number, so a response
  that ignores the format is not zeroed for that alone.
- Numbers compare exactly as decimals: ``18.0 == 18``, ``1,000 == 1000``; ``$``, ``%``, units
  and a trailing period around the number are ignored. Fractions (``3/4``) and scientific
  notation are not read as one number (GSM8K gold answers are all integers); a gold answer
  written that way (or with two numbers after its ``####``) is refused at load time, naming
  the file and line, rather than read as its first number.
- ``val`` is a seeded random slice of the train file, disjoint from ``train``; ``check`` (where
  the supervised warm-up decides to stop) is a second seeded slice of what is left, so it is
  disjoint from both (the warm-up never stops on a question that ``val/acc`` scores, and the
  published test file stays untouched); ``test`` is the published test file. A row whose
  question repeats an earlier row's is dropped (counted in one printed line) before the slices
  are drawn, so no held-out question is also trained on; an empty question is refused
  (:mod:`reclight.tasks.jsonl`).
"""

from __future__ import annotations

import re
from decimal import Decimal

from reclight.tasks.base import Example, Task, check_size_of, check_task_args
from reclight.tasks.jsonl import (
    DataError, Row, check_split_indices, drop_duplicates, held_out_indices, require_nonempty, task_rows,
)

DEFAULT_PROMPT = (
    "{question}\n\nSolve the problem step by step. Then write the final answer, a single number, "
    "on the last line after '####', for example '#### 42'."
)

# A minus sign counts only when it does not follow a word character ("5-3" is 5 and 3, not -3).
# Thousands groups must be exactly three digits ("1,000" is one number; "1,2" is two).
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_MARKER = "####"
_FIELDS = {"question": str, "answer": str}


def parse_number(text: str) -> Decimal | None:
    """The first number in ``text`` as an exact ``Decimal`` (commas dropped), or None."""
    match = _NUMBER.search(_normalise(text))
    return None if match is None else Decimal(match.group().replace(",", ""))


def extract_answer(response: str) -> Decimal | None:
    """The final numeric answer of a response (rules in the module docstring), or None."""
    text = _normalise(response)
    for chunk in reversed(text.split(_MARKER)[1:]):
        value = parse_number(chunk.split("\n", 1)[0])
        if value is not None:
            return value
    numbers = _NUMBER.findall(text)
    return Decimal(numbers[-1].replace(",", "")) if numbers else None


def _ambiguous_gold(final: str) -> str | None:
    """Why the text after a gold answer's last ``####`` is not one plain number (None: it is).
    A fraction (``3/4``) or scientific notation (``1e3``) would be read as its first number (3,
    1), and a second number (``2 or 3``) leaves the gold value ambiguous."""
    line = _normalise(final).strip().split("\n", 1)[0]
    if re.search(r"\d\s*/\s*\d", line):
        return "a fraction, which would be read as its numerator"
    if re.search(r"\d[eE][-+]?\d", line):
        return "scientific notation, which would be read as its mantissa"
    if len(_NUMBER.findall(line)) > 1:
        return f"{len(_NUMBER.findall(line))} numbers on one line (the gold value is ambiguous)"
    return None


def _normalise(text: str) -> str:
    # LaTeX spellings of the same number: "1{,}000", "\$18", unicode minus.
    return text.replace("{,}", ",").replace("\u2212", "-").replace("\\!", "")


class GSM8K(Task):
    """GSM8K word problems scored by their final number.

    Rows come from JSONL files (fields ``question`` and ``answer``, the latter ending in
    ``#### <number>``) or from a Hugging Face data set.

    Args:
        data_dir: folder holding ``train_file`` and ``test_file``. None loads ``hf_dataset``
            instead, which needs the optional ``datasets`` package and network access.
        hf_dataset: Hugging Face data set id, used only when ``data_dir`` is None.
        hf_config: its configuration name.
        train_file: JSONL file (inside ``data_dir``) for the ``train``, ``val`` and ``check`` splits.
        test_file: JSONL file (inside ``data_dir``) for the ``test`` split.
        val_size: number of train-file rows held out as ``val`` (never in ``train``).
        check_size: number of further train-file rows held out as ``check`` (never in ``train``
            or ``val``), where the supervised warm-up decides to stop; None: ``val_size``.
        max_examples: keep only the first this-many examples of each split (after the
            train/val split, so ``val`` does not change with it); None keeps all.
        prompt_template: ``str.format`` template with a ``{question}`` field. It should ask for
            the answer after ``####``; the trainer applies the chat template around it.
        seed: seed of the train/val split.
    """

    name = "gsm8k"

    def __init__(
        self,
        data_dir: str | None = None,
        hf_dataset: str = "openai/gsm8k",
        hf_config: str = "main",
        train_file: str = "train.jsonl",
        test_file: str = "test.jsonl",
        val_size: int = 200,
        max_examples: int | None = None,
        prompt_template: str = DEFAULT_PROMPT,
        seed: int = 0,
        check_size: int | None = None,
    ) -> None:
        check_task_args("GSM8K", val_size=val_size, min_val_size=0, max_examples=max_examples,
                        prompt_template=prompt_template, placeholder="question")
        self._check_n = check_size_of("GSM8K.check_size", check_size, val_size)
        self.data_dir = data_dir
        self.hf_dataset = hf_dataset
        self.hf_config = hf_config
        self.train_file = train_file
        self.test_file = test_file
        self.val_size = val_size
        self.check_size = check_size
        self.max_examples = max_examples
        self.prompt_template = prompt_template
        self.seed = seed

    def load(self, split: str) -> list[Example]:
        source_split = "test" if split == "test" else "train"
        rows, source, uid_prefix = self._rows(source_split)
        checked = {row.line: self._example(row, source, uid_prefix) for row in rows}  # every row, repeated or not
        examples = [checked[row.line] for row in drop_duplicates(rows, "question", source)]
        if split != "test":
            if self.val_size + self._check_n >= len(examples):
                dropped = len(rows) - len(examples)
                repeated = f" ({dropped} rows repeating a question dropped)" if dropped else ""
                raise DataError(
                    f"GSM8K: val_size={self.val_size} + check_size={self._check_n} hold out all {len(examples)} "
                    f"examples of {source}{repeated}; they must be fewer than the file's to leave a train split "
                    "(check_size=None means val_size)"
                )
            val = held_out_indices(len(examples), self.val_size, self.seed)
            held = {"val": val, "check": check_split_indices(len(examples), val, self._check_n, self.seed)}
            if split == "train":
                out = set(held["val"]) | set(held["check"])
                examples = [e for i, e in enumerate(examples) if i not in out]
            else:
                examples = [examples[i] for i in held[split]]
            size = self.val_size if split == "val" else self._check_n
            require_nonempty(examples, source, f"taking the {split} split ({split}_size={size})")
        return examples[: self.max_examples]

    def _rows(self, source_split: str) -> tuple[list[Row], str, str]:
        return task_rows("gsm8k", self.data_dir, source_split, getattr(self, f"{source_split}_file"), _FIELDS,
                         hf_dataset=self.hf_dataset, hf_config=self.hf_config)

    def _example(self, row: Row, source: str, uid_prefix: str) -> Example:
        gold = row.record["answer"]
        final = gold.rsplit(_MARKER, 1)[1] if _MARKER in gold else ""
        value = parse_number(final)
        if value is None:
            raise DataError(
                f"{source}:{row.line}: field 'answer' must end with '#### <number>', "
                f"got ...{gold[-60:]!r}"
            )
        if problem := _ambiguous_gold(final):
            raise DataError(
                f"{source}:{row.line}: field 'answer' ends with {_MARKER + final.rstrip()!r}, {problem}; accepted: "
                f"'#### <number>' with one integer or decimal (e.g. '#### 0.75'), as every GSM8K gold answer is"
            )
        return Example(
            prompt=self.prompt_template.format(question=row.record["question"]),
            answer=str(value),
            uid=f"{uid_prefix}:{row.line}",
        )

    def reward(self, response: str, example: Example) -> float:
        """1.0 if the response's final number equals the gold number, else 0.0.

        An empty response, or one with no number, scores 0.0. Raises ``ValueError`` only if
        ``example.answer`` itself is not a number (a broken example, not a wrong response).
        """
        gold = parse_number(example.answer)
        if gold is None:
            raise ValueError(
                f"GSM8K: example {example.uid} has a non-numeric answer {example.answer!r}"
            )
        predicted = extract_answer(response)
        return float(predicted is not None and predicted == gold)
