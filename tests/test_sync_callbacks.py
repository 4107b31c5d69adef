"""The weight-sync schedule, run through a real Lightning fit.

For each paper setting the version of every sample trained on at step t must equal
``behavior_version(t, k, d)`` — this catches Lightning's batch prefetch, which would make
on-policy silently one step stale if rollouts came through the DataLoader.
"""

import pytest

from reclight.callbacks import WeightSync
from reclight.sync import behavior_version
from test_module_fixtures import fit_micro

STEPS = 24


@pytest.mark.parametrize(
    "k, d, offline",
    [(1, 0, False), (20, 0, False), (1, 10, False), (1, 0, True)],
    ids=["on_policy", "periodic", "lag", "offline"],
)
def test_versions_follow_behavior_version(tmp_path, k, d, offline):
    sync = WeightSync(sync_interval=k, sync_offset=d, offline=offline)
    _, rec, sync = fit_micro(tmp_path, STEPS, sync=sync)
    d_eff = STEPS if offline else d
    assert sorted(rec.versions) == list(range(STEPS))
    for t, versions in rec.versions.items():
        assert set(versions) == {behavior_version(t, k, d_eff)}, f"step {t}: {versions}"
    # The engine ran ahead at most d + k batches, never kept a copy per pending step.
    assert sync.max_queue_len <= d_eff + k if not offline else sync.max_queue_len == 1
    expected_syncs = len({behavior_version(t, k, d_eff) for t in range(STEPS)} - {0})
    assert sync.num_syncs == expected_syncs
    assert not sync.queue


@pytest.mark.parametrize("k, d, offline", [(3, 2, False), (1, 0, True)], ids=["k3_d2", "offline"])
def test_eager_generation_happens_while_the_trainer_holds_the_version(tmp_path, k, d, offline):
    """eager=True: every batch is generated at the step equal to its version (the only moment
    the trainer's weights ARE that version, which trainer-side re-scoring of logp_behav needs),
    and the versions trained on still follow behavior_version(t, k, d)."""
    generated_at: dict[int, tuple[int, int]] = {}

    class Probe(WeightSync):
        def _generate(self, step, module, datamodule):
            generated_at[step] = (module.global_step, module.engine.version)
            super()._generate(step, module, datamodule)

    steps = 12
    sync = Probe(sync_interval=k, sync_offset=d, offline=offline, eager=True)
    _, rec, sync = fit_micro(tmp_path, steps, sync=sync)
    d_eff = steps if offline else d
    assert sorted(generated_at) == list(range(steps))
    for t, (trainer_step, version) in generated_at.items():
        assert version == behavior_version(t, k, d_eff) == trainer_step, (t, trainer_step, version)
        assert set(rec.versions[t]) == {version}
    assert sync.max_queue_len == (steps if offline else d_eff + k)


def test_on_policy_ratios_are_one_and_lag_ratios_are_not(tmp_path):
    """On-policy in fp32 the engine copy equals the policy, so rho = 1 (1e-4); with a lag of
    10 steps at lr 3e-2 the weights have moved and rho must differ (so the check can fail)."""
    _, rec, _ = fit_micro(tmp_path / "on", 6)
    for t, (lo, hi) in rec.ratio.items():
        assert abs(lo - 1) < 1e-4 and abs(hi - 1) < 1e-4, (t, lo, hi)
    _, rec, _ = fit_micro(tmp_path / "lag", 14, sync=WeightSync(sync_interval=1, sync_offset=10))
    lo, hi = rec.ratio[13]
    assert hi - lo > 1e-2, (lo, hi)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match=r"sync_interval=0 .*integer >= 1"):
        WeightSync(sync_interval=0)
    with pytest.raises(ValueError, match=r"sync_offset=-1 .*integer >= 0"):
        WeightSync(sync_offset=-1)
