"""The lean Llama sampling engine: same distribution as the trainer's policy, masks, weights, bf16."""

import pytest
import torch
from torch.testing import assert_close

from reclight.engines.fast import FastLlamaEngine
from reclight.models.forward import response_logprobs
from reclight.models.loading import load_causal_lm
from reclight.models.tokens import encode_prompts
from reclight.engines.base import SamplingConfig
from reclight.models.tiny import build_tiny, build_tokenizer
from conftest import MICRO

PROMPTS = ["1+2=", "123+45=", "9=", "77+8="]  # different lengths -> left padding


def _setup(tmp_path, temperature=0.7, dtype=None, max_new_tokens=6):
    model, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=3)))
    sampling = SamplingConfig(num_samples=3, max_new_tokens=max_new_tokens, temperature=temperature)
    return model, tok, FastLlamaEngine(model, tok, sampling, dtype)


def test_logp_behav_equals_policy_logp_with_left_padding(tmp_path):
    """Same weights and temperature: the engine's sampling-time log-probs (fused weights, shared
    prefill, preallocated cache) equal the trainer's full-sequence log-probs in fp32."""
    model, tok, eng = _setup(tmp_path)
    ids, mask = encode_prompts(tok, PROMPTS)
    gen = eng.generate(ids, mask, seed=11)
    assert gen.response_ids.shape[:2] == (4, 3) and gen.response_mask.sum() > 12
    logp, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask, temperature=0.7)
    assert_close(logp, gen.logp_behav, rtol=0, atol=1e-5)
    assert (gen.logp_behav[~gen.response_mask] == 0).all() and gen.version.eq(0).all()


