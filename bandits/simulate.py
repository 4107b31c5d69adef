"""Stochastic training runs: one preset, all off-policy settings and all seeds in one tensor.

The leading axis of every tensor is R = n_settings x n_seeds (setting-major). Row r trains its
own tabular policy ``logits[r]`` [S, A]; seeds are paired across settings and presets (seed n
has the same environment and the same initial policy everywhere), so differences between
presets are paired differences.

One training step t, for every row at once:

1. v = ``reclight.sync.behavior_version(t, k, d)`` of the row's setting; the behaviour policy
   is the stored snapshot theta_v (a ring keeps only the versions a later step will read).
2. B groups of K outcomes are sampled from theta_v; ``logp_behav`` is recorded from it.
3. ``group_advantages`` on the ``[R*B, K]`` rewards (rows are independent groups, so the
   flattening is exact), then ``policy_loss`` vmapped over R: each row gets its own
   ``token_mean`` denominator, exactly as if it were trained alone.
4. The sum over rows of the per-row losses is backpropagated (row r's logits only receive
   row r's gradient) and Adam or SGD steps every row (both act elementwise, so batching rows
   changes nothing). With ``epochs`` x ``mini_batches`` > 1 this is repeated per mini-batch of
   whole groups (groups m, m + M, ...), the ratio recomputed from the current logits each time.

Departures from an LLM run, on purpose: the policy is tabular (no generalisation between
contexts), the reward is exact Bernoulli(p) of the outcome, and the metrics ``reward/expected``,
``kl/opt`` and ``policy/entropy`` are exact expectations under the current policy, not
estimates from the batch. Every episode has the same length T, which stands for the trainer's
``max_new_tokens`` where a loss needs one (the L of ``seq_mean_token_sum_norm``, Dr. GRPO).
The mini-batch rows and the merge of the updates' metrics are the trainer's own
(``reclight.updates``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from bandits.problems import TabularProblem
from reclight.advantages import group_advantages, shape_rewards
from reclight.algorithms import AlgorithmConfig
from reclight.checks import check_choice, check_int
from reclight.losses import policy_loss
from reclight.sync import behavior_version, version_needed
from reclight.updates import check_mini_batches, merge_update_metrics, update_rows

OPTIMIZERS = ("adam", "sgd")
EXACT_KEYS = ("reward/expected", "kl/opt", "policy/entropy")
STEP_KEYS = ("clip/frac", "rollout/staleness", "loss/policy", "loss/reg", "ratio/max", "adv/abs_mean")


class SnapshotRing:
    """Past policies, per setting, kept only while a later step will sample from them."""

    def __init__(self, schedules: list[tuple[int, int]], seeds: int, total_steps: int) -> None:
        self.schedules, self.seeds, self.total_steps = schedules, seeds, total_steps
        self.store: list[dict[int, Tensor]] = [{} for _ in schedules]

    def record(self, version: int, logits: Tensor) -> None:
        """Store theta_version (logits [R, S, A]) for the settings that will read it."""
        for i, (k, d) in enumerate(self.schedules):
            if version_needed(version, k, d, self.total_steps):
                rows = slice(i * self.seeds, (i + 1) * self.seeds)
                self.store[i][version] = logits[rows].detach().clone()

    def behaviour(self, step: int) -> tuple[Tensor, Tensor]:
        """``(logits_behav [R, S, A], staleness [R])`` of training step ``step``; then forgets
        versions no later step needs."""
        parts, stale = [], []
        for i, (k, d) in enumerate(self.schedules):
            version = behavior_version(step, k, d)
            parts.append(self.store[i][version])
            stale.append(torch.full((self.seeds,), float(step - version)))
            if step + 1 < self.total_steps:
                keep_from = behavior_version(step + 1, k, d)
                for old in [v for v in self.store[i] if v < keep_from]:
                    del self.store[i][old]
        return torch.cat(parts), torch.cat(stale)

    def n_stored(self) -> int:
        return sum(len(s) for s in self.store)


def per_row_policy_loss(
    logp: Tensor,  # [R, B, K, T]
    logp_behav: Tensor,  # [R, B, K, T]
    adv: Tensor,  # [R, B, K]
    mask: Tensor,  # [R, B, K, T] bool
    cfg: AlgorithmConfig,
    logp_prox: Tensor | None = None,  # [R, B, K, T]: the policy at the start of the step
    *,
    norm_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # loss [R], metrics {key: [R]}
    """``reclight.losses.policy_loss`` applied to each row separately (vmapped), so each row's
    ``token_mean`` divides by its own count of kept tokens, as a run of that seed alone would.
    ``norm_length``: L of ``loss_agg: seq_mean_token_sum_norm`` (Dr. GRPO); the bench passes its
    episode length T, its analogue of the trainer's ``max_new_tokens``."""
    if logp_prox is None:
        return vmap(lambda lp, lb, a, m: policy_loss(lp, lb, a, m, cfg, norm_length=norm_length))(
            logp, logp_behav, adv, mask)
    return vmap(lambda lp, lb, a, m, lx: policy_loss(lp, lb, a, m, cfg, logp_prox=lx, norm_length=norm_length))(
        logp, logp_behav, adv, mask, logp_prox)


