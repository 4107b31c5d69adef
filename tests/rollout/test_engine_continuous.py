"""Continuous batching on the fast engine's weights: each token's logp_behav is the log-prob of
the weights that sampled it (checked against the trainer's HF forward of the whole prefix), a
group's tokens do not depend on what else is in flight, swaps mid-flight (re-prefilled or kept
cache), bitwise resume from a state dict, bf16, and the clock's protocol."""

import copy
import io
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from reclight.clock import AsyncClock, ClockConfig, PromptStream
from reclight.engines.base import SamplingConfig
from reclight.engines.continuous import ContinuousEngine, group_seed
from reclight.engines.fast import FastLlamaEngine
from reclight.models.forward import response_logprobs
from reclight.models.tiny import build_tokenizer

TOK = build_tokenizer()
MANY_EOS = SimpleNamespace(eos_token_id=list(range(10, 40)), pad_token_id=TOK.pad_token_id)  # ~30% of ids end
ONE_EOS = SimpleNamespace(eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
K, T, TEMP = 3, 6, 0.8


def _llama(seed, gqa=False, init=0.2):
    """A 2-layer Llama of hidden 16 whose weights are large enough (init std 0.2) for peaked
    next-token distributions, so that a change of weights changes log-probs by far more than 1e-4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1 if gqa else 2, attention_bias=gqa, mlp_bias=gqa,
                      initializer_range=init, pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _engine(model, tokenizer=MANY_EOS, max_groups=5, seed=0, dtype=None):
    eng = FastLlamaEngine(model, tokenizer, SamplingConfig(num_samples=K, max_new_tokens=T,
                                                           temperature=TEMP), dtype)
    return ContinuousEngine(eng, max_groups, seed=seed)


def _prompt(n, length):
    return torch.randint(4, 100, (length,), generator=torch.Generator().manual_seed(100 + n)).tolist()


def _drive(ce, admits, swaps=None, outs=None, flags=None, steps=range(10_000)):
    """The clock's order at each step s: swap (``swaps[s]`` = (policy, version, recompute_kv)),
    admit ``admits[s]`` = [(n, prompt)], decode; finished groups are collected (output, then
    release). Stops after the last admission once nothing is in flight (or at the end of
    ``steps``). Returns {n: GroupOutput}; ``flags[n]`` collects decode's answers."""
    outs = {} if outs is None else outs
    last = max(admits)
    for s in steps:
        if s > last and not ce.groups:
            break
        if swaps and s in swaps:
            ce.swap(*swaps[s])
        for n, prompt in admits.get(s, []):
            assert ce.admit(n, prompt) == len(prompt)
        before = {n: g.ended.count(False) for n, g in ce.groups.items()}
        answer = ce.decode()
        assert list(answer) == list(before)  # every group live before the step, in admission order
        for n, ended in answer.items():
            if flags is not None:
                flags.setdefault(n, []).append(ended)
        assert ce.live_rows == sum(g.ended.count(False) for g in ce.groups.values())
        for n in list(ce.finished):
            outs[n] = ce.output(n)
            ce.release(n)
    return outs


def _policy_logp(model, out):
    prompt = out.prompt_ids[None]
    logp, _ = response_logprobs(model, prompt, torch.ones_like(prompt, dtype=torch.bool), out.response_ids[None],
                                out.response_mask[None], temperature=TEMP)
    return logp[0]


# Groups of different prompt lengths (1 to 13 tokens: the 13 grows the ring in flight) admitted at
# different steps, up to 5 in flight.
STAGGERED = {0: [(0, _prompt(0, 4)), (1, _prompt(1, 1))], 2: [(2, _prompt(2, 9))], 3: [(3, _prompt(3, 2))],
             5: [(4, _prompt(4, 13))], 7: [(5, _prompt(5, 6)), (6, _prompt(6, 3))]}


@pytest.mark.parametrize(("tokenizer", "gqa"), [(MANY_EOS, False), (ONE_EOS, False), (MANY_EOS, True)])
def test_logp_behav_is_the_trainers_logp_with_staggered_admissions(tokenizer, gqa):
    """No swap: every token's logp_behav equals the trainer's log-prob of it given the prompt and
    the earlier tokens (HF forward in fp32, 1e-5), for every group whatever joined or left beside
    it. Masks: up to and including the first EOS (then padding, logp 0), or all T tokens; a
    group's length is its longest sample's; decode's flags mark each sample ended from the step
    of its last token on."""
    model = _llama(1, gqa)
    ce = _engine(model, tokenizer)
    flags = {}
    outs = _drive(ce, STAGGERED, flags=flags)
    assert sorted(outs) == list(range(7)) and not ce.groups and ce.live_rows == 0
    eos = torch.tensor(ce.engine.eos_ids)
    lengths = []
    for n, out in outs.items():
        ids, mask = out.response_ids, out.response_mask
        Tn = ids.shape[1]
        assert ids.shape == mask.shape == out.logp_behav.shape == (K, Tn) and out.token_version.tolist() == [0] * Tn
        is_eos = torch.isin(ids, eos)
        length = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, Tn)
        assert torch.equal(mask.sum(1), length) and length.max() == Tn and (length == T).any() == (Tn == T)
        assert torch.equal(mask, torch.arange(Tn) < length[:, None])
        assert ids[~mask].eq(TOK.pad_token_id).all() and out.logp_behav[~mask].eq(0).all()
        assert out.logp_behav[mask].lt(0).all()
        assert_close(out.logp_behav, _policy_logp(model, out), rtol=0, atol=1e-5)
        assert [sum(f) for f in zip(*flags[n])] == [Tn - int(x) + 1 for x in length]  # ended from its last token on
        lengths += length.tolist()
    assert len(set(lengths)) >= (3 if tokenizer is MANY_EOS else 1)
    if tokenizer is ONE_EOS:
        assert lengths.count(T) >= len(lengths) - 2  # mostly cut at max_new_tokens


