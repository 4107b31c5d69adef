"""Hand-derived tests of reclight.advantages (docs/algorithms.md section 1)."""

import pytest
import torch
from torch.testing import assert_close

from reclight.algorithms import PRESETS, get_algorithm
from reclight.advantages import group_advantages

F64 = torch.float64


def test_reinforce_advantage_is_reward_minus_group_mean():
    """std_normalize=False: A_i = r_i - mean(r). Row [1, 0, 0, 0]: mean 0.25 ->
    [0.75, -0.25, -0.25, -0.25]; row [1, 1, 0, 0.5]: mean 0.625 -> [0.375, 0.375, -0.625, -0.125]."""
    r = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0.5]], dtype=F64)
    adv, keep = group_advantages(r, PRESETS["rec_oneside_nois"])
    assert keep.all()
    assert_close(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.375, 0.375, -0.625, -0.125]], dtype=F64))


def test_grpo_divides_by_population_std():
    """GRPO: A_i = (r_i - mean)/(sigma + 1e-6), sigma the population std.
    [1, 0, 0, 0]: mean 1/4, sigma = sqrt((9/16 + 3/16)/4) = sqrt(3)/4."""
    r = torch.tensor([[1.0, 0, 0, 0]], dtype=F64)
    adv, _ = group_advantages(r, PRESETS["grpo"])
    sigma = 3**0.5 / 4
    assert_close(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25]], dtype=F64) / (sigma + 1e-6))


@pytest.mark.parametrize("preset", ["reinforce", "grpo", "red_drop"])
@pytest.mark.parametrize("value", [0.0, 0.1, 1.0, -3.7, 1e6])
def test_all_equal_group_gives_exact_zero(preset, value):
    """A group of identical rewards has no signal: A = 0 exactly (not NaN, and not the
    (tiny float error)/(0 + 1e-6) blow-up GRPO's formula would give: e.g. the float mean of
    four 0.1s is 0.1 + 1.4e-17)."""
    r = torch.full((2, 4), value, dtype=F64)
    r[1] = torch.tensor([1.0, 0, 1, 0])  # a normal group beside it is unaffected
    adv, keep = group_advantages(r, PRESETS[preset], torch.Generator().manual_seed(0))
    assert torch.equal(adv[0], torch.zeros(4, dtype=F64))
    assert keep[0].all()  # ties count as positive: nothing to balance
    assert torch.isfinite(adv).all() and adv[1].abs().sum() > 0


def test_red_drop_balances_and_recomputes_baseline():
    """RED-Drop per group: positives r >= mean (ties positive). Row [1, 0, 0, 0, 0, 0]: 1 pos,
    5 neg -> drop 4 negatives; S = {0, j}: rbar = 0.5, A = [0.5, -0.5] on S, 0 elsewhere.
    Row [1, 1, 1, 0]: 3 pos >= 1 neg -> nothing dropped, A = r - 0.75.
    Row [2, 1, 0, 0, 0, 3]: mean 1, pos {0, 1, 5} (r=1 ties) vs neg {2, 3, 4}: balanced."""
    r = torch.tensor([[1.0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0.75, 0.75], [2, 1, 0, 0, 0, 3]], dtype=F64)
    adv, keep = group_advantages(r, PRESETS["red_drop"], torch.Generator().manual_seed(3))
    # row 0
    assert keep[0, 0] and keep[0].sum() == 2
    j = int(keep[0, 1:].nonzero()[0]) + 1
    expected0 = torch.zeros(6, dtype=F64)
    expected0[0], expected0[j] = 0.5, -0.5
    assert_close(adv[0], expected0)
    # row 1: mean = 4.5/6 = 0.75 -> positives {0,1,2,4,5} (0.75 ties), negatives {3}
    assert keep[1].all()
    assert_close(adv[1], r[1] - 0.75)
    # row 2
    assert keep[2].all()
    assert_close(adv[2], r[2] - 1.0)


