"""The bench runs the project's shared code: the mini-batches and the merge of per-update metrics
of reclight/updates.py, and every preset of reclight.algorithms that needs no reference policy
(with the episode length T as the L of Dr. GRPO's constant normalizer)."""

import pytest
import torch

import bandits.async_bench as async_bench
import bandits.simulate as simulate
import reclight.updates as updates_lib
from bandits.async_bench import bench_schedule, run_schedule, schedule_config
from bandits.envs import ChainEnv, ChainPromptsEnv
from bandits.problems import bandit_problem, chain_problem, chain_prompts_problem
from reclight.algorithms import PRESETS
from reclight.clock import ClockCosts

F64 = torch.float64
BENCH_PRESETS = [name for name, cfg in PRESETS.items() if not cfg.needs_reference]


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(module, name, spy)
    return calls


def test_bench_uses_the_shared_rows_and_merge(monkeypatch):
    """2 epochs x 2 mini-batches of the 4 groups: the bench trains rows [0, 2], [1, 3], [0, 2],
    [1, 3] (reclight.updates.update_rows), and its step metrics are the shared merge of the 4
    updates' per-row metrics: ``ratio/max`` the max and ``ratio/min`` the min over updates (the
    bench's own merge had no ``*min`` branch: it averaged the minima)."""
    assert simulate.merge_update_metrics is updates_lib.merge_update_metrics
    rows = _spy(monkeypatch, simulate, "update_rows")
    losses = _spy(monkeypatch, simulate, "per_row_policy_loss")
    merges = _spy(monkeypatch, simulate, "merge_update_metrics")
    problem = bandit_problem(4, 5, [0, 1], "bernoulli")
    init = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    result = simulate.run_preset(problem, PRESETS["rec_oneside_is"], "rec_oneside_is", {"on_policy": (1, 0)}, init,
                                 steps=3, group_size=4, lr=0.3, seed=0, epochs=2, mini_batches=2)
    assert len(rows) == 3 and [r.tolist() for r in rows[0][2]] == [[0, 2], [1, 3]] * 2
    assert len(losses) == 3 * 4 and len(merges) == 3
    for step, (args, _, merged) in enumerate(merges):
        per_update = [m for _, _, (_, m) in losses[4 * step: 4 * step + 4]]
        assert args[0] == per_update
        stacked = {k: torch.stack([m[k] for m in per_update]) for k in ("ratio/min", "ratio/max", "clip/frac")}
        assert torch.equal(merged["ratio/min"], stacked["ratio/min"].amin(0))
        assert torch.equal(merged["ratio/max"], stacked["ratio/max"].amax(0))
        assert torch.equal(merged["clip/frac"], stacked["clip/frac"].mean(0))
        assert torch.equal(result.history["ratio/max"][step, 0], stacked["ratio/max"].amax(0))
    # the later updates are off-policy: their minima differ from the first's, so min != mean here
    last = torch.stack([m["ratio/min"] for _, _, (_, m) in losses[-4:]])
    assert (last.amin(0) < last.mean(0)).all()


@pytest.mark.parametrize("preset", BENCH_PRESETS)
def test_every_preset_without_a_reference_runs_one_step_in_the_bench(preset, monkeypatch):
    """One step of run_preset on the bandit (T = 1) and the chain (T = 3), and of the
    asynchronous bench on chain prompts of horizons 1 and 2 (T = 2): finite metrics, the policy
    moved, and ``norm_length`` = T at every loss call (Dr. GRPO's L; it crashed without)."""
    cfg = PRESETS[preset]
    calls = _spy(monkeypatch, simulate, "per_row_policy_loss")
    for problem in (bandit_problem(4, 5, [0, 1], "none"), chain_problem(ChainEnv(horizon=3), 4)):
        init = torch.randn(2, problem.n_states, problem.n_actions, generator=torch.Generator().manual_seed(0),
                           dtype=F64)
        calls.clear()
        result = simulate.run_preset(problem, cfg, preset, {"on_policy": (1, 0)}, init, steps=1, group_size=4,
                                     lr=0.3, seed=0)
        assert all(torch.isfinite(v).all() for v in result.history.values()), preset
        expected = result.history["reward/expected"]  # [2, 1, seeds]: before and after the step
        assert not torch.equal(expected[0], expected[1]), preset
        assert [kw["norm_length"] for _, kw, _ in calls] == [problem.horizon]
    calls = _spy(monkeypatch, async_bench, "per_row_policy_loss")
    prompts = chain_prompts_problem(ChainPromptsEnv(horizons=[1, 2], reward_noise="none"))
    knobs = dict(eta=0, max_inflight=2, weight_update="drain", recompute_kv_on_update=False, starve_after=3,
                 costs=ClockCosts(), groups_per_step=2)
    plans = bench_schedule(schedule_config("sync", **knobs), [1, 2], 2, 4, 1, 0)
    init = torch.randn(2, prompts.n_states, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = run_schedule(prompts, cfg, plans, init, group_size=4, lr=0.3, seed=0)
    assert torch.isfinite(out["reward/expected"]).all() and torch.isfinite(out["clip/frac"]).all()
    assert [kw["norm_length"] for _, kw, _ in calls] == [2]
