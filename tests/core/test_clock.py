"""The asynchronous schedule on a simulated clock (docs/algorithms.md section 7.5): determinism and
checkpoint round trip, the synchronous special case, the staleness each rule allows, hand-computed
clock times, and the errors. The generator is ``ScriptedGenerator``: lengths are a deterministic
function of (admission index, prompt), so every schedule here is exact."""

import json
import random

import pytest

from reclight.clock import (
    AsyncClock, ClockConfig, ClockCosts, PromptStream, ScriptedGenerator, emulated_speedup, step_metrics,
    synchronous_clock,
)


def seeded_lengths(seed, k, low=1, high=9):
    """Lengths drawn per admission index from (seed, n) alone."""
    return lambda n, prompt: [random.Random(f"{seed}:{n}").randint(low, high) for _ in range(k)]


def by_prompt(table, k):
    """Lengths that depend on the prompt only (the bench's chain)."""
    return lambda n, prompt: [table[prompt]] * k


def run(cfg, b, k, lengths, steps, prompts=6, record=False, tokens=lambda p: 2 + p):
    gen = ScriptedGenerator(lengths, tokens)
    clock = AsyncClock(cfg, b, k, PromptStream.cyclic(prompts), gen, record_events=record)
    return clock, [clock.step(s) for s in range(steps)]


def cfg_of(**kw):
    return ClockConfig(enabled=True, **kw)


def plan_view(plan):
    return (plan.step, [g.to_dict() for g in plan.groups], [g.to_dict() for g in plan.discarded],
            plan.metrics, plan.published_at, plan.train_start, plan.train_end)


def versions_published_by(plans, t):
    """c: the newest version published at time t (trainer events come first at equal times)."""
    return max(p.step for p in plans if p.published_at <= t)


# -- hand-computed times ---------------------------------------------------------------------------

def test_hand_computed_clock_b1_k2():
    """B = 1, K = 2, synchronous (pace, eta 0, drain, 1 slot); costs a = 1, b = 0.5, prefill 0.1
    per token, sync 0.25, c = 2, e = 0.5; prompt 3 tokens; group 0 lengths [2, 1], group 1 [1, 3].

    Step 0: admit (0.3) + decode 2 rows (1 + 1.0) = 2.3; decode 1 row (1.5) -> 3.8; the group
    retires at 3.8 and the trainer starts: 2 + 0.5 * 3 tokens = 3.5 -> T_1 = 7.3. Trainer idle
    3.8 / 7.3; the generator idles from 3.8 (pace: n = 1 is not < 1) to 7.3: 3.5 / 7.3.
    Step 1: swap 0.25 + admit 0.3 + decode 2 rows 2.0 -> 9.85; two 1-row decodes -> 12.85; train
    2 + 0.5 * 4 = 4 -> T_2 = 16.85. Window 9.55: trainer idle 5.55, generator idle 4.0."""
    costs = ClockCosts(decode_a=1, decode_b=0.5, prefill_b=0.1, sync_cost=0.25, train_c=2, train_e=0.5)
    cfg = cfg_of(max_inflight=1, weight_update="drain", staleness="pace", max_staleness=0, costs=costs)
    table = {0: [2, 1], 1: [1, 3]}
    clock, plans = run(cfg, 1, 2, lambda n, p: table[n], 2, tokens=lambda p: 3)
    p0, p1 = plans
    assert (p0.published_at, p0.train_start, p0.train_end) == pytest.approx((0.0, 3.8, 7.3), abs=1e-12)
    assert (p1.published_at, p1.train_start, p1.train_end) == pytest.approx((7.3, 12.85, 16.85), abs=1e-12)
    assert p0.metrics["async/trainer_idle_frac"] == pytest.approx(3.8 / 7.3, abs=1e-12)
    assert p0.metrics["async/generator_idle_frac"] == pytest.approx(3.5 / 7.3, abs=1e-12)
    assert p1.metrics["async/trainer_idle_frac"] == pytest.approx(5.55 / 9.55, abs=1e-12)
    assert p1.metrics["async/generator_idle_frac"] == pytest.approx(4.0 / 9.55, abs=1e-12)
    assert p1.metrics["async/trainer_idle_frac_total"] == pytest.approx((3.8 + 5.55) / 16.85, abs=1e-12)
    assert p1.metrics["async/clock"] == pytest.approx(16.85, abs=1e-12)
    assert p0.groups[0].token_versions == [0, 0] and p1.groups[0].token_versions == [1, 1, 1]
    assert p1.groups[0].lengths == [1, 3] and p1.metrics["async/swaps"] == 1
    assert synchronous_clock(costs, [[(3, [2, 1])], [(3, [1, 3])]]) == pytest.approx(16.85, abs=1e-12)
    assert emulated_speedup(plans, costs) == pytest.approx(1.0, abs=1e-12)