def test_a_groups_tokens_do_not_depend_on_what_else_is_in_flight():
    """Group 5 alone, or admitted at step 2 beside groups 3 and 4 (a long prompt that grows the
    ring), with groups 6 and 7 joining after it: the same tokens (its own generator, seeded by
    (seed, 5, rank), K draws per step), logp_behav equal up to float rounding. Another admission
    index or rank gives other samples."""
    model = _llama(2)
    alone = _drive(_engine(model), {0: [(5, _prompt(5, 5))]})[5]
    ce = _engine(model)
    crowd = _drive(ce, {0: [(3, _prompt(3, 12)), (4, _prompt(4, 2))], 2: [(5, _prompt(5, 5))],
                        3: [(6, _prompt(6, 7))], 4: [(7, _prompt(7, 3))]})
    assert torch.equal(crowd[5].response_ids, alone.response_ids)
    assert torch.equal(crowd[5].response_mask, alone.response_mask)
    assert_close(crowd[5].logp_behav, alone.logp_behav, rtol=0, atol=1e-5)
    assert ce.width >= 12 - 1 + T  # group 3 grew the ring
    other_n = _drive(_engine(model), {0: [(6, _prompt(5, 5))]})[6]
    other_rank = _drive(ContinuousEngine(_engine(model).engine, 4, seed=0, rank=1), {0: [(5, _prompt(5, 5))]})[5]
    assert not torch.equal(other_n.response_ids, alone.response_ids)
    assert not torch.equal(other_rank.response_ids, alone.response_ids)


def test_group_seed_is_a_function_of_seed_n_and_rank():
    seeds = {group_seed(s, n, r) for s in (0, 1) for n in range(50) for r in range(3)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)
    assert group_seed(7, 3, 1) == group_seed(7, 3, 1) != group_seed(7, 3, 0)
    with pytest.raises(ValueError, match="n=-1"):
        group_seed(0, -1)


