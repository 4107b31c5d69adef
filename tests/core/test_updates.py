"""Several updates per batch (reclight/updates.py): the rows of each update, the divisor check
and the merge of the updates' metrics, with values derived by hand."""

import pytest
import torch

from reclight.updates import check_mini_batches, merge_update_metrics, update_rows


def test_one_mini_batch_is_the_whole_batch_once_per_epoch_without_a_copy():
    rows = update_rows(5, 3, 1)
    assert rows == [slice(0, 5)] * 3
    x = torch.arange(10).view(5, 2)
    assert x[rows[0]].data_ptr() == x.data_ptr()  # a view, no copy


def test_mini_batches_are_strided_and_repeat_every_epoch():
    """6 groups, M = 3: mini-batch m = rows m, m + 3; two epochs repeat the same three."""
    rows = update_rows(6, 2, 3)
    assert [r.tolist() for r in rows] == [[0, 3], [1, 4], [2, 5]] * 2
    assert all(r.dtype == torch.long and r.device.type == "cpu" for r in rows)
    assert update_rows(6, 1, 3, device="cpu")[0].device.type == "cpu"


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_union_over_ranks_is_the_single_process_mini_batch(ranks):
    """8 groups, M = 2, each rank holding a contiguous share of 8 / ranks groups: the union over
    ranks of each rank's mini-batch m is the single-process mini-batch m (0, 2, 4, 6 and 1, 3, 5,
    7) on 1, 2 or 4 ranks. Contiguous blocks would give {0, 1, 4, 5} on 2 ranks, {0..3} on 1."""
    n, m_count, share = 8, 2, 8 // ranks
    single = [r.tolist() for r in update_rows(n, 1, m_count)]
    assert single == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for m in range(m_count):
        union = sorted(rank * share + i for rank in range(ranks) for i in update_rows(share, 1, m_count)[m].tolist())
        assert union == single[m]


def test_divisor_check_names_the_field_as_typed():
    check_mini_batches(8, 4, "model.updates.mini_batches", "prompts per rank")
    with pytest.raises(ValueError) as e:
        check_mini_batches(8, 3, "model.updates.mini_batches", "prompts per rank (data.prompts_per_step=8 over 1 rank(s))")
    assert str(e.value) == ("model.updates.mini_batches=3 is not valid; accepted: a divisor of the 8 prompts per rank "
                            "(data.prompts_per_step=8 over 1 rank(s))")
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"^multi_mini_batches=.* is not valid; accepted: an integer >= 1$"):
            check_mini_batches(8, bad, "multi_mini_batches", "groups")
    with pytest.raises(ValueError, match=r"^mini_batches=4 is not valid; accepted: a divisor of the 6 groups$"):
        update_rows(6, 1, 4)
    with pytest.raises(ValueError, match=r"^epochs=0 is not valid; accepted: an integer >= 1$"):
        update_rows(6, 0, 1)


def test_merge_of_scalars_by_hand():
    """Two updates: loss 1 and 3 -> mean 2; ratio/max 1.25 and 1.5 -> 1.5; ratio/min 0.75 and
    0.5 -> 0.5; mismatch/logp_diff_max (ends in "max") -> the max, 0.25."""
    updates = [
        {"loss/policy": torch.tensor(1.0), "ratio/max": torch.tensor(1.25), "ratio/min": torch.tensor(0.75),
         "mismatch/logp_diff_max": torch.tensor(0.25)},
        {"loss/policy": torch.tensor(3.0), "ratio/max": torch.tensor(1.5), "ratio/min": torch.tensor(0.5),
         "mismatch/logp_diff_max": torch.tensor(0.125)},
    ]
    out = merge_update_metrics(updates)
    assert out == {"loss/policy": 2.0, "ratio/max": 1.5, "ratio/min": 0.5, "mismatch/logp_diff_max": 0.25}
    assert all(v.shape == () for v in out.values())


def test_merge_of_per_row_metrics_reduces_over_updates_only():
    """Three updates of R = 2 rows: row 0 sees 1, 4, 7 and row 1 sees 6, 2, 1: mean [4, 3],
    max [7, 6], min [1, 1] (not reduced across rows)."""
    seen = torch.tensor([[1.0, 6.0], [4.0, 2.0], [7.0, 1.0]], dtype=torch.float64)  # [U, R]
    updates = [{"clip/frac": s, "ratio/max": s, "ratio/min": s} for s in seen]
    out = merge_update_metrics(updates)
    assert out["clip/frac"].tolist() == [4.0, 3.0] and out["clip/frac"].dtype == torch.float64
    assert out["ratio/max"].tolist() == [7.0, 6.0] and out["ratio/min"].tolist() == [1.0, 1.0]


def test_merge_of_one_update_is_unchanged_and_dtypes():
    one = {"loss/policy": torch.tensor(0.1, dtype=torch.bfloat16), "n": torch.tensor(3)}
    assert merge_update_metrics([one]) is one
    two = merge_update_metrics([one, {"loss/policy": torch.tensor(0.3, dtype=torch.bfloat16), "n": torch.tensor(4)}])
    assert two["loss/policy"].dtype == torch.float32 and two["n"].dtype == torch.float32 and two["n"] == 3.5
    with pytest.raises(ValueError, match="at least one update"):
        merge_update_metrics([])


def test_micro_batches_cut_an_updates_rows_in_order():
    """micro_batches: consecutive pieces of `size` groups of one update's rows (the last may be
    shorter), for a slice (one mini-batch) and for strided rows (M > 1); None: one piece."""
    from reclight.updates import micro_batches

    assert micro_batches(slice(0, 5), 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert micro_batches(slice(0, 5), None) == [slice(0, 5)]
    parts = micro_batches(torch.tensor([1, 4, 7]), 2)
    assert [p.tolist() for p in parts] == [[1, 4], [7]]
