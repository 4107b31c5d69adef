"""The trainer's fused Llama forward (``train_forward.impl: fused``): the same log-probs, entropies and
parameter gradients as Hugging Face's own forward, for the shapes that make it different from it
(shared prompt prefix, left padding, packed response positions, grouped-query attention)."""

import pytest
import torch
from torch.testing import assert_close

from reclight.kernels.fused_forward import shared_prefix_hidden
from reclight.kernels.llama import llama_problems
from reclight.models.forward import response_logprobs
from reclight.models.tokens import encode_prompts
from reclight.models.tiny import build_tokenizer
from conftest import fit_micro

PROMPTS = ["1+2=", "123+45=", "9=", "77+8="]  # different lengths -> left padding


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
              tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kw)), tok


def _batch(tok, K=3, T=6, lengths=None, seed=0):
    """Left-padded prompts and right-padded responses with prefix masks of the given lengths."""
    ids, mask = encode_prompts(tok, PROMPTS)
    g = torch.Generator().manual_seed(seed)
    B = ids.shape[0]
    resp = torch.randint(3, len(tok), (B, K, T), generator=g)
    if lengths is None:
        lengths = torch.randint(1, T + 1, (B, K), generator=g)
        lengths[0, 0], lengths[1, 1] = T, 1  # one full-length and one single-token response
    rmask = torch.arange(T) < lengths[..., None]
    resp = resp.masked_fill(~rmask, tok.pad_token_id)
    return ids, mask, resp, rmask


def _forward_kwargs(forward):
    """"hf", "fused" or "fused_compiled" -> response_logprobs' impl / compile_pointwise."""
    return {"impl": "hf" if forward == "hf" else "fused", "compile_pointwise": forward == "fused_compiled"}


