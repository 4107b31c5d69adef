"""Log-probs of the policy vs the engine, padding invariance, response masks."""

import torch
from torch.testing import assert_close

from reclight.engines.hf import HFGenerateEngine
from reclight.kernels.masks import response_mask_from_ids
from reclight.models.forward import response_logprobs
from reclight.models.loading import load_causal_lm
from reclight.models.tokens import encode_prompts
from reclight.engines.base import SamplingConfig
from reclight.models.tiny import build_tiny
from conftest import MICRO

PROMPTS = ["1+2=", "123+45=", "9=", "77+8="]  # different lengths -> left padding


def _setup(tmp_path, temperature=0.7):
    model, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=3)))
    eng = HFGenerateEngine(model, tok, SamplingConfig(num_samples=3, max_new_tokens=6, temperature=temperature))
    return model, tok, eng


def test_engine_logp_behav_equals_policy_logp(tmp_path):
    """Same weights, same temperature: the sampling-time log-probs (incremental decoding with
    the KV cache) equal the trainer's full-sequence log-probs to 1e-4 in fp32."""
    model, tok, eng = _setup(tmp_path)
    ids, mask = encode_prompts(tok, PROMPTS)
    gen = eng.generate(ids, mask, seed=11)
    assert gen.response_ids.shape[:2] == (4, 3) and gen.response_mask.any()
    logp, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask, temperature=0.7)
    assert_close(logp, gen.logp_behav, rtol=0, atol=1e-4)
    assert (gen.logp_behav[~gen.response_mask] == 0).all()
    assert gen.version.eq(0).all()


def test_padding_invariance(tmp_path):
    """A left-padded batch gives each sample the same logp as scoring it alone."""
    model, tok, eng = _setup(tmp_path)
    ids, mask = encode_prompts(tok, PROMPTS)
    gen = eng.generate(ids, mask, seed=5)
    batched, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask)
    for b, p in enumerate(PROMPTS):
        i1, m1 = encode_prompts(tok, [p])
        alone, _ = response_logprobs(model, i1, m1, gen.response_ids[b : b + 1], gen.response_mask[b : b + 1])
        assert_close(batched[b : b + 1], alone, rtol=0, atol=1e-5)


def test_sampling_is_seeded_and_update_weights_copies_in_place(tmp_path):
    model, tok, eng = _setup(tmp_path, temperature=1.0)
    ids, mask = encode_prompts(tok, PROMPTS)
    a, b = eng.generate(ids, mask, seed=1), eng.generate(ids, mask, seed=1)
    assert torch.equal(a.response_ids, b.response_ids)
    ptrs = [p.data_ptr() for p in eng.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    eng.update_weights(model, version=7)
    assert eng.version == 7 and [p.data_ptr() for p in eng.model.parameters()] == ptrs
    for (n, p), q in zip(model.named_parameters(), eng.model.parameters()):
        assert torch.equal(p, q), n
    assert eng.generate(ids, mask, seed=1).version.eq(7).all()


def test_response_mask_stops_after_first_eos():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9], [5, 6, 0, 0, 0]])
    mask = response_mask_from_ids(ids, [eos], pad)
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    assert torch.equal(mask, expected)