@dataclass
class RunResult:
    """Histories of one preset on one problem. Exact metrics: ``[steps + 1, n_settings, seeds]``
    (before each update, then after the last); step metrics: ``[steps, n_settings, seeds]``."""

    preset: str
    problem: str
    settings: list[str]
    history: dict[str, Tensor]


def run_preset(
    problem: TabularProblem,
    cfg: AlgorithmConfig,
    preset: str,
    settings: dict[str, tuple[int, int]],
    logits_init: Tensor,  # [seeds, S, A]
    *,
    steps: int,
    group_size: int,
    lr: float,
    optimizer: str = "adam",
    seed: int = 0,
    epochs: int = 1,
    mini_batches: int = 1,
) -> RunResult:
    """Train ``preset`` under every setting ``{name: (sync_interval, sync_offset)}`` for
    ``steps`` steps, all seeds at once. See the module docstring for one step.

    ``epochs`` x ``mini_batches`` optimizer updates per sampled batch (docs/algorithms.md section 6.1), as the
    trainer makes them: mini-batch m holds the groups m, m + M, ... of the step, the ratio is
    recomputed from the current logits at every update, advantages once per batch; versions and
    ``steps`` count batches. ``ratio_anchor: proximal`` measures rho against the logits at the
    start of the step (the trainer's ``logp_prox``)."""
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_int("epochs", epochs, minimum=1)
    check_int("mini_batches", mini_batches, minimum=1)
    n_set, seeds = len(settings), logits_init.shape[0]
    horizon = problem.horizon  # T: the L of seq_mean_token_sum_norm (the trainer's max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    problem = problem.repeat_rows(n_set)
    logits = logits_init.repeat(n_set, 1, 1).clone().requires_grad_(True)  # [R, S, A]
    opt_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    opt = opt_cls([logits], lr=lr)
    logp_opt = problem.optimal_logp(logits.detach())
    ring = SnapshotRing(list(settings.values()), seeds, steps)
    ring.record(0, logits)

    exact: dict[str, list[Tensor]] = {key: [] for key in EXACT_KEYS}
    per_step: dict[str, list[Tensor]] = {key: [] for key in STEP_KEYS}
    for step in range(steps):
        for key, value in problem.exact_metrics(logits.detach(), logp_opt).items():
            exact[key].append(value)
        logits_behav, stale = ring.behaviour(step)
        prompts, outcomes, rewards = problem.sample(logits_behav, group_size, generator)
        rows, n_groups, _ = rewards.shape
        flat = rewards.flatten(0, 1)  # [R*B, K]
        # The trainer's reward shaping (DAPO's overlong penalty and filter): every episode has the
        # horizon's length and none is truncated, so the penalty is one constant per group.
        shaped, kept = shape_rewards(flat, torch.ones_like(flat, dtype=torch.bool), torch.full_like(flat, problem.horizon),
                                     torch.zeros_like(flat, dtype=torch.bool), cfg, max_new_tokens=problem.horizon)
        adv, keep = group_advantages(shaped, cfg, generator)
        adv, keep = adv.view(rows, n_groups, -1), (keep & kept).view(rows, n_groups, -1)
        logp_behav = problem.token_logp(logits_behav, outcomes, prompts)  # [R, B, K, T]
        logp_prox = problem.token_logp(logits.detach(), outcomes, prompts) if cfg.needs_proximal else None
        mask = keep[..., None].expand_as(logp_behav)
        check_mini_batches(n_groups, mini_batches, "mini_batches", "groups sampled per step")
        updates = []
        for g in update_rows(n_groups, epochs, mini_batches):  # whole groups, as in the trainer
            logp = problem.token_logp(logits, outcomes[:, g], prompts[g])
            loss, metrics = per_row_policy_loss(logp, logp_behav[:, g], adv[:, g], mask[:, g], cfg,
                                                None if logp_prox is None else logp_prox[:, g], norm_length=horizon)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            updates.append(metrics)
        metrics = dict(merge_update_metrics(updates))
        ring.record(step + 1, logits)
        metrics["rollout/staleness"] = stale
        for key in STEP_KEYS:
            per_step[key].append(metrics[key].detach())
    for key, value in problem.exact_metrics(logits.detach(), logp_opt).items():
        exact[key].append(value)

    history = {k: torch.stack(v).view(len(v), n_set, seeds) for k, v in {**exact, **per_step}.items()}
    return RunResult(preset=preset, problem=problem.name, settings=list(settings), history=history)
