"""Guards that keep bad input from corrupting a run (the full list: ``docs/reliability.md``).

Each guard either stops the run with a message that names the setting to change, or applies a
documented fallback that is logged as a metric:

- :func:`check_reward_failures`: samples whose reward function raised, or returned NaN/inf, a
  non-number or a magnitude beyond ``guards.max_abs_reward``, are already excluded from the
  baseline and the loss (``reclight.rollout.scoring.score``); past
  ``guards.max_failed_reward_frac`` of a step's samples the run stops.
- :class:`NonFiniteGuard`: a step whose loss or gradient norm is not finite is skipped (no
  parameter or optimizer-state change); ``guards.max_consecutive_skips`` such steps in a row
  stop the run.
"""

from __future__ import annotations

import torch
from torch import Tensor


# -- rewards ------------------------------------------------------------------------------------
def check_reward_failures(num_failed: int, num_samples: int, step: int, max_failed_reward_frac: float) -> None:
    """Stop the run when more than ``max_failed_reward_frac`` of a step's samples have no valid
    reward (the reward function raised, or returned NaN/inf, a non-number or an absurd magnitude)."""
    if num_samples > 0 and num_failed / num_samples > max_failed_reward_frac:
        raise RuntimeError(
            f"step {step}: the reward function failed (raised, or returned NaN/inf, a non-number or a magnitude "
            f"beyond model.guards.max_abs_reward) for {num_failed} of "
            f"{num_samples} samples ({num_failed / num_samples:.0%}), more than "
            f"model.guards.max_failed_reward_frac={max_failed_reward_frac:g}; fix the task's reward function (the first "
            "error of each kind is logged by reclight.rollout), or raise model.guards.max_failed_reward_frac (1.0 never "
            "stops)"
        )


# -- numerics -----------------------------------------------------------------------------------
class NonFiniteGuard:
    """Counts steps whose loss or gradient norm is not finite.

    ``update`` returns True when the step must be skipped (the caller drops the gradients, so the
    optimizer leaves parameters and its state untouched) and raises once ``max_consecutive``
    steps in a row were skipped. Both counters are part of the checkpoint (``state_dict``).
    """

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def update(self, skip: bool, step: int, loss: float, grad_norm: float) -> bool:
        if not skip:
            self.consecutive = 0
            return False
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"step {step}: {self.consecutive} steps in a row had a non-finite loss or gradient (this one: "
                f"loss={loss}, grad norm={grad_norm}); stopping at model.guards.max_consecutive_skips="
                f"{self.max_consecutive}. Each was skipped without changing the weights or the optimizer state; "
                "lower model.optim.lr, check the rewards' scale, or raise model.guards.max_consecutive_skips"
            )
        return True

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total = int(state["total"])
        self.consecutive = int(state["consecutive"])


def is_finite(*values: Tensor) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values)