def _logp_and_grads(model, batch, forward, temperature):
    model.zero_grad(set_to_none=True)
    logp, ent = response_logprobs(model, *batch, temperature=temperature, return_entropy=True,
                                  **_forward_kwargs(forward))
    g = torch.Generator().manual_seed(1)
    a = torch.randn(logp.shape, generator=g)
    (a * logp).sum().add((0.3 * ent).sum()).backward()  # weights the tokens differently: catches mix-ups
    return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("overrides", [
    {},
    {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True},  # GQA + biases
    {"tie_word_embeddings": True},
], ids=["plain", "gqa_biases", "tied"])
def test_fused_matches_hf_logp_entropy_and_gradients_fp32(overrides):
    model, tok = _llama(**overrides)
    batch = _batch(tok)
    hf = _logp_and_grads(model, batch, "hf", 0.8)
    fused = _logp_and_grads(model, batch, "fused", 0.8)
    mask = batch[3]
    assert mask.sum() > 30 and hf[0][mask].abs().min() > 0  # real tokens, non-trivial log-probs
    assert_close(fused[0], hf[0], rtol=0, atol=1e-5)
    assert_close(fused[1], hf[1], rtol=0, atol=1e-5)
    for name, g in hf[2].items():
        assert g.abs().max() > 0, name  # every parameter gets a gradient, so the check means something
        assert_close(fused[2][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.compile
def test_compiled_pointwise_matches_hf_fp32():
    """``train_forward: {impl: fused, compile: true}`` (the element-wise chains through torch.compile): the same
    log-probs, entropies and gradients as HF's forward, to the same tolerances as ``fused``."""
    model, tok = _llama(num_key_value_heads=2, attention_bias=True)
    batch = _batch(tok)
    hf = _logp_and_grads(model, batch, "hf", 0.8)
    compiled = _logp_and_grads(model, batch, "fused_compiled", 0.8)
    assert_close(compiled[0], hf[0], rtol=0, atol=1e-5)
    assert_close(compiled[1], hf[1], rtol=0, atol=1e-5)
    for name, g in hf[2].items():
        assert_close(compiled[2][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_all_padding_or_single_token_responses():
    """T=1 (only the prompt's last position is used) and batches where every response has one
    token (nothing to pack): still equal to HF."""
    model, tok = _llama()
    for T in (1, 4):
        batch = _batch(tok, T=T, lengths=torch.ones(4, 3, dtype=torch.long))
        hf, fused = _logp_and_grads(model, batch, "hf", 1.0), _logp_and_grads(model, batch, "fused", 1.0)
        assert_close(fused[0], hf[0], rtol=0, atol=1e-5)
        for name, g in hf[2].items():
            assert_close(fused[2][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_hidden_is_zero_off_mask_and_batch_independent():
    """Off-mask positions hold 0; a sample's hidden states do not depend on the other samples
    (its K siblings share the prompt's keys/values, but nothing else)."""
    model, tok = _llama()
    ids, mask, resp, rmask = _batch(tok)
    with torch.no_grad():
        h = shared_prefix_hidden(model, ids, mask, resp, rmask)
        alone = shared_prefix_hidden(model, ids[2:3], mask[2:3], resp[2:3, 1:2], rmask[2:3, 1:2])
    assert (h[~rmask] == 0).all() and (h[rmask].abs().sum(-1) > 0).all()
    n = int(rmask[2, 1].sum())
    # Alone, prompt 2 has no left padding at all (shorter P): same positions, same values.
    assert_close(alone[0, 0, :n], h[2, 1, :n], rtol=0, atol=1e-5)


def test_bf16_autocast_close_to_hf_eager():
    """Under bf16 autocast the fused forward rounds like HF's eager attention (bf16 matmuls, fp32
    softmax): log-probs agree to bf16 precision."""
    model, tok = _llama()
    model.set_attn_implementation("eager")
    batch = _batch(tok)
    with torch.autocast("cpu", torch.bfloat16):
        hf, _ = response_logprobs(model, *batch, impl="hf")
        fused, _ = response_logprobs(model, *batch, impl="fused")
    assert_close(fused, hf, rtol=0, atol=3e-2)


@pytest.mark.parametrize("forward", ["fused", pytest.param("fused_compiled", marks=pytest.mark.compile)])
def test_bf16_autocast_gradients_as_accurate_as_hf_eager(forward):
    """Under bf16 autocast the fused forward hands q/k/v to attention in bf16 (the dtype its
    matmuls use anyway), so the gradients of the two prompt/response attention paths meet in
    bf16. Their error against the fp32 gradients must stay that of HF's own eager bf16 pass
    (within 1.5x of it), on a model wide enough for bf16 rounding to show (hidden 64, K=4)."""
    model, tok = _llama(hidden_size=64, intermediate_size=96, num_attention_heads=4)
    model.set_attn_implementation("eager")
    batch = _batch(tok, K=4, T=12)
    ref = _logp_and_grads(model, batch, "hf", 1.0)[2]  # fp32
    with torch.autocast("cpu", torch.bfloat16):
        hf = _logp_and_grads(model, batch, "hf", 1.0)[2]
        fused = _logp_and_grads(model, batch, forward, 1.0)[2]

    def rel_err(g):
        return float(sum((g[n] - ref[n]).norm() ** 2 for n in ref) ** 0.5 / sum(r.norm() ** 2 for r in ref.values()) ** 0.5)

    assert 1e-4 < rel_err(hf) < 0.05  # bf16 rounding is visible, and small
    assert rel_err(fused) <= 1.5 * rel_err(hf), (rel_err(fused), rel_err(hf))


def test_non_prefix_mask_and_bad_values_raise():
    model, tok = _llama()
    ids, mask, resp, rmask = _batch(tok)
    holed = rmask.clone()
    holed[0, 0, 2] = False  # a real token after a padding one
    with pytest.raises(ValueError, match="response_mask must be a prefix mask"):
        response_logprobs(model, ids, mask, resp, holed, impl="fused")
    with pytest.raises(ValueError, match="impl='cuda'.*accepted: 'hf', 'fused'"):
        response_logprobs(model, ids, mask, resp, rmask, impl="cuda")
    cfg = model.config
    cfg.model_type = "qwen2"  # a plain attribute copy is enough for the check
    assert llama_problems(cfg) == ["model_type='qwen2' (accepted: 'llama')"]


def test_module_options_validated():
    from reclight.trainer.config import TrainForwardConfig

    with pytest.raises(ValueError, match="model.train_forward.impl='fast' is not valid; accepted: auto, hf, fused"):
        TrainForwardConfig(impl="fast")
    with pytest.raises(ValueError, match="attn_implementation='flash' is not valid; accepted: None, eager, sdpa"):
        TrainForwardConfig(attn_implementation="flash")
    with pytest.raises(ValueError, match="model.train_forward.compile=True is not valid; accepted: true only with "
                                         "model.train_forward.impl: fused"):
        TrainForwardConfig(impl="hf", compile=True)


@pytest.mark.parametrize("compiled", [pytest.param(False, id="fused"),
                                      pytest.param(True, id="fused_compiled", marks=pytest.mark.compile)])
def test_trainer_step_same_gradients_as_hf_forward(tmp_path, compiled):
    """A whole trainer step (engine rollout, advantages, loss, backward) with ``train_forward:
    fused`` (or ``fused_compiled``) produces the same gradient of every parameter as with ``hf``
    (clipping off, so the raw gradients are compared). Weights after AdamW are not compared: Adam
    turns float-rounding differences of near-zero gradients into steps of +-lr."""
    from reclight.trainer.config import TrainForwardConfig

    hf, _ = fit_micro(tmp_path / "hf", 1, optim_kwargs=dict(grad_clip=0.0))
    forward = TrainForwardConfig(impl="fused", compile=compiled, attn_implementation="eager")
    fused, _ = fit_micro(tmp_path / "fused", 1, optim_kwargs=dict(grad_clip=0.0), train_forward=forward)
    assert fused.policy.config._attn_implementation == "eager"
    for (name, p), q in zip(hf.policy.named_parameters(), fused.policy.parameters()):
        assert p.grad.abs().max() > 0, name
        assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_forward_refused_under_fsdp(tmp_path):
    """Validated once when the model is configured: a sharded policy cannot use the fused forward."""
    from types import SimpleNamespace

    from conftest import micro_module
    from reclight.trainer.config import TrainForwardConfig

    module = micro_module(tmp_path, train_forward=TrainForwardConfig(impl="fused"))
    module._device_mesh = SimpleNamespace()  # what ModelParallelStrategy sets before configure_model
    with pytest.raises(ValueError, match=r"model.train_forward.impl='fused' is not valid; accepted: 'hf' or 'auto' here: the fused forward "
                                         r"does not support a sharded policy \(FSDP\)"):
        module.configure_model()


def test_fused_compiled_without_a_cpp_compiler_is_refused_naming_the_field(tmp_path, monkeypatch):
    """torch.compile on CPU needs a C++ compiler: without one the module refuses to configure,
    naming the field and what is accepted, instead of failing inside the first training step."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    from conftest import micro_module
    from reclight.trainer.config import TrainForwardConfig

    module = micro_module(tmp_path, train_forward=TrainForwardConfig(impl="fused", compile=True))
    # inductor's own patch context: monkeypatch.setattr on its config object deletes the field on undo,
    # which broke every later compile in the same process.
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}), pytest.raises(ValueError, match="model.train_forward.compile=true need\\(s\\) a C\\+\\+ compiler.*accepted without one: train_forward.compile false"):
        module.configure_model()
