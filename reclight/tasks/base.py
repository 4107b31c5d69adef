"""The task interface: where prompts come from and how a response is scored.

A task turns a data source into :class:`Example` records and scores a decoded response
against one. The trainer never looks inside a task: it asks for ``examples(split)``, renders
``example.prompt`` (through the tokenizer's chat template when it has one) and calls
``reward``. A reward function may raise or return a non-finite value; the trainer treats such
samples as failed (no gradient, counted in a metric) rather than crashing the run.

The splits (:data:`SPLITS`): ``train`` (RL prompts and the supervised warm-up's examples),
``check`` (where the supervised warm-up decides to stop: :mod:`reclight.trainer.warmup`), ``val``
(the periodic greedy evaluation, ``val/acc``) and ``test``. ``check`` is held out of the training
pool and disjoint from ``val`` in every task: the warm-up stops when its accuracy reaches a target,
which is a selection, and selecting on ``val`` would bias every ``val/acc`` after it (the RL-start
figure most). It is not ``test`` either, which stays untouched for a final figure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from reclight.checks import check_int

SPLITS = ("train", "check", "val", "test")


@dataclass(frozen=True)
class Example:
    """One prompt with its gold answer."""

    prompt: str
    """The question text shown to the model (before any chat template)."""
    answer: str
    """The gold final answer, in the form ``Task.reward`` compares against."""
    uid: str
    """A stable id (e.g. ``"gsm8k/test.jsonl:17"``), for logs and for resuming data position."""


class Task(ABC):
    """A verifiable task: a source of examples and a reward function."""

    name: str = "task"

    def examples(self, split: str) -> Sequence[Example]:
        """The examples of ``split`` (one of ``SPLITS``), loaded once by :meth:`load` and cached.
        Raises ``ValueError`` naming the split and the accepted ones if the task has no such
        split, and a clear error if the data is empty or malformed."""
        check_split(self.name, split, SPLITS)
        cache: dict[str, Sequence[Example]] = self.__dict__.setdefault("_examples_cache", {})
        if split not in cache:
            cache[split] = self.load(split)
        return cache[split]

    def load(self, split: str) -> Sequence[Example]:
        """Build the examples of ``split`` (called once per split by :meth:`examples`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement load(split) or examples(split)")

    @abstractmethod
    def reward(self, response: str, example: Example) -> float:
        """The scalar reward of a decoded ``response`` (without the prompt)."""

    def correct(self, response: str, example: Example) -> bool:
        """Whether ``response`` counts as correct for accuracy metrics (default: reward >= 1)."""
        return self.reward(response, example) >= 1.0

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings after which generation may stop (besides the tokenizer's EOS)."""
        return ()


def check_split(task_name: str, split: str, available: Sequence[str]) -> None:
    if split not in available:
        raise ValueError(
            f"{task_name}: split={split!r} is not available; accepted: {', '.join(available)}"
        )


def check_size_of(field: str, check_size: int | None, val_size: int) -> int:
    """The size of a task's ``check`` split: ``check_size``, or ``val_size`` when it is None (the
    check split then mirrors ``val``: as many problems, drawn the same way, from the training
    pool). ``field`` names the argument in the error (``Arithmetic.check_size``)."""
    check_int(field, check_size, minimum=1, allow_none=True)
    return val_size if check_size is None else check_size


def check_task_args(
    task_name: str,
    *,
    val_size: int,
    min_val_size: int,
    max_examples: int | None,
    prompt_template: str,
    placeholder: str,
) -> None:
    """The constructor checks every JSONL-backed task shares; errors name the field, the value
    and what is accepted."""
    check_int(f"{task_name}.val_size", val_size, minimum=min_val_size)
    check_int(f"{task_name}.max_examples", max_examples, minimum=1, allow_none=True)
    if "{" + placeholder + "}" not in prompt_template:
        raise ValueError(
            f"{task_name}.prompt_template={prompt_template!r} is not valid; accepted: a template "
            f"that contains '{{{placeholder}}}'"
        )