def test_gqa_and_biases_match_hf(tmp_path):
    """Grouped-query attention (2 query heads per KV head) and projection biases: still equal."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    eng = FastLlamaEngine(model, tok, SamplingConfig(num_samples=2, max_new_tokens=5, temperature=1.3))
    ids, mask = encode_prompts(tok, PROMPTS)
    gen = eng.generate(ids, mask, seed=2)
    logp, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask, temperature=1.3)
    assert_close(logp, gen.logp_behav, rtol=0, atol=1e-5)


def _force_eos_after_first_token(eng, eos_id, rows):
    """From the second token on, ``rows`` (a bool [N] mask) emit EOS with probability 1 and the
    other rows never do."""
    orig, calls = eng._logprobs, [0]

    def patched(hidden):
        lp = orig(hidden)
        calls[0] += 1
        if calls[0] > 1:  # call 1 is the prefill (B rows); later calls are decoding steps (N rows)
            forced = torch.full_like(lp, float("-inf"))
            forced[:, eos_id] = 0.0
            lp = torch.where(rows[:, None], forced, lp.index_fill(-1, torch.tensor([eos_id]), float("-inf")))
        return lp

    eng._logprobs = patched


def test_masks_cover_up_to_eos_then_padding(tmp_path):
    """Even rows end with EOS as their 2nd token, odd rows never: masks are exactly [1, 1, 0...]
    and [1] * T, padding follows EOS, logp is 0 off-mask and decoding runs all T steps."""
    model, tok, eng = _setup(tmp_path, temperature=1.0, max_new_tokens=6)
    ids, mask = encode_prompts(tok, PROMPTS)
    rows = torch.arange(len(PROMPTS) * 3) % 2 == 0
    eng.compact_below = 0.0  # the patch below indexes rows of the full batch: no compaction here
    _force_eos_after_first_token(eng, tok.eos_token_id, rows)
    gen = eng.generate(ids, mask, seed=0)
    T = gen.response_ids.shape[-1]
    assert T == 6
    ids_f, mask_f = gen.response_ids.reshape(-1, T), gen.response_mask.reshape(-1, T)
    assert mask_f[rows].sum(-1).eq(2).all() and mask_f[~rows].sum(-1).eq(6).all()
    assert ids_f[rows, 1].eq(tok.eos_token_id).all() and ids_f[rows, 2:].eq(tok.pad_token_id).all()
    assert not ids_f[~rows].eq(tok.eos_token_id).any()
    logp_f = gen.logp_behav.reshape(-1, T)
    assert (logp_f[~mask_f] == 0).all() and logp_f[rows, 1].eq(0).all()  # forced EOS: probability 1
    assert logp_f[~rows].lt(0).all() and logp_f[rows, 0].lt(0).all()


def test_short_rollouts_attend_over_a_padded_cache_with_the_same_samples(tmp_path):
    """A cache shorter than ``min_cache_slots`` is padded with masked slots (torch's CPU bmm runs
    products under 400 multiply-adds per item in a slow element loop): the same tokens and the
    same log-probs up to rounding as the unpadded cache, which the engine really allocated."""
    from reclight.engines.fast import min_cache_slots

    assert [min_cache_slots(d) for d in (8, 32, 64, 128)] == [50, 13, 7, 4]
    assert 12 * 32 < 400 <= 13 * 32  # 13 slots of head size 32 clear the threshold, 12 do not
    model, tok, padded = _setup(tmp_path, temperature=1.0, max_new_tokens=4)
    plain = FastLlamaEngine(model, tok, padded.sampling)
    plain.min_slots = 0
    shapes = {}
    for name, eng in (("padded", padded), ("plain", plain)):
        cache = eng._cache
        eng._cache = lambda shape, cache=cache, name=name: shapes.setdefault(name, shape) and cache(shape)
    ids, mask = encode_prompts(tok, PROMPTS)
    for seed in range(5):
        a, b = padded.generate(ids, mask, seed=seed), plain.generate(ids, mask, seed=seed)
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
        assert_close(a.logp_behav, b.logp_behav, rtol=0, atol=1e-6)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert shapes["plain"][2] == ids.shape[1] + 4 < min_cache_slots(head_dim) == shapes["padded"][2]
    logp, _ = response_logprobs(model, ids, mask, a.response_ids, a.response_mask)
    assert_close(logp, a.logp_behav, rtol=0, atol=1e-5)


def test_each_decoding_step_attends_over_the_written_slots_only(tmp_path):
    """Step t of a rollout attends over the prompt's P slots and the t + 1 response slots written
    so far (at least ``min_slots``), not the whole cache: the same log-probs as the trainer's."""
    from reclight.models.tiny import TinyModelConfig

    head32 = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=64, max_positions=32)
    model, tok = load_causal_lm(str(build_tiny(tmp_path, head32, seed=3)))
    eng = FastLlamaEngine(model, tok, SamplingConfig(num_samples=3, max_new_tokens=16, temperature=1.0))
    eng.compact_below = 0.0  # finished rows stay in the batch: every row attends at every step
    lengths = []
    attend = eng._attend
    eng._attend = lambda q, k, v, bias: lengths.append((k.shape[2], v.shape[2], bias.shape[-1])) or attend(q, k, v, bias)
    ids, mask = encode_prompts(tok, PROMPTS)
    gen = eng.generate(ids, mask, seed=0)
    P, T, layers = ids.shape[1], gen.response_ids.shape[-1], model.config.num_hidden_layers
    assert P + 2 < eng.min_slots < P + T  # both the padded start and the sliced end are exercised
    expected = [P] * layers + [max(P + t + 1, eng.min_slots) for t in range(T - 1) for _ in range(layers)]
    assert [n for n, _, _ in lengths] == expected and all(a == b == c for a, b, c in lengths)
    logp, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask)
    assert_close(logp, gen.logp_behav, rtol=0, atol=1e-5)


def test_decoding_stops_when_every_sequence_ended(tmp_path):
    model, tok, eng = _setup(tmp_path, temperature=1.0, max_new_tokens=6)
    ids, mask = encode_prompts(tok, PROMPTS)
    _force_eos_after_first_token(eng, tok.eos_token_id, torch.ones(len(PROMPTS) * 3, dtype=torch.bool))
    gen = eng.generate(ids, mask, seed=0)
    assert gen.response_ids.shape == (4, 3, 2) and gen.response_mask.all()


