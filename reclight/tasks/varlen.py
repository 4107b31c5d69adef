"""An embedded task whose response length varies with the problem: sums of 1- to 3-digit numbers.

A problem of level d adds two d-digit numbers written without leading zeros (``"7+5="``,
``"38+64="``, ``"381+645="``; level 1 includes 0). The gold response is the sum, unpadded and
written least-significant digit first (``"21"``, ``"201"``, ``"6201"`` for 12, 102, 1026),
followed by the tokenizer's end token. The arithmetic task pads every answer to one width;
this one does not, so the time a response takes to decode depends on the problem, which is
what an asynchronous schedule selects on (groups complete in the order of their longest
sample).

Why reversed: that is the order in which the digits are computed (each one needs only its
column and the carry from the digit before it), whereas the first digit of a sum in the usual
order depends on every column below it. The embedded model did not learn the usual order:
with the supervised warm-up of ``configs/varlen.yaml`` (batch 128, lr 1e-3, seed 0) held-out
accuracy (its check set) was 8.5% after 700 steps in the usual order (13% after 1500 at lr
2e-3) and reached 42.5% after 380 steps reversed. ``reverse_answer=False`` gives the usual order.

How length relates to difficulty, by construction:

- A level-d answer has d digits, or d + 1 when the top column carries; its response is that
  plus EOS, so 2 to 5 tokens over levels 1 to 3. Mean gold answer length rises with the level
  (1.45, 2.60, 3.60 digits over all pairs of levels 1, 2, 3), and no level-d answer is longer
  than any level-(d + 1) one.
- Longer is harder: a level-d sum needs d column additions and a carry chain of up to d
  columns, and every digit must be right. On the embedded model, after the warm-up above,
  greedy accuracy on ``val`` was 75% at level 1, 67% at level 2 and 13% at level 3.
- Beyond the level, length says little about correctness: a wrong response can have the
  wrong length (a missed or invented final carry), but after that warm-up only 1.8% of greedy
  and 3.8% of sampled (temperature 1) ``val`` responses differed in length from the gold one.
  The length of a response, and so of a group's samples, is the problem's.

Splits, and where they depart from a plain random partition:

- Each level's operand pairs are shuffled by ``random.Random(f"{split_seed}/{d}")``; the
  first ones go to ``test``, the next to ``val``, the next to ``check`` (where the supervised
  warm-up decides to stop), the rest (up to ``train_per_level``) to ``train``. So the splits are
  disjoint and identical on every machine for one ``split_seed``, a level's split does not
  depend on which other levels are present, and ``check`` comes out of the training pool:
  ``val`` and ``test`` are the pairs they were before it existed.
- Level 1 has only 100 pairs (level 2: 8,100; level 3: 810,000). A held-out split therefore
  takes at most a fifth of a level's pairs, and its size is spread over the levels by
  water-filling: the smallest level takes min(its cap, an equal share), the rest share what
  is left. With the defaults ``val`` holds 20 / 240 / 240 problems of levels 1 / 2 / 3 and
  ``test`` 20 / 490 / 490 (``check``, as large as ``val`` by default, 20 / 240 / 240), so
  held-out accuracy is mostly about levels 2 and 3.
- ``train`` holds ``train_per_level`` problems of EVERY level, so each level is a third of
  the training prompts: a level with fewer distinct pairs left (level 1: 40) is cycled, so
  its problems repeat within an epoch. Without that, level 3 would be 99% of the prompts.
- ``val``, ``test`` and ``check`` are shuffled across levels, so any slice of them (the
  warm-up checks the first ``model.warmup.check_size`` check problems) holds the levels in
  about the same proportions.

The reward is 1.0 when the response, with special tokens removed and surrounding whitespace
stripped, equals the gold answer exactly, else 0.0 (a sum in the other digit order, a padded
one and a response that runs past the answer are wrong). Prompt plus response take at most
3 max_digits + 4 tokens of the character tokenizer (13 at the default), within the embedded
model's 64 positions; ``model.sampling.max_new_tokens`` must be at least max_digits + 2.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from reclight.checks import check_bool, check_int, invalid
from reclight.tasks.base import Example, Task, check_size_of

_FIELD = "data.task.init_args."
HELD_OUT_SHARE = 5
"""A held-out split takes at most 1 / HELD_OUT_SHARE of a level's operand pairs."""


