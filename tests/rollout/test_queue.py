"""The rollout queue and its off-policy schedule, run through a real Lightning fit.

For each paper setting the version of every sample trained on at step t must equal
``behavior_version(t, k, d)`` — this catches Lightning's batch prefetch, which would make
on-policy silently one step stale if rollouts came through the DataLoader.
"""

import pytest

from conftest import fit_micro
from reclight.rollout.queue import RolloutQueue, rollout_seed
from reclight.sync import SyncConfig, behavior_version

STEPS = 24


@pytest.mark.parametrize(
    "k, d, offline",
    [(1, 0, False), (20, 0, False), (1, 10, False), (1, 0, True)],
    ids=["on_policy", "periodic", "lag", "offline"],
)
def test_versions_follow_behavior_version(tmp_path, k, d, offline):
    module, rec = fit_micro(tmp_path, STEPS, sync=SyncConfig(sync_interval=k, sync_offset=d, offline=offline))
    queue = module.rollouts
    d_eff = STEPS if offline else d
    assert sorted(rec.versions) == list(range(STEPS))
    for t, versions in rec.versions.items():
        assert set(versions) == {behavior_version(t, k, d_eff)}, f"step {t}: {versions}"
    # The engine ran ahead at most d + k batches, never kept a copy per pending step.
    assert queue.max_queue_len <= d_eff + k if not offline else queue.max_queue_len == 1
    expected_syncs = len({behavior_version(t, k, d_eff) for t in range(STEPS)} - {0})
    assert queue.num_syncs == expected_syncs
    assert not queue.queue


@pytest.mark.parametrize("k, d, offline", [(3, 2, False), (1, 0, True)], ids=["k3_d2", "offline"])
def test_engine_that_scores_with_the_trainer_gets_every_batch_at_its_sync(tmp_path, monkeypatch, k, d, offline):
    """An engine with ``scores_with_trainer`` (vLLM's recompute_logp_behav) makes the queue
    generate every batch at the step equal to its version (the only moment the trainer's
    weights ARE that version), and the versions trained on still follow behavior_version."""
    generated_at: dict[int, tuple[int, int]] = {}
    real_generate, real_init = RolloutQueue._generate, RolloutQueue.__init__
    holder = {}

    def init(self, engine, *args, **kwargs):
        engine.scores_with_trainer = True  # the engine says so; the queue decides
        real_init(self, engine, *args, **kwargs)
        holder["queue"] = self

    def generate(self, step):
        generated_at[step] = (holder["module"].global_step, self.engine.version)
        real_generate(self, step)

    monkeypatch.setattr(RolloutQueue, "__init__", init)
    monkeypatch.setattr(RolloutQueue, "_generate", generate)
    from reclight.trainer.module import RLModule

    real_fit_start = RLModule.on_fit_start
    monkeypatch.setattr(RLModule, "on_fit_start", lambda self: (holder.setdefault("module", self), real_fit_start(self)))
    steps = 12
    module, rec = fit_micro(tmp_path, steps, sync=SyncConfig(sync_interval=k, sync_offset=d, offline=offline))
    assert module.rollouts.eager
    d_eff = steps if offline else d
    assert sorted(generated_at) == list(range(steps))
    for t, (trainer_step, version) in generated_at.items():
        assert version == behavior_version(t, k, d_eff) == trainer_step, (t, trainer_step, version)
        assert set(rec.versions[t]) == {version}
    assert module.rollouts.max_queue_len == (steps if offline else d_eff + k)


def test_on_policy_ratios_are_one_and_lag_ratios_are_not(tmp_path):
    """On-policy in fp32 the engine copy equals the policy, so rho = 1 (1e-4); with a lag of
    10 steps at lr 3e-2 the weights have moved and rho must differ (so the check can fail)."""
    _, rec = fit_micro(tmp_path / "on", 6)
    for t, (lo, hi) in rec.ratio.items():
        assert abs(lo - 1) < 1e-4 and abs(hi - 1) < 1e-4, (t, lo, hi)
    _, rec = fit_micro(tmp_path / "lag", 14, sync=SyncConfig(sync_interval=1, sync_offset=10))
    lo, hi = rec.ratio[13]
    assert hi - lo > 1e-2, (lo, hi)


def test_rollout_seed_depends_on_seed_step_and_rank_only():
    """(seed * 1_000_003 + step + 7_919 * rank) mod 2^63, by hand for three cases."""
    assert rollout_seed(0, 0) == 0
    assert rollout_seed(2, 5, rank=1) == 2 * 1_000_003 + 5 + 7_919
    assert rollout_seed(2**62, 1) == (2**62 * 1_000_003 + 1) % 2**63


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match=r"model\.sync\.sync_interval=0 is not valid; accepted: an integer >= 1"):
        SyncConfig(sync_interval=0)
    with pytest.raises(ValueError, match=r"model\.sync\.sync_offset=-1 is not valid; accepted: an integer >= 0"):
        SyncConfig(sync_offset=-1)
    with pytest.raises(ValueError, match=r"model\.sync\.offline=1 is not valid; accepted: true or false"):
        SyncConfig(offline=1)
