"""The data module: a task, the deterministic prompt sampler, and the evaluation loaders.

Training data does NOT flow through a DataLoader. Lightning's fit loop prefetches the next batch
before the current step runs, so a DataLoader that generated rollouts would sample step t + 1
with the weights of step t: on-policy would silently become one step stale. The train loader
therefore yields only step indices (which pace the loop); rollouts are generated at the start of
each step by :class:`reclight.callbacks.WeightSync` from ``prompts_for_step(step)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from reclight.rollout import PromptSampler
from reclight.tasks.arithmetic import Arithmetic
from reclight.tasks.base import Example, Task


def _collate_indices(items: list[int]) -> torch.Tensor:
    return torch.tensor(items, dtype=torch.long)


# Lightning warns that an IterableDataset's __len__ may be wrong under multi-process loading; this
# one is loaded in the main process (num_workers=0) and its length is exact: silence that message.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning)


class _StepIndices(IterableDataset):
    """The step indices ``0 .. n-1``, on EVERY rank. A step's prompts are split between ranks by
    :meth:`RLDataModule.prompts_for_step`; the loader only paces the steps. Being an
    ``IterableDataset``, it gets no ``DistributedSampler`` from Lightning under DDP/FSDP (which
    would give each rank ``n / world`` batches per epoch and break ``val_check_interval``)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class RLDataModule(LightningDataModule):
    """Prompts for RL fine-tuning.

    Args:
        task: the verifiable task (default: the embedded 2-digit addition).
        prompts_per_step: B, prompts per training step (each sampled K times).
        eval_batch_size: prompts per greedy-evaluation batch.
        eval_size: evaluate on the first this-many examples of val/test (None: all).
        seed: seeds the order of training prompts (None: the run's ``seed_everything``).
    """

    def __init__(
        self,
        task: Task | None = None,
        prompts_per_step: int = 32,
        eval_batch_size: int = 250,
        eval_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["task"])
        self.task = task if task is not None else Arithmetic()
        self.prompts_per_step = prompts_per_step
        self.eval_batch_size = eval_batch_size
        self.eval_size = eval_size
        self.seed = seed
        self.sampler: PromptSampler | None = None

    def setup(self, stage: str) -> None:
        if self.sampler is None:
            import os

            seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
            self.train_examples = self.task.examples("train")
            self.sampler = PromptSampler(len(self.train_examples), self.prompts_per_step, seed)
        world, _ = self._world()
        if self.prompts_per_step % world:
            raise ValueError(
                f"RLDataModule.prompts_per_step={self.prompts_per_step} is not valid with {world} "
                f"data-parallel ranks; accepted: a multiple of {world}, so every rank samples whole groups"
            )

    def _world(self) -> tuple[int, int]:
        """(number of data-parallel ranks, this rank)."""
        t = self.trainer
        return (int(t.world_size), int(t.global_rank)) if t is not None else (1, 0)

    def prompts_for_step(self, step: int) -> tuple[list[int], list[Example]]:
        """``(indices into the train split, examples)`` of training step ``step`` on THIS rank.

        Data parallel: the step's ``prompts_per_step`` prompts are split into equal contiguous
        blocks, one per rank, and each rank samples all K responses of its prompts, so a group
        never spans ranks and the union over ranks is the single-process batch.
        """
        idx = self.sampler.indices(step)
        world, rank = self._world()
        if world > 1:
            per_rank = len(idx) // world
            idx = idx[rank * per_rank : (rank + 1) * per_rank]
        return idx, [self.train_examples[i] for i in idx]

    def eval_examples(self, split: str) -> Sequence[Example]:
        ex = self.task.examples(split)
        return ex if self.eval_size is None else ex[: self.eval_size]

    def train_dataloader(self) -> DataLoader:
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        if max_steps is None or max_steps < 1:
            raise ValueError(
                f"trainer.max_steps={max_steps!r} is not valid; accepted: an integer >= 1 (RL runs are "
                "counted in optimizer steps; the sync schedule needs the total)"
            )
        # An own generator: creating a loader iterator then never draws from the global torch RNG,
        # so a resumed run (which creates its iterators at other moments) keeps the global RNG
        # stream of a straight run (tests/test_resume.py compares the RNG states bitwise).
        return DataLoader(_StepIndices(max_steps), batch_size=None, generator=torch.Generator())

    def _eval_loader(self, split: str) -> DataLoader:
        n = len(self.eval_examples(split))
        return DataLoader(list(range(n)), batch_size=self.eval_batch_size, collate_fn=_collate_indices,
                          generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
