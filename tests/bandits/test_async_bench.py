"""The asynchronous bench (bandits/async_bench.py, async_suite.py): the chain-prompts tables, the
schedules it takes from reclight.clock, per-token behaviour versions, per-group seeding, the
on-policy invariance, and the real command line end to end."""

import itertools
import json
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from torch.testing import assert_close

import bandits  # noqa: F401  (registers the environments)
from bandits.async_bench import (
    behaviour_token_logp, bench_schedule, run_schedule, sample_batch, schedule_config, schedule_summary,
)
from bandits.cli import build_parser, config_from_namespace, main
from bandits.config import AsyncBenchConfig
from bandits.envs import CHAIN_PROMPTS_ID, ChainPromptsEnv
from bandits.problems import chain_prompts_problem
from reclight.algorithms import get_algorithm
from reclight.clock import ClockCosts, GroupRecord, StepPlan

F64 = torch.float64
ASYNC_CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "bandits", "async").glob("*.yaml"))
BASE = str(ASYNC_CONFIGS[0].parent / "default.yaml")


def test_chain_prompts_tables_match_gym_episodes():
    """Every action sequence of every prompt, stepped through the registered env (noise off):
    the reward and the visited states are the problem's enumerated tables."""
    env = gym.make(CHAIN_PROMPTS_ID, horizons=[1, 2, 3], reward_noise="none").unwrapped
    problem = chain_prompts_problem(env)
    assert problem.horizons.tolist() == [1, 2, 3] and problem.n_outcomes.tolist() == [3, 9, 27]
    for p, h in enumerate(env.horizons):
        for m, seq in enumerate(itertools.product(range(3), repeat=h)):
            obs, info = env.reset(seed=0, options={"prompt": p})
            assert info["prompt"] == p
            states = [obs]
            for action in seq:
                obs, reward, terminated, _, _ = env.step(action)
                states.append(obs)
            assert terminated and reward == problem.reward_means[0, p, m].item()
            assert states[:h] == problem.states[p, m, :h].tolist() and problem.actions[p, m, :h].tolist() == list(seq)
    assert not problem.outcome_valid()[0, 3:].any() and problem.outcome_valid()[2].all()


def test_chain_prompts_defaults_and_errors():
    env = ChainPromptsEnv()
    assert [(c.length, c.start, c.horizon) for c in env.chains] == [(3, 1, 2), (4, 1, 3), (5, 2, 4), (7, 3, 6)]
    with pytest.raises(ValueError, match=r"start=0 is not valid"):
        ChainPromptsEnv(horizons=[2], starts=[0])
    with pytest.raises(ValueError, match=r"accepted: one entry per prompt \(2\)"):
        ChainPromptsEnv(horizons=[2, 3], lengths=[4])


def _costs():
    return ClockCosts(decode_a=1.0, decode_b=0.02, train_c=1.5, train_e=0.01)


def test_schedules_come_from_the_clock():
    """sync = pace, eta 0, drain, B slots: every token has the version of its step; the async
    schedules use the knobs; drop_norequeue nearly never trains the longest prompt here."""
    knobs = dict(eta=1, max_inflight=6, weight_update="inflight", recompute_kv_on_update=False, starve_after=3,
                 costs=_costs(), groups_per_step=3)
    sync = schedule_config("sync", **knobs)
    assert (sync.staleness, sync.max_staleness, sync.weight_update, sync.max_inflight) == ("pace", 0, "drain", 3)
    assert schedule_config("drop", **knobs).requeue and not schedule_config("drop_norequeue", **knobs).requeue
    plans = bench_schedule(sync, [1, 2, 3], 3, 2, 6, 0)
    assert all(v == p.step for p in plans for g in p.groups for v in g.token_versions)
    assert all(sorted(g.prompt for g in p.groups) == [0, 1, 2] for p in plans)  # one epoch per step
    for name in ("pace", "drop"):
        plans = bench_schedule(schedule_config(name, **knobs), [1, 2, 3], 3, 2, 12, 0)
        assert all(len(g.token_versions) == [1, 2, 3][g.prompt] for p in plans for g in p.groups)
    summary = schedule_summary(bench_schedule(schedule_config("none", **knobs), [1, 2, 3], 3, 2, 12, 0), [1, 2, 3])
    assert summary["staleness_max"] >= 1 and abs(sum(summary["share_by_prompt"]) - 1) < 1e-12


def test_behaviour_logp_uses_each_tokens_version():
    """A group whose 3 tokens came from versions 0, 2, 1: the behaviour log-prob of token t is
    that of snapshot v_t, which here are distinct constant-logit tables."""
    problem = chain_prompts_problem(ChainPromptsEnv(horizons=[3]))
    snaps = {v: torch.zeros(2, problem.n_states, 3, dtype=F64) for v in range(3)}
    for v in range(3):
        snaps[v][..., 0] = float(v)  # action 0 has logit v everywhere
    tok = behaviour_token_logp(problem, snaps, 0, [0, 2, 1])  # [R, 27, 3]
    expect = {v: torch.log_softmax(torch.tensor([float(v), 0.0, 0.0], dtype=F64), -1) for v in range(3)}
    for m in range(27):
        for t, v in enumerate([0, 2, 1]):
            assert_close(tok[:, m, t], expect[v][problem.actions[0, m, t]].expand(2), rtol=0, atol=1e-15)
    assert_close(tok.sum(-1).logsumexp(-1), torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)


