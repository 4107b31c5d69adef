"""Positions and masks, by hand: left-padded prompts, right-padded responses."""

import torch

from reclight.kernels.masks import position_ids_from_mask, prefill_visible, response_mask_from_ids


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


def test_prefill_visible_is_causal_over_real_tokens_and_pads_see_themselves():
    vis = prefill_visible(torch.tensor([[False, True, True]]))[0].int().tolist()
    # query 0 (padding) sees only itself; query 1 sees key 1; query 2 sees keys 1 and 2 (never the pad)
    assert vis == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_response_mask_up_to_first_eos_and_trailing_pad():
    """EOS id 2, pad id 0. Row 0: EOS at 1 -> [1, 1, 0, 0]; row 1: no EOS, two trailing pads
    (a stop string ended it) -> [1, 1, 0, 0] with pad_id, all four without; row 2: a pad in the
    middle is a real token; row 3: EOS first."""
    ids = torch.tensor([[5, 2, 6, 2], [5, 6, 0, 0], [5, 0, 6, 7], [2, 0, 0, 0]])
    assert response_mask_from_ids(ids, [2], pad_id=0).int().tolist() == [
        [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert response_mask_from_ids(ids, [2]).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert response_mask_from_ids(ids, [2, 7], pad_id=0)[2].int().tolist() == [1, 1, 1, 1]
    assert response_mask_from_ids(ids, [2], pad_id=2).int().tolist()[1] == [1, 1, 1, 1]  # pad == EOS: not stripped
