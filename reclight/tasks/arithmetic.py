"""The embedded verifiable task: multi-digit addition, generated in code.

A prompt is ``"07+45="`` (operands zero-padded to ``digits`` characters, so every prompt of a
task has the same length); the gold response is the sum zero-padded to ``digits + 1``
characters (``"052"``; plain ``"52"`` with ``pad_answer=False``) followed by the tokenizer's end
token. Padding matters for a tiny model: with a fixed answer length every digit sits at a fixed
position, and the supervised warm-up of the default model reached 29% held-out accuracy in 200
steps with padded answers against 6% with plain ones (batch 128, lr 2e-3, same seed). The reward is 1.0 when the response, with special tokens removed
and surrounding whitespace stripped, equals the sum exactly, else 0.0: a response that does not
stop (runs past the answer) is wrong.

Splits are a seeded partition of all ``10**digits x 10**digits`` operand pairs (or of a seeded
sample of them when that is too many), so train, check, val and test are disjoint and identical
on every machine for one ``split_seed``. The shuffled pool gives ``test`` first, then ``val``,
then ``check`` (the supervised warm-up's stopping set), and ``train`` is the rest: ``check``
comes out of what was the training pool, so ``val`` and ``test`` are the same pairs as before
it existed, and the warm-up never stops on a problem that ``val/acc`` scores.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from reclight.checks import check_int
from reclight.tasks.base import Example, Task, check_size_of

_MAX_POOL = 200_000


class Arithmetic(Task):
    """Addition of two ``digits``-digit numbers.

    Args:
        digits: digits per operand (operands are zero-padded to this width).
        val_size: number of held-out pairs in ``val`` (periodic greedy evaluation).
        test_size: number of held-out pairs in ``test``.
        check_size: number of pairs in ``check``, where the supervised warm-up decides to stop
            (taken from the training pool, disjoint from ``val``); None: ``val_size``.
        split_seed: seeds the partition into splits; keep it fixed across training seeds so
            every run is evaluated on the same held-out problems.
        pad_answer: zero-pad the gold sum to ``digits + 1`` characters (see the module doc).
    """

    name = "arithmetic"

    def __init__(
        self, digits: int = 2, val_size: int = 500, test_size: int = 1000, split_seed: int = 1234,
        pad_answer: bool = True, check_size: int | None = None,
    ) -> None:
        check_int("Arithmetic.digits", digits, minimum=1, maximum=9)
        n_pairs = 10 ** (2 * digits)
        for field, value in (("val_size", val_size), ("test_size", test_size)):
            check_int(f"Arithmetic.{field}", value, minimum=1)
        n_check = check_size_of("Arithmetic.check_size", check_size, val_size)
        pool = min(n_pairs, _MAX_POOL)
        if val_size + test_size + n_check >= pool:
            raise ValueError(
                f"Arithmetic.val_size + test_size + check_size = {val_size + test_size + n_check} is not valid for "
                f"digits={digits}; accepted: fewer than {pool} (the held-out splits must leave training pairs; "
                f"check_size=None means val_size)"
            )
        self.digits = digits
        self.val_size = val_size
        self.test_size = test_size
        self.check_size = check_size
        self.split_seed = split_seed
        self.pad_answer = bool(pad_answer)
        rng = random.Random(split_seed)
        ids = rng.sample(range(n_pairs), pool)  # a uniformly shuffled pool of pair ids
        self._ids = {
            "test": ids[:test_size],
            "val": ids[test_size : test_size + val_size],
            "check": ids[test_size + val_size : test_size + val_size + n_check],
            "train": ids[test_size + val_size + n_check :],
        }

    def _example(self, pair_id: int) -> Example:
        a, b = divmod(pair_id, 10**self.digits)
        prompt = f"{a:0{self.digits}d}+{b:0{self.digits}d}="
        answer = f"{a + b:0{self.digits + 1}d}" if self.pad_answer else str(a + b)
        return Example(prompt=prompt, answer=answer, uid=f"arithmetic{self.digits}/{a}+{b}")

    def load(self, split: str) -> Sequence[Example]:
        return [self._example(i) for i in self._ids[split]]

    def reward(self, response: str, example: Example) -> float:
        return 1.0 if response.strip() == example.answer else 0.0
