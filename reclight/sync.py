"""The off-policy schedule (docs/algorithms.md section 4): which policy version generated the
batch that training step t consumes, and which versions a run must therefore keep.

The rollout engine receives the trainer's weights every ``sync_interval`` (k) steps and runs
``sync_offset`` (d) steps ahead. The LLM trainer's rollout queue and the bandit bench both use
these functions, so "sync_interval=20" means the same thing in both. Offline training is
``sync_offset >= total steps``: every batch then comes from theta_0.

Imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

from reclight.checks import check_bool, check_int

PAPER_SETTINGS: dict[str, tuple[int, int | None]] = {
    "on_policy": (1, 0),
    "periodic": (20, 0),
    "lag": (1, 10),
    "offline": (1, None),  # None: sync_offset = total steps
}
"""The paper's four settings as ``(sync_interval, sync_offset)``."""


def behavior_version(step: int, sync_interval: int, sync_offset: int) -> int:
    """The policy version v that generated the batch of 0-indexed training step ``step``::

        v = 0                          if t < d
        v = k * floor((t - d) / k)     otherwise

    with t = step, k = sync_interval >= 1, d = sync_offset >= 0. Once t >= d the staleness
    t - v lies in [d, d + k - 1].
    """
    t = check_int("step", step, minimum=0)
    k = check_int("sync_interval", sync_interval, minimum=1)
    d = check_int("sync_offset", sync_offset, minimum=0)
    return 0 if t < d else k * ((t - d) // k)


def staleness(step: int, sync_interval: int, sync_offset: int) -> int:
    """``step - behavior_version(step, sync_interval, sync_offset)``: how many updates behind
    the behaviour policy is."""
    return step - behavior_version(step, sync_interval, sync_offset)


def version_needed(version: int, sync_interval: int, sync_offset: int, total_steps: int) -> bool:
    """Whether some step t < ``total_steps`` trains on a batch from theta_``version``.

    theta_0 always is (the first step's batch). For v > 0: behavior_version(t) = v exactly for
    t in [v + d, v + d + k) when v is a multiple of k, so v is needed iff v % k == 0 and
    v + d < total_steps. The rollout queue pushes weights into the engine only for such
    versions; the bench keeps only such snapshots.
    """
    v = check_int("version", version, minimum=0)
    k = check_int("sync_interval", sync_interval, minimum=1)
    d = check_int("sync_offset", sync_offset, minimum=0)
    total = check_int("total_steps", total_steps, minimum=1)
    return v == 0 or (v % k == 0 and v + d < total)


def resolve_setting(name: str, total_steps: int) -> tuple[int, int]:
    """``(sync_interval, sync_offset)`` of one of ``PAPER_SETTINGS`` for a run of
    ``total_steps`` steps (offline becomes ``sync_offset = total_steps``)."""
    if name not in PAPER_SETTINGS:
        raise ValueError(
            f"sync setting {name!r} is unknown; accepted: {', '.join(PAPER_SETTINGS)}"
        )
    k, d = PAPER_SETTINGS[name]
    return k, check_int("total_steps", total_steps, minimum=1) if d is None else d


@dataclass(frozen=True)
class SyncConfig:
    """When the rollout engine receives the trainer's weights (docs/algorithms.md section 4)."""

    sync_interval: int = 1
    """k: push the trainer's weights into the engine every k steps (1 = every step)."""
    sync_offset: int = 0
    """d: the engine runs d steps ahead (0 = no lag): step t trains on a batch of theta_v,
    v = behavior_version(t, k, d), staleness in [d, d + k - 1] once t >= d."""
    offline: bool = False
    """Every batch comes from the initial policy (d = the run's total steps)."""

    def __post_init__(self) -> None:
        check_int("model.sync.sync_interval", self.sync_interval, minimum=1)
        check_int("model.sync.sync_offset", self.sync_offset, minimum=0)
        check_bool("model.sync.offline", self.offline)

    def offset(self, total_steps: int) -> int:
        """The effective d of a run of ``total_steps`` steps (offline: at least total_steps)."""
        return max(total_steps, self.sync_offset) if self.offline else self.sync_offset

    def version_for(self, step: int, total_steps: int) -> int:
        """``behavior_version`` of ``step`` in a run of ``total_steps`` steps."""
        return behavior_version(step, self.sync_interval, self.offset(total_steps))
