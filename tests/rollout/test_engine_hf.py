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


# -- top-p: the kept mass S (docs/algorithms.md section 6.8) --------------------------------------------
def test_top_p_one_adds_nothing_and_records_no_kept_mass(tmp_path):
    """With top_p 1 the engine's samples and logp_behav are bitwise those of the plain hf_generate
    (no extra processor), and logp_kept_mass is None."""
    from reclight.engines.hf import hf_generate

    model, tok, eng = _setup(tmp_path)
    ids, mask = encode_prompts(tok, PROMPTS)
    gen = eng.generate(ids, mask, seed=3)
    torch.manual_seed(3)
    ref_ids, ref_mask, ref_logp, ref_kept = hf_generate(eng.model, tok, ids, mask, num_samples=3, max_new_tokens=6,
                                                        temperature=0.7)
    assert gen.logp_kept_mass is None and ref_kept is None
    assert torch.equal(gen.response_ids, ref_ids) and torch.equal(gen.response_mask, ref_mask)
    assert torch.equal(gen.logp_behav, ref_logp)


def test_top_p_records_the_mass_it_kept(tmp_path):
    """top_p 0.7 at temperature 0.7: at every sampled position, exp(logp_kept_mass) equals the mass
    of the nucleus computed independently from the model's full next-token distribution (sorted
    descending, a token is kept while the mass ranked above it is < 0.7), the sampled token lies in
    it, and log S is 0 off-mask. The samples are those of the same seed without recording S (the
    recorder only reads)."""
    from reclight.engines.hf import hf_generate

    model, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=3)))
    sampling = SamplingConfig(num_samples=4, max_new_tokens=6, temperature=0.7, top_p=0.7)
    eng = HFGenerateEngine(model, tok, sampling)
    ids, mask = encode_prompts(tok, ["12+3="])
    gen = eng.generate(ids, mask, seed=7)
    log_s = gen.logp_kept_mass
    assert log_s is not None and log_s.shape == gen.logp_behav.shape
    assert (log_s[~gen.response_mask] == 0).all() and (log_s <= 1e-6).all()
    checked = truncated = 0
    with torch.no_grad():
        for k in range(4):
            n = int(gen.response_mask[0, k].sum())
            seq = torch.cat([ids[0], gen.response_ids[0, k, :n]])[None]
            logits = model(input_ids=seq).logits[0, ids.shape[1] - 1: ids.shape[1] - 1 + n].float()
            probs = torch.softmax(logits / 0.7, -1)
            for t in range(n):
                p, order = probs[t].sort(descending=True)
                above = torch.cumsum(p, 0) - p  # mass ranked strictly above each token
                nucleus = order[above < 0.7]
                assert int(gen.response_ids[0, k, t]) in nucleus.tolist()
                assert_close(log_s[0, k, t].exp(), p[above < 0.7].sum(), rtol=0, atol=2e-5)
                checked += 1
                truncated += int(len(nucleus) < probs.shape[-1])
    assert checked >= 8 and truncated >= 4  # top-p truncated real distributions here
    torch.manual_seed(7)
    plain = hf_generate(eng.model, tok, ids, mask, num_samples=4, max_new_tokens=6, temperature=0.7, top_p=0.7)
    assert torch.equal(plain[0], gen.response_ids) and torch.equal(plain[2], gen.logp_behav) and plain[3] is None


def test_the_rollout_batch_carries_the_kept_mass(tmp_path):
    """collect_rollout passes Generation.logp_kept_mass into the RolloutBatch unchanged (None with
    top_p 1), and keep_informative's row selection keeps it aligned with the other tensors."""
    from conftest import DigitTask
    from reclight.rollout.queue import keep_informative
    from reclight.rollout.scoring import collect_rollout

    model, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=3)))
    task = DigitTask()
    examples = list(task.examples("train"))[:3]
    for top_p in (1.0, 0.7):
        eng = HFGenerateEngine(model, tok, SamplingConfig(num_samples=2, max_new_tokens=4, top_p=top_p))
        batch = collect_rollout(eng, tok, task, examples, [0, 1, 2], step=0, seed=1)
        if top_p == 1.0:
            assert batch.logp_kept_mass is None
            continue
        assert batch.logp_kept_mass.shape == batch.logp_behav.shape
        kept = keep_informative(batch, 2)
        rows = [int(i) for i in kept.example_index]
        assert torch.equal(kept.logp_kept_mass, batch.logp_kept_mass[rows])