def test_red_drop_counts_over_many_groups():
    """On every group of a random binary batch, #kept negatives == #positives when negatives
    outnumber positives, and nothing is dropped otherwise; positives are never dropped."""
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(200, 8, generator=g) < 0.3).double()
    adv, keep = group_advantages(r, PRESETS["red_drop"], torch.Generator().manual_seed(1))
    mean = r.mean(-1, keepdim=True)
    pos = r >= mean
    n_pos, n_neg = pos.sum(-1), (~pos).sum(-1)
    kept_neg = (keep & ~pos).sum(-1)
    assert torch.equal(keep | ~pos, torch.ones_like(keep))  # all positives kept
    assert torch.equal(kept_neg, torch.minimum(n_neg, n_pos))
    # baseline recomputed on S: kept advantages sum to zero per group
    assert_close((adv * keep).sum(-1), torch.zeros(200, dtype=F64), atol=1e-12, rtol=0)
    assert (adv[~keep] == 0).all()


def test_red_drop_is_reproducible_and_seed_dependent():
    """The same seed gives the same drops; across seeds, which negatives are dropped varies
    (row [1, 0, 0, 0]: any of the three 2-subsets of {1, 2, 3} may be dropped)."""
    r = torch.tensor([[1.0, 0, 0, 0]])
    runs = [group_advantages(r, PRESETS["red_drop"], torch.Generator().manual_seed(s))[1] for s in range(30)]
    again = [group_advantages(r, PRESETS["red_drop"], torch.Generator().manual_seed(s))[1] for s in range(30)]
    assert all(torch.equal(a, b) for a, b in zip(runs, again))
    kept_neg = {int(k[0, 1:].nonzero()[0]) for k in runs}
    assert kept_neg == {0, 1, 2}


def test_red_drop_with_grpo_normalization_on_kept_set():
    """drop + std_normalize: sigma is recomputed over S. S = {1.0, 0.0}: rbar 0.5, sigma 0.5,
    A = [+-0.5 / (0.5 + 1e-6)]."""
    cfg = get_algorithm("red_drop", std_normalize=True)
    r = torch.tensor([[1.0, 0, 0, 0]], dtype=F64)
    adv, keep = group_advantages(r, cfg, torch.Generator().manual_seed(0))
    assert_close(adv[keep], torch.tensor([0.5, -0.5], dtype=F64) / (0.5 + 1e-6))


def test_invalid_samples_leave_the_baseline():
    """valid=False samples (failed rewards) are not in S: row [1, NaN, 0, 0] with the NaN
    invalid has rbar = 1/3 over the three others, A = [2/3, 0, -1/3, -1/3], keep False at 1."""
    r = torch.tensor([[1.0, float("nan"), 0.0, 0.0]], dtype=F64)
    valid = torch.tensor([[True, False, True, True]])
    adv, keep = group_advantages(r, PRESETS["reinforce"], valid=valid)
    assert_close(adv, torch.tensor([[2 / 3, 0.0, -1 / 3, -1 / 3]], dtype=F64))
    assert keep.tolist() == [[True, False, True, True]]


def test_bad_inputs_are_rejected_clearly():
    with pytest.raises(ValueError, match=r"K >= 2.*got shape \(3, 1\)"):
        group_advantages(torch.zeros(3, 1), PRESETS["grpo"])
    with pytest.raises(ValueError, match=r"shape \[B, K\]"):
        group_advantages(torch.zeros(4), PRESETS["grpo"])
    with pytest.raises(ValueError, match=r"rewards\[0, 2\]=inf is not finite"):
        group_advantages(torch.tensor([[0.0, 1.0, float("inf")]]), PRESETS["grpo"])


def test_filter_uniform_groups_removes_whole_groups_from_the_loss_and_the_counts():
    """DAPO's dynamic sampling without refill. Groups: [1, 1, 1] (uniform), [0, 1, 0],
    [0.5, 0.5, invalid] (uniform among valid), [2, invalid, invalid] (one valid reward: no
    baseline). Only group 1 keeps its samples; its advantages are r - 1/3; the kept mask drives
    every count (tokens, sequences) of the loss."""
    from reclight.losses import policy_loss

    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [2.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 3, [True] * 3, [True, True, False], [True, False, False]])
    cfg = get_algorithm("rec_oneside_nois", filter_uniform_groups=True)
    adv, keep = group_advantages(rewards, cfg, valid=valid)
    assert keep.tolist() == [[False] * 3, [True] * 3, [False] * 3, [False] * 3]
    assert_close(adv[1], torch.tensor([-1 / 3, 2 / 3, -1 / 3]))
    assert (adv[[0, 2, 3]] == 0).all()
    unfiltered_adv, unfiltered_keep = group_advantages(rewards, get_algorithm("rec_oneside_nois"), valid=valid)
    assert unfiltered_keep.sum() == 9 and keep.sum() == 3
    # the loss of the filtered batch is the loss of group 1 alone (its own token count)
    logp = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mask = torch.ones(4, 3, 2, dtype=torch.bool) & keep[..., None]
    full, _ = policy_loss(logp, logp.detach(), adv, mask, cfg)
    alone, _ = policy_loss(logp[1:2], logp[1:2].detach(), adv[1:2], mask[1:2], cfg)
    assert_close(full, alone, rtol=0, atol=1e-7)


