"""The off-policy schedule behavior_version (docs/algorithms.md section 4)."""

import pytest

from reclight.sync import PAPER_SETTINGS, behavior_version, resolve_setting, staleness


@pytest.mark.parametrize("k", [1, 2, 3, 5, 20])
@pytest.mark.parametrize("d", [0, 1, 4, 10])
def test_staleness_lies_in_d_to_d_plus_k_minus_1(k, d):
    """Once t >= d, v = k*floor((t-d)/k) so t - v = d + ((t-d) mod k) in [d, d+k-1]; before
    that, v = 0. Versions are multiples of k (the engine only ever holds synced weights) and
    never decrease."""
    prev = 0
    for t in range(300):
        v = behavior_version(t, k, d)
        assert v % k == 0 and 0 <= v <= t and v >= prev
        prev = v
        if t >= d:
            assert d <= t - v <= d + k - 1
            assert staleness(t, k, d) == d + (t - d) % k
        else:
            assert v == 0


def test_paper_settings():
    """on-policy (1, 0): v = t; periodic (20, 0): v = 20*floor(t/20); constant lag (1, 10):
    v = max(0, t - 10); offline (d = total steps): v = 0 for every step."""
    total = 100
    assert [behavior_version(t, 1, 0) for t in range(total)] == list(range(total))
    assert [behavior_version(t, 20, 0) for t in (0, 19, 20, 39, 40, 99)] == [0, 0, 20, 20, 40, 80]
    assert [behavior_version(t, 1, 10) for t in (0, 9, 10, 11, 50)] == [0, 0, 0, 1, 40]
    k, d = resolve_setting("offline", total)
    assert (k, d) == (1, total)
    assert {behavior_version(t, k, d) for t in range(total)} == {0}
    assert resolve_setting("periodic", total) == PAPER_SETTINGS["periodic"] == (20, 0)


@pytest.mark.parametrize(
    "args, field",
    [((-1, 1, 0), "step"), ((0, 0, 0), "sync_interval"), ((0, 1, -1), "sync_offset"), ((0, 1.5, 0), "sync_interval"), ((0, True, 0), "sync_interval")],
)
def test_invalid_schedule_arguments(args, field):
    with pytest.raises(ValueError, match=rf"^{field}=.* is not valid; accepted: an integer >= "):
        behavior_version(*args)


def test_unknown_setting():
    with pytest.raises(ValueError, match="sync setting 'weekly' is unknown; accepted: on_policy, periodic, lag, offline"):
        resolve_setting("weekly", 10)


@pytest.mark.parametrize("k, d, total", [(1, 0, 30), (20, 0, 50), (1, 10, 30), (3, 2, 17), (1, 30, 30), (4, 5, 9)])
def test_version_needed_is_exactly_the_versions_some_step_trains_on(k, d, total):
    """The rule the rollout queue syncs by and the bench keeps snapshots by: v is needed iff
    some step t < total has behavior_version(t) == v (checked against that definition)."""
    from reclight.sync import version_needed

    used = {behavior_version(t, k, d) for t in range(total)}
    assert {v for v in range(total) if version_needed(v, k, d, total)} == used


def test_sync_config_offline_offset():
    from reclight.sync import SyncConfig

    assert SyncConfig(offline=True).offset(40) == 40 and SyncConfig(sync_offset=50, offline=True).offset(40) == 50
    assert SyncConfig(sync_interval=3, sync_offset=2).version_for(7, 100) == behavior_version(7, 3, 2) == 3