def _swap_run(old, new, recompute):
    """Groups 0 (4 prompt tokens) and 1 (7) admitted at steps 0 and 1, version 1 swapped in at
    step 3 (before that step's decode), group 2 admitted after it; single EOS id, so most samples
    run all T = 6 steps. Returns the outputs and swap's return value."""
    ce = _engine(old, ONE_EOS)
    counted = []
    swap = ce.swap

    def counting_swap(*args):
        live = {n: (g.prompt.shape[0], g.steps, g.ended.count(False)) for n, g in ce.groups.items()}
        counted.append((swap(*args), live))

    ce.swap = counting_swap
    outs = _drive(ce, {0: [(0, _prompt(0, 4))], 1: [(1, _prompt(1, 7))], 4: [(2, _prompt(2, 5))]},
                  swaps={3: (new, 1, recompute)})
    return outs, counted[0]


def _perturbed(model, seed, scale=0.5):
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return new


def test_swap_with_recompute_kv_samples_each_token_from_its_versions_weights():
    """recompute_kv=True (re-prefill): tokens sampled before the swap have the OLD policy's
    log-probs, tokens after it the NEW policy's given the whole prefix (1e-5); token_version
    switches at the swap's step (group 0: 3 tokens of version 0, group 1: 2, group 2: none). The
    count returned is, per live group, min(P, P - 1 + t) + (t - 1) * samples still decoding:
    4 + 2 * 3 for group 0 (P = 4, t = 3) and 7 + 1 * 3 for group 1 (P = 7, t = 2), when no
    sample has ended yet."""
    old = _llama(3)
    new = _perturbed(old, 0)
    outs, (tokens, live) = _swap_run(old, new, True)
    assert [outs[n].token_version.tolist()[:4] for n in range(3)] == [[0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    assert live == {0: (4, 3, 3), 1: (7, 2, 3)} and tokens == (4 + 2 * 3) + (7 + 1 * 3)
    for n, out in outs.items():
        v1 = out.token_version.bool()[None].expand_as(out.response_mask)
        logp_old, logp_new = _policy_logp(old, out), _policy_logp(new, out)
        assert_close(out.logp_behav[~v1], logp_old[~v1], rtol=0, atol=1e-5)
        assert_close(out.logp_behav[v1], logp_new[v1], rtol=0, atol=1e-5)
    after = torch.cat([out.logp_behav[out.token_version.bool()[None].expand_as(out.response_mask)
                                      & out.response_mask] for out in outs.values()])
    assert after.numel() >= 20  # most samples run on after the swap


def test_swap_keeping_the_cache_samples_from_neither_policy_unless_weights_are_equal():
    """recompute_kv=False (PipelineRL's kept cache): the tokens of groups 0 and 1 sampled after
    the swap come from the new weights on keys/values the old weights wrote, a distribution that
    is neither policy's (some token differs from both by more than 1e-4), while group 2, admitted
    after the swap, is exactly the new policy's and the tokens before the swap the old one's.
    With "new" weights equal to the old ones, every token is the policy's (1e-5)."""
    old = _llama(3)
    new = _perturbed(old, 0)
    outs, (tokens, _) = _swap_run(old, new, False)
    assert tokens == 0
    gaps_new, gaps_old = [], []
    for n, out in outs.items():
        v1 = out.token_version.bool()[None].expand_as(out.response_mask)
        logp_old, logp_new = _policy_logp(old, out), _policy_logp(new, out)
        assert_close(out.logp_behav[~v1], logp_old[~v1], rtol=0, atol=1e-5)
        if n == 2:
            assert_close(out.logp_behav, logp_new, rtol=0, atol=1e-5)
            continue
        stale = v1 & out.response_mask
        gaps_new.append((out.logp_behav - logp_new)[stale].abs())
        gaps_old.append((out.logp_behav - logp_old)[stale].abs())
    assert torch.cat(gaps_new).max() > 1e-4 and torch.cat(gaps_old).max() > 1e-4
    same, _ = _swap_run(old, copy.deepcopy(old), False)
    for out in same.values():
        assert_close(out.logp_behav, _policy_logp(old, out), rtol=0, atol=1e-5)


def test_a_prompt_admitted_before_a_swap_keeps_the_weights_of_its_admission():
    """admit, swap, then decode (the clock never does this: an event swaps before it admits):
    the swap first prefills the waiting prompt with the weights held at admission. So with a kept
    cache and new weights equal to the old ones every token is the policy's (1e-5); with other
    new weights the first token comes from them over an old-weight prompt cache (not the new
    policy's, by more than 1e-4); with recompute_kv the swap rebuilds its P - 1 = 5 cached tokens
    and every token is the new policy's (1e-5)."""
    old = _llama(3)
    new = _perturbed(old, 0)
    for policy, recompute in ((copy.deepcopy(old), False), (new, False), (new, True)):
        ce = _engine(old, ONE_EOS)
        ce.admit(0, _prompt(0, 6))
        assert ce.swap(policy, 1, recompute) == (5 if recompute else 0)
        out = _drive(ce, {0: []})[0]
        assert out.token_version.eq(1).all()
        gap = (out.logp_behav - _policy_logp(policy, out)).abs()  # 0 off the mask
        assert gap.max() < 1e-5 if policy is not new or recompute else gap[:, 0].min() > 1e-4


SCHEDULE = {0: [(0, _prompt(0, 3)), (1, _prompt(1, 8))], 1: [(2, _prompt(2, 1))], 3: [(3, _prompt(3, 11))],
            4: [(4, _prompt(4, 5))], 6: [(5, _prompt(5, 2))], 9: [(6, _prompt(6, 14)), (7, _prompt(7, 4))]}


@pytest.mark.parametrize("stop", [4, 9])
def test_state_dict_mid_flight_resumes_bitwise(stop):
    """Save after step ``stop``'s admissions (before its decode: a prompt not yet prefilled) with
    groups mid-flight, load into a fresh ContinuousEngine on a fresh FastLlamaEngine holding the
    same weights (its own state dict), go on through two swaps (kept cache, then re-prefill) and
    more admissions: every output is bitwise the uninterrupted run's."""
    old = _llama(4)
    new, newer = _perturbed(old, 1), _perturbed(old, 2)
    swaps = {5: (new, 1, False), 8: (newer, 2, True)}
    straight = _drive(_engine(old), SCHEDULE, swaps=swaps)

    ce = _engine(old)
    first = _drive(ce, SCHEDULE, swaps=swaps, steps=range(stop))
    for s in range(stop, stop + 1):  # swap and admit of step `stop`, then save before its decode
        if s in swaps:
            ce.swap(*swaps[s])
        for n, prompt in SCHEDULE.get(s, []):
            ce.admit(n, prompt)
    assert any(g.pending for g in ce.groups.values()) and ce.groups
    buf = io.BytesIO()
    torch.save({"engine": ce.engine.state_dict(), "continuous": ce.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = _engine(_llama(9))  # other weights until the engine's state is loaded
    resumed.engine.load_state_dict(state["engine"])
    resumed.load_state_dict(state["continuous"])
    outs = dict(first)
    resumed.decode()  # the decode of step `stop`
    for n in list(resumed.finished):
        outs[n] = resumed.output(n)
        resumed.release(n)
    later = {s: a for s, a in SCHEDULE.items() if s > stop}
    _drive(resumed, later or {stop: []}, swaps={s: w for s, w in swaps.items() if s > stop}, outs=outs,
           steps=range(stop + 1, 10_000))
    assert sorted(outs) == sorted(straight)
    for n, out in straight.items():
        for field in ("response_ids", "response_mask", "logp_behav", "token_version", "prompt_ids"):
            assert torch.equal(getattr(outs[n], field), getattr(out, field)), (n, field)


def test_state_dict_refuses_another_version_or_settings():
    model = _llama(4)
    ce = _engine(model)
    ce.admit(0, _prompt(0, 3))
    ce.decode()
    state = ce.state_dict()
    other = _engine(model)
    other.engine.version = 3
    with pytest.raises(ValueError, match=r"version=3 differs from the saved state's 0.*FastLlamaEngine's state_dict"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1 differs"):
        _engine(model, seed=1).load_state_dict(state)


def test_bf16_weights_run_with_finite_logp():
    """bf16 engine weights (fp32 KV cache on a CPU): staggered groups and a re-prefilled swap run,
    logp_behav is finite and negative on the mask, and near the fp32 policy's (no exactness claim)."""
    model = _llama(5)
    ce = _engine(model, dtype="bfloat16")
    assert ce.engine.weights["0.wqkv"].dtype == torch.bfloat16
    outs = _drive(ce, STAGGERED, swaps={3: (_perturbed(model, 3, 0.0), 1, True)})
    assert sorted(outs) == list(range(7))
    for out in outs.values():
        lp = out.logp_behav[out.response_mask]
        assert lp.dtype == torch.float32 and torch.isfinite(lp).all() and lp.lt(0).all()
        diff = (lp - _policy_logp(model, out)[out.response_mask]).abs()
        assert diff.mean() < 0.02 and diff.max() < 0.1


def test_clock_drives_it_through_the_group_generator_protocol():
    """An AsyncClock (in-flight swaps with re-prefill, pace eta 1) drives the engine through a
    thin adapter: every trained group's token versions and lengths as the clock recorded them
    are the engine's, and its tokens of version v are the log-probs of the trainer's weights v."""
    policies = [_llama(6)]
    ce = _engine(policies[0], max_groups=3)
    prompts = [_prompt(p, 2 + p % 5) for p in range(6)]
    kept = {}

    class Adapter:
        def admit(self, n, prompt):
            return ce.admit(n, prompts[prompt])

        def decode(self):
            return ce.decode()

        def swap(self, version, recompute_kv):
            return ce.swap(policies[version], version, recompute_kv)

        def release(self, n, trained):
            if trained:
                kept[n] = ce.output(n)
            ce.release(n)

    cfg = ClockConfig(enabled=True, max_inflight=3, weight_update="inflight", recompute_kv_on_update=True,
                      staleness="pace", max_staleness=1)
    clock = AsyncClock(cfg, groups_per_step=2, group_size=K, stream=PromptStream.cyclic(len(prompts)),
                       generator=Adapter())
    for s in range(4):
        plan = clock.step(s)
        for rec in plan.groups:
            out = kept[rec.n]
            assert out.token_version.tolist() == rec.token_versions
            assert out.response_mask.sum(1).tolist() == rec.lengths
            for v in set(rec.token_versions):
                at_v = (out.token_version == v)[None].expand_as(out.response_mask) & out.response_mask
                assert_close(out.logp_behav[at_v], _policy_logp(policies[v], out)[at_v], rtol=0, atol=1e-5)
        policies.append(_perturbed(policies[0], 10 + s))  # theta_{s+1}
    assert max(v for out in kept.values() for v in out.token_version.tolist()) >= 1


def test_bad_calls_raise_naming_the_value():
    model = _llama(7)
    ce = _engine(model, max_groups=2)
    ce.admit(0, _prompt(0, 3))
    with pytest.raises(ValueError, match="n=0 is not valid"):
        ce.admit(0, _prompt(0, 3))
    ce.decode()
    ce.admit(1, _prompt(1, 4))
    with pytest.raises(RuntimeError, match="max_groups=2"):
        ce.admit(2, _prompt(2, 3))
    with pytest.raises(ValueError, match="group 0 is still decoding"):
        ce.output(0)
    with pytest.raises(ValueError, match="release\\(n=5\\)"):
        ce.release(5)
    with pytest.raises(ValueError, match="prompt_ids of shape \\(0,\\)"):
        _engine(model).admit(0, [])
    with pytest.raises(TypeError, match="FastLlamaEngine"):
        ContinuousEngine(object(), 2, seed=0)


def test_a_group_abandoned_mid_flight_leaves_the_others_exact():
    """release() of a group still decoding (group 0, started) frees its rows while group 1 waits
    for its first step (its rows move up, in order): group 1 then runs as if alone, its logp_behav
    the policy's."""
    model = _llama(7)
    ce = _engine(model, max_groups=2)
    ce.admit(0, _prompt(0, 3))
    ce.decode()
    ce.admit(1, _prompt(1, 4))
    ce.release(0)
    assert ce.live_groups == [1] and ce.live_rows == K
    out = _drive(ce, {0: []})[1]
    assert_close(out.logp_behav, _policy_logp(model, out), rtol=0, atol=1e-5)
    assert torch.equal(out.response_ids, _drive(_engine(model), {0: [(1, _prompt(1, 4))]})[1].response_ids)