def test_finished_sequences_dropped_from_batch_keep_exact_logp(tmp_path):
    """With 30 of the 104 token ids counting as EOS, sequences end at many different steps and
    the batch is compacted several times: the response masks still end at each row's first EOS
    and every logp_behav still equals the trainer's logp of that token."""
    from types import SimpleNamespace

    model, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=3)))
    many_eos = SimpleNamespace(eos_token_id=list(range(10, 40)), pad_token_id=tok.pad_token_id)
    eng = FastLlamaEngine(model, many_eos, SamplingConfig(num_samples=4, max_new_tokens=8, temperature=1.0))
    calls = []
    orig_forward = eng._forward
    eng._forward = lambda ids, *a: calls.append(ids.shape[0]) or orig_forward(ids, *a)
    ids, mask = encode_prompts(tok, PROMPTS)
    gen = eng.generate(ids, mask, seed=0)
    assert len(set(calls[1:])) >= 3  # decoding batch sizes shrank at least twice (calls[0]: prefill)
    T = gen.response_ids.shape[-1]
    is_eos = (gen.response_ids >= 10) & (gen.response_ids < 40)
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, T)
    assert torch.equal(gen.response_mask.sum(-1), first) and first.min() < first.max()
    logp, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask, temperature=1.0)
    assert_close(logp, gen.logp_behav, rtol=0, atol=1e-5)


def test_seeded_and_update_weights_in_place(tmp_path):
    model, tok, eng = _setup(tmp_path, temperature=1.0)
    ids, mask = encode_prompts(tok, PROMPTS)
    a, b, c = eng.generate(ids, mask, seed=1), eng.generate(ids, mask, seed=1), eng.generate(ids, mask, seed=2)
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    ptrs = {n: t.data_ptr() for n, t in eng.weights.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eng.update_weights(model, version=7)
    assert eng.version == 7 and {n: t.data_ptr() for n, t in eng.weights.items()} == ptrs
    gen = eng.generate(ids, mask, seed=1)
    logp, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask, temperature=1.0)
    assert_close(logp, gen.logp_behav, rtol=0, atol=1e-5)
    assert gen.version.eq(7).all()
    state = eng.state_dict()
    _, _, other = _setup(tmp_path, temperature=1.0)
    other.load_state_dict(state)
    assert other.version == 7 and torch.equal(other.generate(ids, mask, seed=1).response_ids, gen.response_ids)


def test_bf16_weights_close_to_fp32_policy(tmp_path):
    """bf16 engine weights (fp32 master weights in the trainer): logp_behav is the bf16 policy's,
    within bf16 rounding of the fp32 policy's (mean |diff| < 0.02 nats, max < 0.1)."""
    model, tok, eng = _setup(tmp_path, temperature=1.0, dtype="bfloat16")
    assert eng.weights["0.wqkv"].dtype == torch.bfloat16
    ids, mask = encode_prompts(tok, PROMPTS)
    gen = eng.generate(ids, mask, seed=4)
    logp, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask, temperature=1.0)
    diff = (logp - gen.logp_behav)[gen.response_mask].abs()
    assert diff.mean() < 0.02 and diff.max() < 0.1
    assert gen.logp_behav.dtype == torch.float32


@pytest.mark.parametrize(("field", "kwargs"), [("top_p", {"top_p": 0.9})])
def test_unsupported_settings_raise_naming_the_field(tmp_path, field, kwargs):
    model, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=3)))
    with pytest.raises(ValueError, match=field):
        FastLlamaEngine(model, tok, SamplingConfig(num_samples=2, **kwargs))
    with pytest.raises(ValueError, match="stop_strings"):
        FastLlamaEngine(model, tok, SamplingConfig(num_samples=2), stop_strings=("\n",))