def level_bounds(digits: int) -> tuple[int, int]:
    """``(lowest, highest + 1)`` of a level's operands: d-digit numbers, and 0 at level 1."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits


def level_size(digits: int) -> int:
    """Number of operand pairs of a level (ordered: 3+4 and 4+3 are two problems)."""
    low, high = level_bounds(digits)
    return (high - low) ** 2


def split_sizes(size: int, pools: Sequence[int]) -> list[int]:
    """How a held-out split of ``size`` problems is spread over levels of ``pools`` pairs
    (water-filling): in order of pool size, a level takes min(pool // HELD_OUT_SHARE, an equal
    share of what is left), so small levels give what they can and the rest share the
    remainder. The sizes sum to ``size`` unless the caps are too small (checked by the caller)."""
    order = sorted(range(len(pools)), key=lambda i: pools[i])
    sizes, left = [0] * len(pools), size
    for n, i in enumerate(order):
        share = -(-left // (len(pools) - n))  # ceil: the larger levels take the remainder
        sizes[i] = min(pools[i] // HELD_OUT_SHARE, share)
        left -= sizes[i]
    return sizes


class VarLenAddition(Task):
    """Sums of two d-digit numbers, d from ``min_digits`` to ``max_digits``, answered unpadded
    (reversed by default).

    Args:
        max_digits: the hardest level (operand digits), at most 6.
        min_digits: the easiest level.
        val_size: held-out problems in ``val`` (periodic greedy evaluation), over all levels.
        test_size: held-out problems in ``test``, over all levels.
        check_size: problems in ``check``, over all levels, where the supervised warm-up
            decides to stop (taken from the training pool, disjoint from ``val``); None:
            ``val_size``.
        train_per_level: training problems per level (cycled where a level has fewer).
        split_seed: seeds the splits; keep it fixed across training seeds so every run is
            evaluated on the same held-out problems.
        reverse_answer: write the sum least-significant digit first (see the module doc).
    """

    name = "varlen"

    def __init__(
        self, max_digits: int = 3, min_digits: int = 1, val_size: int = 500, test_size: int = 1000,
        train_per_level: int = 10_000, split_seed: int = 1234, reverse_answer: bool = True,
        check_size: int | None = None,
    ) -> None:
        check_int(_FIELD + "max_digits", max_digits, minimum=1, maximum=6)
        check_int(_FIELD + "min_digits", min_digits, minimum=1, maximum=max_digits,
                  accepted=f"an integer in [1, max_digits={max_digits}]")
        check_int(_FIELD + "train_per_level", train_per_level, minimum=1)
        check_int(_FIELD + "split_seed", split_seed)
        check_bool(_FIELD + "reverse_answer", reverse_answer)
        self.levels = tuple(range(min_digits, max_digits + 1))
        pools = [level_size(d) for d in self.levels]
        room = sum(p // HELD_OUT_SHARE for p in pools)
        sizes = {}
        check_total = check_size_of(_FIELD + "check_size", check_size, val_size)  # None: val_size (checked first)
        for field, value in (("val_size", val_size), ("test_size", test_size), ("check_size", check_total)):
            check_int(_FIELD + field, value, minimum=1)
            sizes[field] = split_sizes(value, pools)
            if sum(sizes[field]) < value:
                levels = f"levels {min_digits} to {max_digits}" if min_digits < max_digits else f"level {max_digits}"
                raise invalid(_FIELD + field, value, f"an integer in [1, {room}] for {levels} "
                              f"(a held-out split takes at most 1/{HELD_OUT_SHARE} of each level's pairs)")
        self.max_digits, self.min_digits = max_digits, min_digits
        self.val_size, self.test_size, self.check_size = val_size, test_size, check_size
        self.train_per_level, self.split_seed = train_per_level, split_seed
        self.reverse_answer = reverse_answer
        self._splits: dict[str, list[tuple[int, int]]] = {"train": [], "check": [], "val": [], "test": []}
        for d, pool, n_val, n_test, n_check in zip(self.levels, pools, sizes["val_size"], sizes["test_size"],
                                                   sizes["check_size"]):
            rng = random.Random(f"{split_seed}/{d}")
            held = n_test + n_val + n_check
            ids = rng.sample(range(pool), min(pool, held + train_per_level))
            train = ids[held:]
            train = (train * -(-train_per_level // len(train)))[:train_per_level]  # cycle a small level
            for split, part in (("test", ids[:n_test]), ("val", ids[n_test : n_test + n_val]),
                                ("check", ids[n_test + n_val : held]), ("train", train)):
                self._splits[split] += [(d, i) for i in part]
        mix = random.Random(f"{split_seed}/mix")
        for split in ("val", "test", "check"):  # check last: val and test keep the order they had before it
            mix.shuffle(self._splits[split])

    @staticmethod
    def operands(digits: int, pair_id: int) -> tuple[int, int]:
        """The operands of pair ``pair_id`` (in ``[0, level_size(digits))``) of a level."""
        low, high = level_bounds(digits)
        a, b = divmod(pair_id, high - low)
        return low + a, low + b

    def _example(self, digits: int, pair_id: int) -> Example:
        a, b = self.operands(digits, pair_id)
        answer = str(a + b)[::-1] if self.reverse_answer else str(a + b)
        return Example(prompt=f"{a}+{b}=", answer=answer, uid=f"varlen/{a}+{b}")

    def load(self, split: str) -> Sequence[Example]:
        return [self._example(d, i) for d, i in self._splits[split]]

    @staticmethod
    def level(example: Example) -> int:
        """The level (operand digits) of one of this task's examples."""
        return len(example.prompt.split("+", 1)[0])

    def reward(self, response: str, example: Example) -> float:
        return 1.0 if response.strip() == example.answer else 0.0