def test_hand_computed_inflight_swap_with_recompute():
    """B = 1, K = 1, 2 slots, ``none``, inflight with recompute; a = 1, b = 0 (tiny), prefill 0.5,
    sync 0.25, c = 1.5, e tiny; prompt 2 tokens; lengths: group 0 -> 1, every later group -> 4.

    t = 0: admit 0 and 1 (2 * 0.5 * 2 = 2.0) + decode -> 3.0 (group 0 ends). t = 3: retire 0,
    admit 2 (1.0), decode -> 5.0; the trainer trains group 0 from 3.0 to 4.5 (T_1). t = 5: swap to
    version 1 with groups 1 (2 generated tokens) and 2 (1 token) live: re-prefill 2 + 2 + 2 + 1 = 7
    tokens = 3.5, + sync 0.25, decode 1 -> 9.75. Group 1's tokens have versions [0, 0, 1, ...]."""
    costs = ClockCosts(decode_a=1, decode_b=1e-9, prefill_b=0.5, sync_cost=0.25, train_c=1.5, train_e=1e-9)
    cfg = cfg_of(max_inflight=2, weight_update="inflight", recompute_kv_on_update=True, staleness="none",
                 costs=costs)
    clock, plans = run(cfg, 1, 1, lambda n, p: [1 if n == 0 else 4], 2, record=True, tokens=lambda p: 2)
    swaps = [e for e in clock.events if e["kind"] == "swap"]
    assert swaps[0] == {"kind": "swap", "t": pytest.approx(5.0, abs=1e-6), "version": 1, "tokens": 7}
    decodes = [e["t"] for e in clock.events if e["kind"] == "decode"]
    assert decodes[:4] == pytest.approx([0.0, 3.0, 5.0, 9.75], abs=1e-6)
    assert plans[0].train_end == pytest.approx(4.5, abs=1e-6)
    assert plans[1].groups[0].n == 1 and plans[1].groups[0].token_versions == [0, 0, 1, 1]


# -- determinism and checkpoints -------------------------------------------------------------------

