"""Tokenizer conventions: end ids, pad id, prompt rendering."""

from types import SimpleNamespace as NS

import pytest

from reclight.models.tiny import build_tokenizer
from reclight.models.tokens import encode_prompts, eos_ids, pad_id, render_prompts


def test_eos_and_pad_ids_are_normalised():
    assert eos_ids(NS(eos_token_id=2)) == [2]
    assert eos_ids(NS(eos_token_id=[2, 7])) == [2, 7]
    assert pad_id(NS(eos_token_id=[7, 2], pad_token_id=None)) == 7  # an int, never the list
    assert pad_id(NS(eos_token_id=2, pad_token_id=0)) == 0
    with pytest.raises(ValueError, match="eos_token_id=None; accepted: a tokenizer with an end-of-sequence token"):
        eos_ids(NS(eos_token_id=None))


def test_prompts_are_left_padded_raw_without_a_chat_template():
    tok = build_tokenizer()
    assert render_prompts(tok, ["1+1="]) == ["1+1="]
    ids, mask = encode_prompts(tok, ["1+1=", "12+34="])
    assert ids.shape == (2, 6) and mask[0].tolist() == [False, False, True, True, True, True]
    assert tok.decode(ids[1]) == "12+34="
