"""The prompt source: everything the module and the rollout queues need of the data, in one object.

:meth:`reclight.trainer.data.RLDataModule.prompt_source` builds it once the model's tokenizer
and context are known; the module then reads nothing else of the data module. It holds the
task's splits fitted to the model's context (:mod:`reclight.trainer.context`), the prompt order
and this rank's share of it.

The training prompts are a stream indexed by admission order: position i of this rank's stream
is :meth:`PromptSource.at`. Today's per-step view sits on top of it: step t takes positions
t * n .. (t + 1) * n - 1 of the stream (n = the prompts a rank samples per step), which are
exactly :meth:`PromptSource.for_step`. The asynchronous schedule (:mod:`reclight.clock`) admits
one group at a time from the same stream, so a synchronous run and an asynchronous one start
from the same prompts in the same order.

Data parallel: the step's prompts are split into equal contiguous blocks, one per rank, and each
rank samples all K responses of its prompts, so a group never spans ranks and the union over
ranks is the single-process batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from reclight.rollout.sampler import PromptSampler
from reclight.tasks.base import Example, Task
from reclight.trainer.context import ContextTask


@dataclass
class PromptSource:
    """One run's prompts on one rank (built by ``RLDataModule.prompt_source``).

    Attributes:
        task: the task: its rewards, ``correct`` and stop strings (scoring uses it as it is).
        examples_of: ``split -> examples``, the task's splits fitted to the model's context.
        sampler: the global prompt order (``(seed, step) -> indices`` of the fitted train split).
        world, rank: data-parallel ranks and this one.
        groups_per_rank: prompts (groups) per rank that a step trains on.
        sampled_per_rank: prompts per rank that a step samples (more with ``data.oversample``).
        eval_size: evaluate on the first this-many examples of val/test (None: all).
        long_prompts: ``drop`` or ``truncate_left`` (what happens to prompts too long for the context).
        counts: split -> prompts dropped or truncated to fit the context (filled as splits are used).
    """

    task: Task
    examples_of: Callable[[str], Sequence[Example]]
    sampler: PromptSampler
    world: int
    rank: int
    groups_per_rank: int
    sampled_per_rank: int
    eval_size: int | None
    long_prompts: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def train(self) -> Sequence[Example]:
        return self.examples_of("train")

    @property
    def fitted_task(self) -> Task:
        """The task with its splits fitted to the context, for code that reads a task's splits
        itself (the supervised warm-up)."""
        return ContextTask(self.task, self.examples_of)

    @property
    def oversampled(self) -> bool:
        """Whether a step samples more prompts than it trains on (DAPO's dynamic sampling)."""
        return self.sampled_per_rank > self.groups_per_rank

    def for_step(self, step: int) -> tuple[list[int], list[Example]]:
        """``(indices into the train split, examples)`` of training step ``step`` on this rank."""
        idx = self.sampler.indices(step)
        if self.world > 1:
            per_rank = len(idx) // self.world
            idx = idx[self.rank * per_rank : (self.rank + 1) * per_rank]
        train = self.train
        return idx, [train[i] for i in idx]

    def index_at(self, position: int) -> int:
        """The train-split index at position ``position`` of this rank's stream (admission order)."""
        return self.order(position)

    @property
    def order(self) -> "StreamOrder":
        """:meth:`index_at` as a picklable callable (a rollout worker's process gets it)."""
        return StreamOrder(self.sampler, self.world, self.rank, self.sampled_per_rank)

    def at(self, position: int) -> tuple[int, Example]:
        """``(index, example)`` at position ``position`` of this rank's stream."""
        i = self.index_at(position)
        return i, self.train[i]

    @property
    def epoch_size(self) -> int:
        """Positions of this rank's stream per pass over the train split (the sampler drops the
        remainder of the split that does not fill a step)."""
        return self.sampler.steps_per_epoch * self.sampled_per_rank

    def eval_examples(self, split: str) -> Sequence[Example]:
        ex = self.examples_of(split)
        return ex if self.eval_size is None else ex[: self.eval_size]

    def context_counts(self) -> tuple[str, float]:
        """``(metric name, prompts dropped or truncated over the splits used so far)``."""
        kind = "dropped" if self.long_prompts == "drop" else "truncated"
        return f"prompts/{kind}", float(sum(self.counts.values()))


@dataclass
class StreamOrder:
    """``position -> train-split index`` of one rank's prompt stream: step ``position //
    sampled_per_rank``'s indices (:meth:`PromptSource.for_step`), at offset ``position %
    sampled_per_rank``."""

    sampler: PromptSampler
    world: int
    rank: int
    sampled_per_rank: int

    def __call__(self, position: int) -> int:
        step, offset = divmod(position, self.sampled_per_rank)
        idx = self.sampler.indices(step)
        if self.world > 1:
            per_rank = len(idx) // self.world
            idx = idx[self.rank * per_rank : (self.rank + 1) * per_rank]
        return idx[offset]