@pytest.mark.parametrize("perf", ["fast_engine", pytest.param("compiled", marks=pytest.mark.compile)])
def test_fit_with_fast_engine_and_bf16_trains_fp32_master_weights(tmp_path, monkeypatch, perf):
    """configs/perf/{bf16,fast_engine}.yaml (or bf16 + compiled.yaml: the same with the decoding
    step and the training forward's element-wise chains compiled) through the real CLI: 2 steps
    run, the engine holds bf16 weights synced from the trainer, the trained weights stay fp32 and
    all of them moved."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from reclight.trainer.cli import main

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(root / "configs/smoke_test.yaml"), "--config", str(root / "configs/perf/bf16.yaml"),
                "--config", str(root / f"configs/perf/{perf}.yaml"), "--model.policy.tiny_dir", str(tmp_path / "tiny"),
                "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--data.task", "conftest.DigitTask"])
    assert cli.trainer.global_step == 2 and cli.trainer.precision == "bf16-mixed"
    eng = cli.model.rollouts.engine
    assert isinstance(eng, FastLlamaEngine) and eng.weights["0.wqkv"].dtype == torch.bfloat16 and eng.version == 1
    assert (eng._compiled_step is not None) == (perf == "compiled")
    forward = cli.model.forward_cfg  # fast_engine.yaml leaves impl at auto: fused for the tiny Llama
    assert (forward.impl, cli.model.forward_impl, forward.compile) == (
        ("fused", "fused", True) if perf == "compiled" else ("auto", "fused", False))
    init = dict(AutoModelForCausalLM.from_pretrained(next((tmp_path / "tiny").iterdir())).named_parameters())
    for name, p in cli.model.policy.named_parameters():
        assert p.dtype == torch.float32 and not torch.equal(p, init[name]), name


@pytest.mark.parametrize("tied", [False, True])
def test_engines_update_from_a_full_state_dict(tmp_path, tied):
    """Under FSDP the engines are synced from the gathered full state dict (HF names), not from
    the module: both engines end up with exactly the weights of the module path, with tied or
    untied embeddings (a state dict may omit ``lm_head.weight`` when it is tied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from reclight.engines.hf import HFGenerateEngine

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    sampling = SamplingConfig(num_samples=2, max_new_tokens=4)
    fast, hf = FastLlamaEngine(model, tok, sampling), HFGenerateEngine(model, tok, sampling)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    fast.update_weights(state, version=3)
    hf.update_weights(state, version=3)
    ref_fast = FastLlamaEngine(model, tok, sampling)  # built from the module after the change
    for name, t in ref_fast.weights.items():
        assert torch.equal(fast.weights[name], t), name
    for name, p in model.named_parameters():
        assert torch.equal(dict(hf.model.named_parameters())[name], p), name
    assert fast.version == hf.version == 3


def test_sampler_draws_the_softmax_distribution():
    """Inverse-CDF sampling: over 40,000 draws every token's frequency is within 4 standard
    errors of its probability, tokens of probability 0 (logp -inf) are never drawn, including
    the first and the last entry, and a one-hot distribution always gives its token."""
    logits = torch.tensor([float("-inf"), 2.0, 0.5, float("-inf"), -1.0, 1.0, 0.0, float("-inf")])
    probs = torch.softmax(logits, -1)
    n = 40_000
    logp = torch.log_softmax(logits, -1).expand(n, -1).contiguous()
    tok = FastLlamaEngine._sample(logp, torch.Generator().manual_seed(0), logits.numel())
    freq = torch.bincount(tok, minlength=logits.numel()).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 4 * se + 1e-12).all(), (freq, probs)
    assert freq[probs == 0].eq(0).all()
    onehot = torch.full((5, 8), float("-inf"))
    onehot[:, 7] = 0.0
    assert FastLlamaEngine._sample(onehot, torch.Generator().manual_seed(1), 8).eq(7).all()


@pytest.mark.compile
def test_compiled_decoding_step_keeps_exact_logp_through_compaction(tmp_path):
    """``compile_decode``: the decoding step through torch.compile. In fp32 the recorded
    logp_behav still equals the trainer's logp of the sampled tokens (1e-5), across rollouts of
    different prompt lengths and with the batch compacted several times (the shapes the compiled
    step must follow dynamically)."""
    from types import SimpleNamespace

    model, tok = load_causal_lm(str(build_tiny(tmp_path, MICRO, seed=3)))
    many_eos = SimpleNamespace(eos_token_id=list(range(10, 40)), pad_token_id=tok.pad_token_id)
    eng = FastLlamaEngine(model, many_eos, SamplingConfig(num_samples=4, max_new_tokens=8, temperature=1.0),
                          compile_decode=True)
    for prompts in (PROMPTS, ["12+3=", "4="], PROMPTS[::-1]):
        ids, mask = encode_prompts(tok, prompts)
        gen = eng.generate(ids, mask, seed=len(prompts))
        assert gen.response_mask.sum(-1).min() < gen.response_mask.sum(-1).max()  # rows ended at different steps
        logp, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask, temperature=1.0)
        assert_close(logp, gen.logp_behav, rtol=0, atol=1e-5)
    assert eng._compiled_step is not None