CONFIGS = {
    "pace_inflight": dict(staleness="pace", max_staleness=1, weight_update="inflight", max_inflight=5),
    "pace_recompute": dict(staleness="pace", max_staleness=2, weight_update="inflight", recompute_kv_on_update=True,
                           max_inflight=4, costs=ClockCosts(prefill_b=0.01, sync_cost=0.3)),
    "drop_requeue": dict(staleness="drop", max_staleness=0, weight_update="inflight", max_inflight=6),
    "drain_none": dict(staleness="none", weight_update="drain", max_inflight=3),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_same_config_same_events_and_plans(name):
    cfg = cfg_of(**CONFIGS[name])
    a, plans_a = run(cfg, 2, 3, seeded_lengths(7, 3), 10, record=True)
    b, plans_b = run(cfg, 2, 3, seeded_lengths(7, 3), 10, record=True)
    assert a.events == b.events and len(a.events) > 50
    assert [plan_view(p) for p in plans_a] == [plan_view(p) for p in plans_b]
    c, plans_c = run(cfg, 2, 3, seeded_lengths(8, 3), 10)  # other lengths: another schedule
    assert [plan_view(p) for p in plans_a] != [plan_view(p) for p in plans_c]


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_round_trip_continues_identically(name):
    """10 steps straight == 4 steps, a JSON round trip of the clock's and the generator's state,
    a new clock and generator, 6 more steps."""
    cfg = cfg_of(**CONFIGS[name])
    _, straight = run(cfg, 2, 3, seeded_lengths(3, 3), 10)
    clock, first = run(cfg, 2, 3, seeded_lengths(3, 3), 4)
    saved = json.loads(json.dumps({"clock": clock.state_dict(), "gen": clock.generator.state_dict()}))
    gen = ScriptedGenerator(seeded_lengths(3, 3), lambda p: 2 + p)
    gen.load_state_dict(saved["gen"])
    resumed = AsyncClock(cfg, 2, 3, PromptStream.cyclic(6), gen)
    resumed.load_state_dict(saved["clock"])
    rest = [resumed.step(s) for s in range(4, 10)]
    assert [plan_view(p) for p in first + rest] == [plan_view(p) for p in straight]


def test_load_state_dict_refuses_another_schedule():
    clock, _ = run(cfg_of(staleness="pace", max_staleness=1), 2, 2, seeded_lengths(0, 2), 2)
    other = AsyncClock(cfg_of(staleness="pace", max_staleness=2), 2, 2, PromptStream.cyclic(6),
                       ScriptedGenerator(seeded_lengths(0, 2)))
    with pytest.raises(ValueError, match=r"model.clock.max_staleness=2 differs from the checkpoint's 1"):
        other.load_state_dict(clock.state_dict())


# -- the synchronous special case ------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pace_eta0_drain_full_slots_is_the_synchronous_loop(seed):
    """Step s trains groups sB .. (s+1)B - 1, every token has version s, the clock equals
    synchronous_clock of the same batches and the closed form per step."""
    b, k = 3, 4
    costs = ClockCosts(decode_a=1.0, decode_b=0.1, prefill_b=0.05, sync_cost=0.5, train_c=3.0, train_e=0.01)
    cfg = cfg_of(staleness="pace", max_staleness=0, weight_update="drain", max_inflight=b, costs=costs)
    _, plans = run(cfg, b, k, seeded_lengths(seed, k), 8)
    t = 0.0
    for s, plan in enumerate(plans):
        assert sorted(g.n for g in plan.groups) == list(range(s * b, (s + 1) * b))
        assert all(v == s for g in plan.groups for v in g.token_versions)
        assert plan.metrics["async/staleness_max"] == 0 and plan.metrics["async/versions_spanned_max"] == 1
        lengths = [x for g in plan.groups for x in g.lengths]
        decode = sum(costs.decode(sum(x > j for x in lengths)) for j in range(max(lengths)))
        prefill = costs.prefill_b * sum(g.prompt_tokens for g in plan.groups)
        t += (costs.sync_cost if s else 0.0) + prefill + decode + costs.train(sum(lengths))
        assert plan.train_end == pytest.approx(t, rel=1e-12)
        assert plan.published_at <= plan.train_start  # completion order inside the batch
        assert [g.completed_at for g in plan.groups] == sorted(g.completed_at for g in plan.groups)
    assert synchronous_clock(costs, [p.groups for p in plans]) == pytest.approx(plans[-1].train_end, rel=1e-12)


def test_async_overlap_is_faster_than_synchronous():
    """inflight pace eta = 1 with 2B slots overlaps decoding and training: emulated speedup > 1."""
    cfg = cfg_of(staleness="pace", max_staleness=1, weight_update="inflight", max_inflight=4)
    _, plans = run(cfg, 2, 4, seeded_lengths(5, 4), 12)
    assert emulated_speedup(plans, cfg.costs) > 1.2
    assert plans[-1].metrics["async/trainer_idle_frac_total"] < 0.5


# -- staleness bounds under pace -------------------------------------------------------------------

PATTERNS = {
    "seeded": seeded_lengths(11, 3, 1, 12),
    "long_prompt": by_prompt({0: 30, 1: 1, 2: 2, 3: 1, 4: 3, 5: 1}, 3),
    "alternating": lambda n, p: [25 if n % 4 == 1 else 1, 1, 2],
}


def _check_pace_bounds(plans, b, eta):
    """v_first >= floor(n / B) - eta (admission), and s_train <= c_n + eta, c_n the newest version
    published when n completed (so staleness <= eta + c_n - v_first)."""
    worst = 0
    for plan in plans:
        for g in plan.groups:
            assert g.first_version >= g.n // b - eta
            c_n = versions_published_by(plans, g.completed_at)
            assert plan.step <= c_n + eta
            assert g.staleness(plan.step) <= eta + c_n - g.first_version
            worst = max(worst, g.staleness(plan.step))
    return worst


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pace_eta1_drain_never_exceeds_eta(pattern):
    """drain + pace: the trainer cannot pass step v_first + eta without group n, and no swap
    happens while n decodes: staleness <= eta = 1, reached, one version per group."""
    b, eta = 2, 1
    cfg = cfg_of(staleness="pace", max_staleness=eta, weight_update="drain", max_inflight=6)
    _, plans = run(cfg, b, 3, PATTERNS[pattern], 16)
    assert _check_pace_bounds(plans, b, eta) == eta  # reached, never exceeded
    assert max(p.metrics["async/staleness_max"] for p in plans) == eta
    assert all(p.metrics["async/versions_spanned_max"] == 1 for p in plans)
    assert cfg.max_trained_staleness() == eta


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pace_eta1_inflight_bound_is_eta_plus_versions_published_while_decoding(pattern):
    b, eta = 2, 1
    cfg = cfg_of(staleness="pace", max_staleness=eta, weight_update="inflight", max_inflight=6)
    _, plans = run(cfg, b, 3, PATTERNS[pattern], 16)
    worst = _check_pace_bounds(plans, b, eta)
    assert worst >= eta and cfg.max_trained_staleness() is None
    if pattern != "seeded":  # a long group among short ones: completion order lets it age past eta
        assert worst > eta


def test_pace_inflight_long_group_reaches_its_bound_exactly():
    """B = 1, eta = 1, 3 slots; prompt 0 takes 8 tokens, the others 1; training (1.5) outlasts a
    short group's decode (1.02). At step s only groups 0 and s + 1 are admissible and untrained,
    so the trainer goes on with the short ones while group 0 decodes under versions 0, 1, 2; it
    completes while step 2 trains (c_0 = 2) and is trained at step c_0 + eta = 3: staleness 3,
    the bound eta + (versions published while it decoded) reached, 2 above eta."""
    b, eta = 1, 1
    cfg = cfg_of(staleness="pace", max_staleness=eta, weight_update="inflight", max_inflight=3,
                 costs=ClockCosts(decode_a=1.0, decode_b=0.01, train_c=1.5, train_e=0.01))
    _, plans = run(cfg, b, 2, by_prompt({0: 8, 1: 1, 2: 1, 3: 1}, 2), 14, prompts=4)
    (step, g0), = [(p.step, g) for p in plans for g in p.groups if g.n == 0]
    c_0 = versions_published_by(plans, g0.completed_at)
    assert (g0.first_version, c_0, step) == (0, 2, 3)
    assert plans[c_0].train_start < g0.completed_at < plans[c_0].train_end  # it completed while step 2 trained
    assert g0.staleness(step) == eta + c_0 == plans[step].metrics["async/staleness_max"] == 3
    assert g0.token_versions == [0, 0, 0, 1, 1, 1, 2, 2]  # it spans versions


# -- drop, requeue, starvation ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["inflight", "drain"])
@pytest.mark.parametrize("eta", [0, 1, 2])
def test_drop_never_trains_a_group_older_than_eta(mode, eta):
    cfg = cfg_of(staleness="drop", max_staleness=eta, weight_update=mode, max_inflight=6)
    _, plans = run(cfg, 2, 3, PATTERNS["seeded"], 16)
    assert all(g.staleness(p.step) <= eta for p in plans for g in p.groups)
    assert all(p.metrics["async/staleness_max"] <= eta for p in plans)
    if mode == "inflight" and eta == 0:
        assert sum(p.metrics["async/discarded"] for p in plans) > 0


LONG = {p: (20 if p == 4 else 1) for p in range(8)}
"""8 prompts; prompt 4 takes 20 tokens, the others 1."""


def _drop_run(requeue):
    cfg = cfg_of(staleness="drop", max_staleness=1, weight_update="inflight", max_inflight=3, starve_after=3,
                 requeue=requeue, costs=ClockCosts(train_c=0.1, train_e=1e-6))
    return run(cfg, 1, 2, by_prompt(LONG, 2), 60, prompts=8, record=True)


@pytest.mark.parametrize("requeue", [True, False])
def test_drop_requeue_starvation_and_counts(requeue):
    """eta = 1, training (0.1) much shorter than a decoding step: groups of the long prompt span
    many publishes and are discarded; some short ones too (several complete at once, the trainer
    takes one per step). Checked against an independent replay of the plans: the rule (every
    discarded group was older than eta, no trained one is), the counts, the discards in a row
    per prompt (reset when the prompt is trained) and the starved count, the release calls, and
    the stream: every admission of a prompt is a base-order occurrence or a served requeue."""
    clock, plans = _drop_run(requeue)
    streak, discarded = {}, []
    for p in plans:
        assert all(g.staleness(p.step) > 1 and g.discarded_step == p.step for g in p.discarded)
        assert all(g.staleness(p.step) <= 1 for g in p.groups)
        assert p.metrics["async/discarded"] == len(p.discarded)
        assert p.metrics["async/requeued"] == (len(p.discarded) if requeue else 0)
        for g in p.discarded:
            streak[g.prompt] = streak.get(g.prompt, 0) + 1
        for g in p.groups:
            streak.pop(g.prompt, None)
        assert p.metrics["async/starved"] == sum(c >= 3 for c in streak.values())
        assert p.metrics["async/discard_streak_max"] == max(streak.values(), default=0)
        discarded += p.discarded
    assert sum(g.prompt == 4 for g in discarded) >= 5 and max(p.metrics["async/starved"] for p in plans) >= 1
    assert all(clock.generator.released[g.n] is False for g in discarded)
    assert all(clock.generator.released[g.n] is True for p in plans for g in p.groups)
    admitted = [e["prompt"] for e in clock.events if e["kind"] == "admit"]
    stream = clock.stream
    assert stream.served == len(admitted) == clock.next_n
    for prompt in range(8):
        base = sum(stream.order(i) == prompt for i in range(stream.position))
        served_again = sum(g.prompt == prompt for g in discarded) - stream.pending.count(prompt) if requeue else 0
        assert admitted.count(prompt) == base + served_again


def test_prompt_stream_requeue_order_and_state():
    s = PromptStream.cyclic(4)
    assert [s.next(), s.next()] == [0, 1]
    s.requeue(1)
    assert [s.next(), s.next()] == [2, 3]  # the current epoch's remaining prompts first
    s.requeue(0)  # requeued at the boundary: joins the pending ones
    assert [s.next(), s.next(), s.next()] == [1, 0, 0]  # then the next epoch
    saved = s.state_dict()
    tail = [s.next() for _ in range(5)]
    t = PromptStream.cyclic(4)
    t.load_state_dict(saved)
    assert [t.next() for _ in range(5)] == tail == [1, 2, 3, 0, 1]
    a, b = PromptStream.shuffled(5, seed=3), PromptStream.shuffled(5, seed=3)
    first = [a.next() for _ in range(15)]
    assert first == [b.next() for _ in range(15)]
    assert all(sorted(first[i:i + 5]) == list(range(5)) for i in (0, 5, 10)) and first[:5] != first[5:10]


# -- metrics ---------------------------------------------------------------------------------------

def test_step_metrics_by_hand():
    """Trained at step 3: sample A of 3 tokens with versions [1, 2, 3], sample B of 1 token [1].
    Token staleness (2, 1, 0, 2): mean 5/4, max 2; ages 2, 2; token-weighted 2; spans 3, 1."""
    from reclight.clock import GroupRecord

    g = GroupRecord(n=0, prompt=0, admitted_at=0.0, token_versions=[1, 2, 3], lengths=[3, 1])
    m = step_metrics([g], 3)
    assert m["async/staleness_mean"] == 5 / 4 and m["async/staleness_max"] == 2
    assert m["async/age_mean"] == 2 and m["async/age_token_weighted"] == 2
    assert m["async/versions_spanned_mean"] == 2 and m["async/versions_spanned_max"] == 3
    assert m["async/trained_len_mean"] == 2


def test_completion_order_selects_short_samples():
    """inflight, unbounded: the trained mean length of the first steps is below the mean of all
    completed groups later on: the selection bias the metrics expose."""
    cfg = cfg_of(staleness="none", weight_update="inflight", max_inflight=8)
    _, plans = run(cfg, 2, 2, by_prompt({0: 1, 1: 9, 2: 2, 3: 8, 4: 1, 5: 12}, 2), 6)
    assert plans[0].metrics["async/trained_len_mean"] < plans[-1].metrics["async/completed_len_mean"]


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    (dict(max_inflight=0), "model.clock.max_inflight=0 is not valid; accepted: an integer >= 1"),
    (dict(weight_update="eager"), "model.clock.weight_update='eager' is not valid; accepted: inflight, drain"),
    (dict(staleness="wait"), "model.clock.staleness='wait' is not valid; accepted: none, pace, drop"),
    (dict(max_staleness=-1), "model.clock.max_staleness=-1 is not valid; accepted: None or an integer >= 0"),
    (dict(starve_after=0), "model.clock.starve_after=0 is not valid; accepted: an integer >= 1"),
    (dict(requeue="yes"), "model.clock.requeue='yes' is not valid; accepted: true or false"),
    (dict(enabled=1), "model.clock.enabled=1 is not valid; accepted: true or false"),
    (dict(recompute_kv_on_update=True, weight_update="drain"),
     "model.clock.recompute_kv_on_update=True is not valid; accepted: false with weight_update 'drain'"),
    (dict(costs=dict(decode_a=0)), "model.clock.costs.decode_a=0 is not valid; accepted: decode_a > 0"),
    (dict(costs=dict(decode_b=float("inf"))),
     "model.clock.costs.decode_b=inf is not valid; accepted: decode_b > 0 (a finite"),
    (dict(costs=dict(train_c=-1.0)), "model.clock.costs.train_c=-1.0 is not valid; accepted: train_c > 0"),
    (dict(costs=dict(train_e=float("nan"))), "model.clock.costs.train_e=nan is not valid"),
    (dict(costs=dict(prefill_b=-0.1)), "model.clock.costs.prefill_b=-0.1 is not valid; accepted: prefill_b >= 0"),
    (dict(costs=dict(sync_cost=True)), "model.clock.costs.sync_cost=True is not valid; accepted: sync_cost >= 0"),
])
def test_bad_config_names_the_field(kwargs, needle):
    with pytest.raises(ValueError) as err:
        ClockConfig(**kwargs)
    assert needle in str(err.value)