def test_overlong_penalty_three_regions_and_their_boundaries():
    """L = 10, C = 4 (expected length 6): |y| <= 6 -> 0; 6 < |y| <= 10 -> (6 - |y|) / 4,
    linear from -0.25 at 7 to -1 at 10; |y| > 10 -> -1."""
    from reclight.advantages import overlong_penalty

    lengths = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    expected = torch.tensor([[0.0, 0.0, 0.0, -0.25], [-0.5, -0.75, -1.0, -1.0]])
    assert_close(overlong_penalty(lengths, 10, 4), expected, rtol=0, atol=0)
    assert_close(overlong_penalty(lengths, 10, 10), torch.tensor([[0.0, -0.5, -0.6, -0.7], [-0.8, -0.9, -1.0, -1.0]]),
                 rtol=0, atol=1e-7)  # C = L: the ramp starts at |y| = 0


def test_overlong_bounds_default_cache_and_config_errors():
    cfg = get_algorithm("dapo")
    assert cfg.overlong_bounds(1024) == (1024, 204) and cfg.overlong_bounds(5) == (5, 1) and cfg.overlong_bounds(1) == (1, 1)
    assert cfg.replace(overlong_length=20, overlong_cache=4).overlong_bounds(5) == (20, 4)
    with pytest.raises(ValueError, match=r"overlong_cache=8 is not valid; accepted: an integer in \[1, overlong_length=5\]"):
        cfg.replace(overlong_cache=8).overlong_bounds(5)


def test_shape_rewards_penalty_kl_and_filter_by_hand():
    """shape_rewards, the one reward-shaping step of the trainer and the bench (docs/algorithms.md
    sections 6.3, 6.6). L = 10, C = 4 (overlong_length/cache), lengths [5, 7, 10, 10]:
    penalties [0, (6-7)/4, -1, -1] = [0, -0.25, -1, -1], added to valid samples only (the
    last one is invalid); the KL in the reward subtracts beta * sum_t (logp_behav - logp_ref) =
    0.5 * (0.2 + 0.2) = 0.2 per sample here (two valid tokens of 0.2 each); the overlong filter
    drops the truncated samples from the loss (keep) without touching their rewards."""
    from reclight.advantages import shape_rewards

    cfg = get_algorithm("dapo", overlong_length=10, overlong_cache=4, overlong_filter=True, kl_coef=0.5, kl_in="reward")
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False]])
    lengths = torch.tensor([[5, 7, 10, 10]])
    truncated = torch.tensor([[False, False, True, False]])
    logp_ref = torch.zeros(1, 4, 3)
    logp_behav = torch.full((1, 4, 3), 0.2)
    mask = torch.tensor([True, True, False]).expand(1, 4, 3)
    shaped, keep = shape_rewards(rewards, valid, lengths, truncated, cfg, max_new_tokens=10,
                                 logp_behav=logp_behav, logp_ref=logp_ref, mask=mask)
    assert_close(shaped, torch.tensor([[1.0 - 0.2, 1.0 - 0.25 - 0.2, -1.0 - 0.2, 0.0 - 0.2]]), rtol=0, atol=1e-6)
    assert keep.tolist() == [[True, True, False, True]]
    plain, keep = shape_rewards(rewards, valid, lengths, truncated, get_algorithm("rec_oneside_nois"), max_new_tokens=10)
    assert torch.equal(plain, rewards) and bool(keep.all())  # no shaping: unchanged, bitwise
    with pytest.raises(ValueError, match=r"kl_in='reward' with kl_coef > 0 needs logp_behav, logp_ref and mask"):
        shape_rewards(rewards, valid, lengths, truncated, cfg, max_new_tokens=10)
