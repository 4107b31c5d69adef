"""The prompt sampler: step t's prompts are a function of (seed, t) only."""

import random

import pytest

from reclight.rollout.sampler import PromptSampler


def test_epochs_are_seeded_permutations_cut_into_batches():
    """10 examples, batch 3: 3 steps per epoch (the remainder, one example, is dropped); epoch e
    is random.Random(f"{seed}/{e}").shuffle(range(10)), so step 4 = epoch 1, position 1."""
    s = PromptSampler(10, 3, seed=7)
    assert s.steps_per_epoch == 3
    perm0, perm1 = list(range(10)), list(range(10))
    random.Random("7/0").shuffle(perm0)
    random.Random("7/1").shuffle(perm1)
    assert [s.indices(t) for t in range(3)] == [perm0[0:3], perm0[3:6], perm0[6:9]]
    assert s.indices(4) == perm1[3:6]
    epoch = sorted(i for t in range(3) for i in s.indices(t))
    assert len(set(epoch)) == 9  # no repeats within an epoch


def test_no_state_resumed_sampler_agrees_and_seed_matters():
    a, b = PromptSampler(50, 4, seed=1), PromptSampler(50, 4, seed=1)
    forward = [a.indices(t) for t in range(30)]
    assert [b.indices(t) for t in reversed(range(30))][::-1] == forward  # any access order
    assert PromptSampler(50, 4, seed=2).indices(0) != forward[0]


def test_bad_batch_size_names_the_field():
    for bad in (0, 11, True):
        with pytest.raises(ValueError, match=rf"prompts_per_step={bad!r} is not valid; accepted: 1 <= prompts_per_step "
                                             r"<= 10 \(the size of the train split\)"):
            PromptSampler(10, bad)
