"""The off-policy schedule (ALGORITHMS.md section 4): which policy version generated the
batch that training step t consumes.

The rollout engine receives the trainer's weights every ``sync_interval`` (k) steps and runs
``sync_offset`` (d) steps ahead. The LLM trainer's callbacks and the bandit bench both use this
one function, so "sync_interval=20" means the same thing in both. Offline training is
``sync_offset >= total steps``: every batch then comes from theta_0.

Imports only the standard library.
"""

from __future__ import annotations

PAPER_SETTINGS: dict[str, tuple[int, int | None]] = {
    "on_policy": (1, 0),
    "periodic": (20, 0),
    "lag": (1, 10),
    "offline": (1, None),  # None: sync_offset = total steps
}
"""The paper's four settings as ``(sync_interval, sync_offset)``."""


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid; accepted: an integer >= {minimum}")
    return value


def behavior_version(step: int, sync_interval: int, sync_offset: int) -> int:
    """The policy version v that generated the batch of 0-indexed training step ``step``::

        v = 0                          if t < d
        v = k * floor((t - d) / k)     otherwise

    with t = step, k = sync_interval >= 1, d = sync_offset >= 0. Once t >= d the staleness
    t - v lies in [d, d + k - 1].
    """
    t = _check_int("step", step, 0)
    k = _check_int("sync_interval", sync_interval, 1)
    d = _check_int("sync_offset", sync_offset, 0)
    return 0 if t < d else k * ((t - d) // k)


def staleness(step: int, sync_interval: int, sync_offset: int) -> int:
    """``step - behavior_version(step, sync_interval, sync_offset)``: how many updates behind
    the behaviour policy is."""
    return step - behavior_version(step, sync_interval, sync_offset)


def resolve_setting(name: str, total_steps: int) -> tuple[int, int]:
    """``(sync_interval, sync_offset)`` of one of ``PAPER_SETTINGS`` for a run of
    ``total_steps`` steps (offline becomes ``sync_offset = total_steps``)."""
    if name not in PAPER_SETTINGS:
        raise ValueError(
            f"sync setting {name!r} is unknown; accepted: {', '.join(PAPER_SETTINGS)}"
        )
    k, d = PAPER_SETTINGS[name]
    return k, _check_int("total_steps", total_steps, 1) if d is None else d