def test_engine_options_validated_per_engine():
    from reclight.engines.config import EngineConfig, FastEngineOptions

    assert EngineConfig(name="fast", fast=FastEngineOptions(compile_decode=True)).compiles  # accepted
    with pytest.raises(ValueError, match=r"model.engine.fast.compile_decode=True is not valid; accepted: only with "
                                         r"model.engine.name: fast \(this run's engine is 'hf'\)"):
        EngineConfig(name="hf", fast=FastEngineOptions(compile_decode=True))
    with pytest.raises(ValueError, match=r"model.engine.fast.compile_decode='yes' is not valid; accepted: true or false"):
        FastEngineOptions(compile_decode="yes")


def test_pieces_are_each_prompt_group_decoded_from_its_own_seed_and_threads_change_no_bit(tmp_path):
    """``micro_batch_size=2``: prompts 0-1 and 2-3 are decoded as two rollouts of their own, seeded
    ``piece_seed(seed, 0)`` and ``piece_seed(seed, 1)``: each piece's tokens, masks and log-probs are
    those of the engine without pieces called on that piece's prompts with that seed (the pieces
    padded to the longest one's length). Side by side on 2 threads (one intra-op thread each): the
    same bits. The recorded log-probs still equal the trainer's (1e-5, as above)."""
    from reclight.engines.fast import piece_seed

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok, whole = _setup(tmp_path, temperature=1.0)
        sampling = whole.sampling
        ids, mask = encode_prompts(tok, PROMPTS)
        in_turn = FastLlamaEngine(model, tok, sampling, micro_batch_size=2)
        threaded = FastLlamaEngine(model, tok, sampling, micro_batch_size=2, threads=2)
        a, b = in_turn.generate(ids, mask, seed=5), threaded.generate(ids, mask, seed=5)
        threaded.close()
        parts = [whole.generate(ids[rows], mask[rows], seed=piece_seed(5, i))
                 for i, rows in enumerate((slice(0, 2), slice(2, 4)))]
    finally:
        torch.set_num_threads(before)
    for x, y in ((a.response_ids, b.response_ids), (a.response_mask, b.response_mask), (a.logp_behav, b.logp_behav)):
        assert torch.equal(x, y)
    T = a.response_ids.shape[-1]
    for part, rows in zip(parts, (slice(0, 2), slice(2, 4))):
        t = part.response_ids.shape[-1]
        assert t <= T and torch.equal(a.response_ids[rows, :, :t], part.response_ids)
        assert torch.equal(a.response_mask[rows, :, :t], part.response_mask)
        assert torch.equal(a.logp_behav[rows, :, :t], part.logp_behav)
        assert not a.response_mask[rows, :, t:].any() and (a.response_ids[rows, :, t:] == whole.pad_id).all()
    assert piece_seed(5, 0) != piece_seed(5, 1) != piece_seed(6, 0)
    logp, _ = response_logprobs(model, ids, mask, a.response_ids, a.response_mask, temperature=1.0)
    assert_close(logp, a.logp_behav, rtol=0, atol=1e-5)


def test_engine_threads_are_refused_without_pieces_or_with_compiled_decoding():
    from reclight.engines.config import FastEngineOptions

    with pytest.raises(ValueError, match=r"model.engine.fast.threads=2 is not valid; accepted: 1 while "
                                         r"model.engine.fast.micro_batch_size is null"):
        FastEngineOptions(threads=2)
    with pytest.raises(ValueError, match=r"model.engine.fast.threads=2 is not valid; accepted: 1 with "
                                         r"model.engine.fast.compile_decode: true"):
        FastEngineOptions(threads=2, micro_batch_size=4, compile_decode=True)
    with pytest.raises(ValueError, match=r"model.engine.fast.micro_batch_size=0 is not valid"):
        FastEngineOptions(micro_batch_size=0)
