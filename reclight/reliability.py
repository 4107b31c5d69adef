"""Guards that keep bad input from corrupting a run, and the RNG state of an exact resume.

Each guard either stops the run with a message that names the setting to change, or applies a
documented fallback that is logged as a metric (the full list: ``docs/reliability.md``):

- :func:`check_reward_failures`: samples whose reward function raised or returned NaN/inf are
  already excluded from the baseline and the loss (``reclight.rollout.score``); past
  ``max_failed_reward_frac`` of a step's samples the run stops.
- :class:`NonFiniteGuard`: a step whose loss or gradient norm is not finite is skipped (no
  parameter or optimizer-state change); ``max_consecutive_skips`` such steps in a row stop the run.
- :func:`rollout_health`: empty responses, responses cut at ``max_new_tokens`` and groups with
  identical rewards (advantage exactly 0) are trained on as they are, and counted.
- :func:`rng_state` / :func:`set_rng_state`: every global RNG (torch CPU and CUDA, Python's
  ``random``, NumPy's legacy global one), as plain tensors and tuples the safe loader accepts.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch
from torch import Tensor


# -- RNG state ----------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """All global RNG states of this process (the ones a checkpoint must carry)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (entries absent from ``state`` are left alone)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))


# -- rewards ------------------------------------------------------------------------------------
def check_reward_failures(num_failed: int, num_samples: int, step: int, max_failed_reward_frac: float) -> None:
    """Stop the run when more than ``max_failed_reward_frac`` of a step's samples have no valid
    reward (the reward function raised, or returned NaN or inf)."""
    if num_samples > 0 and num_failed / num_samples > max_failed_reward_frac:
        raise RuntimeError(
            f"step {step}: the reward function failed (raised, or returned NaN/inf) for {num_failed} of "
            f"{num_samples} samples ({num_failed / num_samples:.0%}), more than "
            f"model.max_failed_reward_frac={max_failed_reward_frac:g}; fix the task's reward function (the first "
            "error of each kind is logged by reclight.rollout), or raise max_failed_reward_frac (1.0 never stops)"
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
                f"loss={loss}, grad norm={grad_norm}); stopping at model.max_consecutive_skips="
                f"{self.max_consecutive}. Each was skipped without changing the weights or the optimizer state; "
                "lower model.lr, check the rewards' scale, or raise max_consecutive_skips"
            )
        return True

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total = int(state["total"])
        self.consecutive = int(state["consecutive"])


def is_finite(*values: Tensor) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values)


# -- degenerate rollouts ------------------------------------------------------------------------
@torch.no_grad()
def rollout_health(
    response_ids: Tensor,  # [B, K, T] long
    response_mask: Tensor,  # [B, K, T] bool
    rewards: Tensor,  # [B, K]
    reward_valid: Tensor,  # [B, K] bool
    eos_ids: list[int],
    max_new_tokens: int,
) -> dict[str, Tensor]:
    """Fractions of degenerate samples in a rollout batch (all trained on as they are):

    - ``response/empty_frac``: responses with no token besides a final EOS (the EOS token still
      gets the sample's advantage: ending at once is a choice the policy made);
    - ``response/truncated_frac``: responses that hit ``max_new_tokens`` without an EOS (cut off;
      the task scores the cut text, usually as wrong);
    - ``reward/uniform_groups_frac``: groups whose valid rewards are all equal (or that have fewer
      than 2 valid rewards): their advantages are exactly 0, so only a regularizer moves them.
    """
    lengths = response_mask.sum(-1)  # [B, K]
    eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)) & response_mask
    has_eos = eos.any(-1)  # [B, K]
    empty = (lengths - has_eos.long()) <= 0
    truncated = ~has_eos & (lengths >= max_new_tokens)
    big = torch.finfo(rewards.dtype).max
    r_max = torch.where(reward_valid, rewards, -big).amax(-1)
    r_min = torch.where(reward_valid, rewards, big).amin(-1)
    uniform = (reward_valid.sum(-1) < 2) | (r_max == r_min)  # [B]
    return {
        "response/empty_frac": empty.float().mean(),
        "response/truncated_frac": truncated.float().mean(),
        "reward/uniform_groups_frac": uniform.float().mean(),
    }


# -- configuration ------------------------------------------------------------------------------
def check_model_path(name_or_path: str | None, field: str = "model.model_name_or_path") -> None:
    """A value that is clearly a local path (absolute, ``./``, ``../``, ``~``, or more than one
    ``/``) must be a folder with ``config.json``; checked before anything is loaded. Anything
    else (``org/name``) is a Hugging Face id, resolved by ``from_pretrained`` as usual."""
    if name_or_path is None:
        return
    from pathlib import Path

    p = Path(name_or_path).expanduser()
    local = p.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1 or p.exists()
    accepted = ("accepted: a folder written by save_pretrained (holding config.json), a Hugging Face model id "
                "such as 'Qwen/Qwen2.5-0.5B-Instruct', or null for the embedded tiny model")
    if local and not p.is_dir():
        raise ValueError(f"{field}={name_or_path!r} is not valid: no such folder; {accepted}")
    if local and not (p / "config.json").is_file():
        raise ValueError(f"{field}={name_or_path!r} is not valid: the folder has no config.json; {accepted}")
