"""Length-bucketed log-probs (reclight.policy.response_logprobs) equal the one-batch values."""

import torch
from torch.testing import assert_close

import reclight.policy as policy
from reclight.policy import encode_prompts, load_causal_lm, response_logprobs
from reclight.tiny import build_tiny
from test_module_fixtures import MICRO


def test_buckets_split_by_length_and_skip_when_saving_is_small():
    lengths = torch.tensor([1, 8, 2, 8, 1, 7, 2, 8])
    mask = torch.arange(8)[None, :] < lengths[:, None]  # [8, 8]
    buckets = policy._length_buckets(mask)
    assert [sorted(r.tolist()) for r, _ in buckets] == [[0, 4], [2, 6], [1, 5], [3, 7]]
    assert [n for _, n in buckets] == [1, 2, 8, 8]  # 2*1 + 2*2 + 4*8 = 38 of 64 positions
    full = torch.ones(8, 8, dtype=torch.bool)
    assert len(policy._length_buckets(full)) == 1  # nothing to save


def test_bucketed_logp_entropy_and_grads_equal_one_batch(tmp_path, monkeypatch):
    model, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=3)))
    ids, pmask = encode_prompts(tok, ["1+2=", "123+45=", "9=", "77+8="])
    g = torch.Generator().manual_seed(0)
    resp = torch.randint(4, 60, (4, 3, 9), generator=g)
    lengths = torch.randint(1, 10, (4, 3), generator=g)
    rmask = torch.arange(9) < lengths[..., None]

    def run():
        model.zero_grad()
        logp, ent = response_logprobs(model, ids, pmask, resp, rmask, temperature=0.8, return_entropy=True)
        (logp.sum() + 0.3 * ent.sum()).backward()
        return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    assert len(policy._length_buckets(rmask.reshape(12, 9))) > 1  # the bucketed path is taken
    logp_b, ent_b, grads_b = run()
    monkeypatch.setattr(policy, "_length_buckets", lambda mask: [(torch.arange(mask.shape[0]), mask.shape[1])])
    logp_1, ent_1, grads_1 = run()
    assert_close(logp_b, logp_1, rtol=0, atol=1e-5)
    assert_close(ent_b, ent_1, rtol=0, atol=1e-5)
    assert (logp_b[~rmask] == 0).all() and (logp_b[rmask] < 0).all()
    for n in grads_1:
        assert_close(grads_b[n], grads_1[n], rtol=1e-4, atol=1e-6, msg=n)
