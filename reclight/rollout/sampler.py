"""Which prompts a training step uses: a deterministic function of (seed, step)."""

from __future__ import annotations

import random

from reclight.checks import check_int


class PromptSampler:
    """Which prompts step ``t`` uses: a deterministic function of ``(seed, t)``.

    Epoch e is a ``random.Random(f"{seed}/{e}")`` permutation of the train split, cut into
    ``n // batch_size`` batches (the remainder is dropped). Because ``indices(t)`` needs no
    state, the rollout queue can generate future steps early and a resumed run continues at
    exactly the same data position (position = step).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0) -> None:
        check_int("prompts_per_step", batch_size, minimum=1, maximum=num_examples,
                  accepted=f"1 <= prompts_per_step <= {num_examples} (the size of the train split)")
        self.num_examples = num_examples
        self.batch_size = int(batch_size)
        self.seed = seed
        self.steps_per_epoch = num_examples // self.batch_size
        self._perm: tuple[int, list[int]] | None = None

    def indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            perm = list(range(self.num_examples))
            random.Random(f"{self.seed}/{epoch}").shuffle(perm)
            self._perm = (epoch, perm)
        return self._perm[1][pos * self.batch_size : (pos + 1) * self.batch_size]