def test_group_draws_depend_on_seed_and_admission_index_only():
    problem = chain_prompts_problem(ChainPromptsEnv(horizons=[2, 3]))
    snaps = {0: torch.randn(4, problem.n_states, 3, dtype=F64, generator=torch.Generator().manual_seed(0))}

    def plan(groups):
        return StepPlan(step=0, metrics={}, groups=[GroupRecord(n=n, prompt=p, admitted_at=0.0,
                                                                token_versions=[0] * (p + 2), lengths=[p + 2] * 5)
                                                    for n, p in groups])

    _, out_a, rew_a, lb_a = sample_batch(problem, plan([(7, 1), (3, 0)]), snaps, 5, run_seed=11)
    _, out_b, rew_b, lb_b = sample_batch(problem, plan([(9, 0), (7, 1)]), snaps, 5, run_seed=11)
    assert torch.equal(out_a[:, 0], out_b[:, 1]) and torch.equal(rew_a[:, 0], rew_b[:, 1])
    assert torch.equal(lb_a[:, 0], lb_b[:, 1])
    _, out_c, _, _ = sample_batch(problem, plan([(7, 1)]), snaps, 5, run_seed=12)
    assert not torch.equal(out_a[:, 0], out_c[:, 0])


def test_sync_schedule_is_on_policy_for_every_correction():
    """On the synchronous schedule the behaviour, proximal and current log-probs coincide, so
    decoupled_tis (w = 1, rho = 1) trains bitwise like rec_oneside_nois; a stale schedule differs."""
    problem = chain_prompts_problem(ChainPromptsEnv(horizons=[1, 2, 3]))
    init = torch.randn(3, problem.n_states, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    knobs = dict(eta=1, max_inflight=6, weight_update="inflight", recompute_kv_on_update=False, starve_after=3,
                 costs=_costs(), groups_per_step=3)
    out = {}
    for name in ("sync", "none"):
        plans = bench_schedule(schedule_config(name, **knobs), [1, 2, 3], 3, 4, 12, 0)
        for preset in ("rec_oneside_nois", "decoupled_tis"):
            out[(name, preset)] = run_schedule(problem, get_algorithm(preset), plans, init, group_size=4, lr=0.3)
    for key in ("reward/expected", "reward/by_prompt", "policy/entropy"):
        assert torch.equal(out[("sync", "rec_oneside_nois")][key], out[("sync", "decoupled_tis")][key])
    assert not torch.equal(out[("none", "rec_oneside_nois")]["reward/expected"],
                           out[("none", "decoupled_tis")]["reward/expected"])
    curve = out[("sync", "rec_oneside_nois")]["reward/expected"]
    assert curve.shape == (13, 3) and (curve[-1] > curve[0]).all()  # it learns


def test_shipped_yaml_parse_and_bad_values_are_named(capsys):
    assert {p.name for p in ASYNC_CONFIGS} >= {"default.yaml", "quick.yaml"}
    for path in ASYNC_CONFIGS:
        cfg = config_from_namespace(build_parser().parse_args(["async", "--config", BASE, "--config", str(path)])
                                    ["async"], AsyncBenchConfig)
        assert cfg.schedules[0] == "sync" and cfg.groups_per_step % len(cfg.horizons) == 0
    cfg = config_from_namespace(build_parser().parse_args(["async", "--config", BASE, "--costs.train_c", "2.5"])
                                ["async"], AsyncBenchConfig)
    assert cfg.costs.train_c == 2.5 and cfg.costs.decode_a == 1.0
    for flag, value, needle in [
        ("--schedules", "[weekly]",
         "schedules='weekly' is not valid; accepted: sync, pace, drop, drop_norequeue, none"),
        ("--groups_per_step", "3", "groups_per_step=3 is not valid; accepted: a multiple of the 4 prompts"),
        ("--horizons", "[2, 9]", "horizons=9 is not valid; accepted: integers in [1, 7]"),
        ("--exact_steps", "100", "exact_steps=100 is not valid; accepted: an integer in [0, steps - exact_start]"),
        ("--weight_update", "eager", "weight_update='eager' is not valid; accepted: inflight, drain"),
        ("--max_staleness", "-1", "max_staleness=-1 is not valid; accepted: an integer >= 0"),
        ("--costs.decode_a", "0", "costs.decode_a=0"),
        ("--costs.train_e", ".inf", "costs.train_e=inf is not valid"),
    ]:
        with pytest.raises(SystemExit):
            main(["async", "--config", BASE, flag, value])
        err = capsys.readouterr().err
        assert needle in err, (flag, err)
        assert "model.clock" not in err


def test_async_command_end_to_end(tmp_path, capsys):
    """The real command on a tiny bench: report sections, the exact tables' identities, the PNG."""
    assert main(["async", "--config", BASE, "--seeds", "2", "--steps", "8", "--presets", "[rec_oneside_nois]",
                 "--schedules", "[pace, drop]", "--horizons", "[1, 2, 3]", "--groups_per_step", "3",
                 "--group_size", "2", "--max_inflight", "6", "--exact_start", "2", "--exact_steps", "3",
                 "--out_dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err and "pace            rec_oneside_nois" in err
    report = (tmp_path / "async.md").read_text()
    for section in ("## Schedules (exact", "## Training, 2 seeds", "## Which prompts does a schedule train?",
                    "## Expected gradient against the synchronous loop",
                    "| sync | plain (rec_oneside_nois) | +1.0000 |"):
        assert section in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["schedule"] for r in summary["schedules"]] == ["sync", "pace", "drop"]
    assert len(summary["exact"]) == 3 * 5 and len(summary["training"]) == 3
    rows = {(r["schedule"], r["loss"]): r for r in summary["exact"]}
    for s in ("sync", "pace", "drop"):
        assert abs(rows[(s, "sequence IS, no cap")]["relerr_trained"]
                   - rows[(s, "same prompts, on-policy tokens")]["relerr_trained"]) < 1e-10
    assert (tmp_path / "reward_async.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
