"""Chunked log-probabilities (reclight.kernels.logprobs) against the naive path and closed forms.

Tolerances: fp32 comparisons use rtol = atol = 1e-5 (the issue's exactness bar); data are
scaled like a real LM head (logits of order 1-5), so fp32 rounding is ~1e-6 there.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from reclight.kernels.logprobs import (
    causal_lm_hidden_and_head,
    causal_lm_token_logprobs,
    token_logprobs,
    token_logprobs_naive,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(n=37, h=24, v=211, seed=0, dtype=torch.float64, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=dtype) * 2.0
    weight = torch.randn(v, h, generator=gen, dtype=dtype) * h**-0.5
    b = torch.randn(v, generator=gen, dtype=dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    g_logp = torch.randn(n, generator=gen, dtype=dtype)  # dL/dlogp, e.g. advantages
    g_ent = torch.randn(n, generator=gen, dtype=dtype)  # dL/dentropy
    return hidden, weight, b, targets, g_logp, g_ent


def _values_and_grads(fn, hidden, weight, bias, targets, g_logp, g_ent, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    logp, ent = fn(leaves[0], leaves[1], targets, bias=leaves[2] if bias is not None else None,
                   return_entropy=True, **kw)
    loss = (logp * g_logp).sum() + (ent * g_ent).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (logp.detach(), ent.detach(), *grads)


@pytest.mark.parametrize("chunk_size", [0, 1, 5, 16, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_matches_naive_fp32(chunk_size, temperature, with_bias):
    """logp, entropy and dL/d(hidden, weight, bias) for L = sum g_i logp_i + e_i ent_i agree with
    the full-logits path; chunk sizes include 5 and 16, which do not divide N = 37."""
    hidden, weight, bias, targets, g_logp, g_ent = _inputs(dtype=torch.float32, bias=with_bias)
    kw = dict(temperature=temperature, chunk_size=chunk_size)
    got = _values_and_grads(token_logprobs, hidden, weight, bias, targets, g_logp, g_ent, **kw)
    ref = _values_and_grads(token_logprobs_naive, hidden, weight, bias, targets, g_logp, g_ent,
                            **kw)
    assert len(got) == (5 if with_bias else 4)
    for name, a, b in zip(["logp", "entropy", "hidden", "weight", "bias"], got, ref):
        assert a.dtype == b.dtype == torch.float32, name
        assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    # Not vacuous: the logp gradient and the entropy gradient are both present and large.
    assert got[2].abs().max() > 0.1 and got[3].abs().max() > 0.1


def test_chunked_matches_float64_truth():
    """fp32 chunked is as close to the float64 answer as fp32 naive is (both ~1e-6)."""
    hidden, weight, bias, targets, g_logp, g_ent = _inputs(n=50, v=503)
    truth = _values_and_grads(token_logprobs_naive, hidden, weight, bias, targets, g_logp, g_ent)
    f32 = [t.float() for t in (hidden, weight, bias, g_logp, g_ent)]
    got = _values_and_grads(token_logprobs, f32[0], f32[1], f32[2], targets, f32[3], f32[4],
                            chunk_size=7)
    for a, b in zip(got, truth):
        assert_close(a.double(), b, **TOL)


def test_gradcheck_float64():
    """Finite differences vs the analytic backward, both outputs, with bias and T != 1."""
    hidden, weight, bias, targets, _, _ = _inputs(n=5, h=4, v=7, seed=1)
    args = [t.requires_grad_() for t in (hidden, weight, bias)]

    def fn(h, w, b):
        return token_logprobs(h, w, targets, bias=b, temperature=0.7, chunk_size=2,
                              return_entropy=True)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_uniform_logits_closed_form():
    """W = 0, b = 0: p is uniform over V, so logp = -log V, entropy = log V and
    dlogp_i/db = (onehot(y_i) - 1/V) / T exactly; dlogp/dhidden = W^T(...) = 0."""
    n, h, v, temperature = 3, 4, 10, 0.5
    hidden = torch.randn(n, h, dtype=torch.float32, requires_grad=True)
    weight = torch.zeros(v, h, dtype=torch.float32, requires_grad=True)
    bias = torch.zeros(v, dtype=torch.float32, requires_grad=True)
    targets = torch.tensor([0, 3, 3])
    logp, ent = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                               chunk_size=2, return_entropy=True)
    assert_close(logp, torch.full((n,), -math.log(v), dtype=torch.float32), rtol=0, atol=1e-6)
    assert_close(ent, torch.full((n,), math.log(v), dtype=torch.float32), rtol=0, atol=1e-6)
    logp.sum().backward()
    expected_db = (torch.bincount(targets, minlength=v).float() - n / v) / temperature
    assert_close(bias.grad, expected_db, rtol=1e-6, atol=1e-6)
    assert_close(hidden.grad, torch.zeros(n, h, dtype=torch.float32), rtol=0, atol=0)
    # dlogp_i/dW = (onehot(y_i) - 1/V) h_i^T / T
    onehot = torch.nn.functional.one_hot(targets, v).float()
    assert_close(weight.grad, (onehot - 1 / v).t() @ hidden.detach() / temperature,
                 rtol=1e-6, atol=1e-6)


def test_two_token_closed_form():
    """V = 2, H = 1, W = [[1], [0]], h = x: logp(y=0) = x - log(1 + e^x) = log sigmoid(x),
    entropy = binary entropy of sigmoid(x), and dlogp/dx = 1 - sigmoid(x)."""
    x = torch.tensor([[-1.5], [0.0], [2.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    logp, ent = token_logprobs(x, weight, torch.zeros(3, dtype=torch.long), chunk_size=1,
                               return_entropy=True)
    s = torch.sigmoid(x.detach().squeeze(1))
    assert_close(logp.double(), torch.log(s), rtol=1e-6, atol=1e-6)
    assert_close(ent.double(), -(s * s.log() + (1 - s) * (1 - s).log()), rtol=1e-6, atol=1e-6)
    logp.sum().backward()
    assert_close(x.grad.squeeze(1), 1 - s, rtol=1e-6, atol=1e-6)


def test_single_token():
    hidden, weight, bias, targets, g_logp, g_ent = _inputs(n=1, dtype=torch.float32)
    got = _values_and_grads(token_logprobs, hidden, weight, bias, targets, g_logp, g_ent)
    ref = _values_and_grads(token_logprobs_naive, hidden, weight, bias, targets, g_logp, g_ent)
    assert got[0].shape == (1,)
    for a, b in zip(got, ref):
        assert_close(a, b, **TOL)


def test_no_tokens():
    """N = 0 (a batch whose responses are all masked out): empty logp, zero gradients."""
    hidden, weight, bias, _, _, _ = _inputs(n=0, dtype=torch.float32)
    weight.requires_grad_()
    logp = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), bias=bias)
    assert logp.shape == (0,)
    logp.sum().backward()
    assert_close(weight.grad, torch.zeros_like(weight), rtol=0, atol=0)


def test_tied_embeddings_gradient():
    """The LM head is the embedding matrix E: h_i = tanh(E[x_i] A), weight = E. dL/dE gathers
    the head term and the embedding term; chunked and naive must agree on the sum."""
    gen = torch.Generator().manual_seed(3)
    v, h, n = 97, 16, 29
    emb0 = torch.randn(v, h, generator=gen) * h**-0.5
    mix = torch.randn(h, h, generator=gen)
    inputs = torch.randint(0, v, (n,), generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    adv = torch.randn(n, generator=gen)
    grads = []
    for fn in (token_logprobs, token_logprobs_naive):
        emb = emb0.clone().requires_grad_()
        hidden = torch.tanh(emb[inputs] @ mix)
        logp = fn(hidden, emb, targets, chunk_size=8)
        (logp * adv).sum().backward()
        grads.append(emb.grad)
    assert_close(grads[0], grads[1], **TOL)
    assert grads[0][inputs].abs().sum() > 0  # the embedding path did contribute


def test_frozen_weight_and_frozen_hidden():
    hidden, weight, bias, targets, g_logp, _ = _inputs(dtype=torch.float32)
    # Head frozen (e.g. LoRA): only hidden gets a gradient.
    h1 = hidden.clone().requires_grad_()
    w1 = weight.clone()
    (token_logprobs(h1, w1, targets, bias=bias, chunk_size=8) * g_logp).sum().backward()
    h2 = hidden.clone().requires_grad_()
    (token_logprobs_naive(h2, weight, targets, bias=bias) * g_logp).sum().backward()
    assert w1.grad is None
    assert_close(h1.grad, h2.grad, **TOL)
    # Hidden frozen: only weight and bias get gradients.
    w3, b3 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    (token_logprobs(hidden, w3, targets, bias=b3, chunk_size=8) * g_logp).sum().backward()
    w4, b4 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    (token_logprobs_naive(hidden, w4, targets, bias=b4) * g_logp).sum().backward()
    assert_close(w3.grad, w4.grad, **TOL)
    assert_close(b3.grad, b4.grad, **TOL)


def test_entropy_unused_and_no_grad():
    """Entropy returned but not in the loss gives the logp-only gradient; under no_grad the
    values are unchanged and no graph is built."""
    hidden, weight, bias, targets, g_logp, _ = _inputs(dtype=torch.float32)
    h1 = hidden.clone().requires_grad_()
    logp, ent = token_logprobs(h1, weight, targets, chunk_size=10, return_entropy=True)
    (logp * g_logp).sum().backward()
    h2 = hidden.clone().requires_grad_()
    (token_logprobs_naive(h2, weight, targets) * g_logp).sum().backward()
    assert_close(h1.grad, h2.grad, **TOL)
    with torch.no_grad():
        logp_ng = token_logprobs(hidden.requires_grad_(), weight, targets, chunk_size=10)
    assert not logp_ng.requires_grad
    assert_close(logp_ng, logp.detach(), rtol=0, atol=0)


def test_bfloat16_inputs():
    """bf16 hidden/weight: logits are upcast to fp32 in both paths, so logp matches the naive
    fp32 values to 1e-5, and gradients come back in bf16, equal to the naive path's bf16
    gradients up to one bf16 rounding step (rtol = 2^-7)."""
    hidden, weight, bias, targets, g_logp, g_ent = _inputs(dtype=torch.float32)
    hb, wb, bb = (t.bfloat16() for t in (hidden, weight, bias))
    got = _values_and_grads(token_logprobs, hb, wb, bb, targets, g_logp, g_ent, chunk_size=10)
    ref = _values_and_grads(token_logprobs_naive, hb, wb, bb, targets, g_logp, g_ent)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert [g.dtype for g in got[2:]] == [torch.bfloat16] * 3
    assert_close(got[0], ref[0], **TOL)
    assert_close(got[1], ref[1], **TOL)
    for a, b in zip(got[2:], ref[2:]):
        assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-5)


def test_bad_inputs_name_the_field():
    hidden, weight, _, targets, _, _ = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="targets must be"):
        token_logprobs(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="weight must be"):
        token_logprobs(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(hidden, weight, targets, temperature=0.0)


# --- Hugging Face helper -------------------------------------------------------------------


def _tiny_llama(tie: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _batch():
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 100, (3, 11), generator=gen)
    attention_mask = torch.ones(3, 11, dtype=torch.long)
    attention_mask[1, 8:] = 0  # right padding
    attention_mask[2, 5:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("tie", [False, True])
def test_causal_lm_helper_matches_model_logits(tie):
    """hidden @ W^T == model(...).logits, and the chunked per-token logp (and its gradient wrt
    every model parameter) equals log_softmax(model(...).logits) gathered at the next token."""
    model = _tiny_llama(tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    input_ids, attention_mask = _batch()
    target_mask = attention_mask[:, 1:].bool()
    adv = torch.randn(3, 10, generator=torch.Generator().manual_seed(6))

    hidden, weight, bias = causal_lm_hidden_and_head(model, input_ids, attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert hidden.shape == (3, 11, 32) and bias is None and weight is model.lm_head.weight
    assert_close(hidden @ weight.t(), logits, rtol=1e-5, atol=1e-5)

    ref = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, input_ids[:, 1:, None])[..., 0]
    ref = ref * target_mask
    (ref * adv).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logp = causal_lm_token_logprobs(model, input_ids, attention_mask, target_mask=target_mask,
                                    chunk_size=4)
    assert logp.shape == (3, 10)
    assert_close(logp, ref.detach(), **TOL)
    assert (logp[~target_mask] == 0).all()
    (logp * adv).sum().backward()
    for k, p in model.named_parameters():
        assert_close(p.grad, ref_grads[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


def test_causal_lm_helper_fallback_without_backbone(monkeypatch):
    """A model whose get_decoder() is itself goes through output_hidden_states; same hidden."""
    model = _tiny_llama(False)
    input_ids, attention_mask = _batch()
    expected, _, _ = causal_lm_hidden_and_head(model, input_ids, attention_mask)
    monkeypatch.setattr(model, "get_decoder", lambda: model)
    hidden, weight, _ = causal_lm_hidden_and_head(model, input_ids, attention_mask)
    assert weight is model.lm_head.weight
    assert_close(hidden, expected, rtol=0, atol=0)