def test_check_against_and_step_order():
    cfg = cfg_of()
    with pytest.raises(ValueError, match="groups_per_step=0 is not valid"):
        cfg.check_against(0, 4)
    with pytest.raises(ValueError, match="group_size=0 is not valid"):
        AsyncClock(cfg, 2, 0, PromptStream.cyclic(2), ScriptedGenerator(seeded_lengths(0, 1)))
    clock = AsyncClock(cfg, 1, 1, PromptStream.cyclic(2), ScriptedGenerator(seeded_lengths(0, 1)))
    with pytest.raises(ValueError, match=r"step=1 is not valid; accepted: 0 \(steps are called in order\)"):
        clock.step(1)


class NeverEnds(ScriptedGenerator):
    def decode(self):
        return {n: [False] for n in self.live}


class WrongKeys(ScriptedGenerator):
    def decode(self):
        return {}


def test_a_schedule_without_progress_raises_instead_of_looping():
    cfg = cfg_of(staleness="drop", max_staleness=0)
    clock = AsyncClock(cfg, 1, 1, PromptStream.cyclic(2), NeverEnds(seeded_lengths(0, 1)), max_events_per_step=50)
    with pytest.raises(RuntimeError, match=r"no progress at step 0: more than 50 generator events .*staleness=drop, "
                                           r"max_staleness=0, weight_update=inflight, max_inflight=8"):
        clock.step(0)
    clock = AsyncClock(cfg, 1, 1, PromptStream.cyclic(2), WrongKeys(seeded_lengths(0, 1)))
    with pytest.raises(RuntimeError, match=r"decode\(\) answered for groups \[\]; expected every live group"):
        clock.step(0)


def test_unbounded_eta_is_none_schedule():
    """max_staleness null under pace or drop gives exactly the schedule of ``none``."""
    base = dict(weight_update="inflight", max_inflight=4)
    views = [[plan_view(p) for p in run(cfg_of(staleness=rule, max_staleness=eta, **base), 2, 2,
                                        seeded_lengths(4, 2), 8)[1]]
             for rule, eta in (("none", 1), ("pace", None), ("drop", None))]
    assert views[0] == views[1] == views[2]
