"""The asynchronous bench (docs/algorithms.md section 7, docs/async.md): the chain prompts of
``reclight/ChainPrompts-v0`` trained under schedules of the very ``reclight.clock.AsyncClock`` the
LLM trainer uses, with the project's ``group_advantages`` and ``policy_loss``.

How a run is built:

1. **The schedule, once.** A response's length is its prompt's horizon H_p, whatever the sampled
   actions, so the clock's events depend on the prompts alone: :func:`bench_schedule` runs the
   clock with a ``ScriptedGenerator`` whose sequences end at their prompt's horizon and returns
   the plans (which groups step s trains, each token's version). One schedule serves every seed
   and every preset of a cell: differences between presets are paired.
2. **Sampling, per group.** Token t of every sample of group n was sampled, the plan says, by
   version ``token_versions[t]``; its behaviour probability is the product over t of
   softmax(theta_{v_t})[s_t, a_t]. :func:`sample_batch` enumerates the M_p trajectories of the
   prompt under that per-token mixture of snapshots and draws the K samples and their Bernoulli
   rewards with a generator seeded by (run seed, n) alone, so a group's samples do not depend on
   what else is in flight. (Drawing whole trajectories from the product of per-token snapshots
   is the same distribution as drawing token by token; the draw happens when the group is
   trained, which changes nothing because the snapshots are fixed by then.)
3. **Training**, vectorized over seeds (rows): ``logp_behav`` per token from its own version,
   ``logp_prox`` from the trainer's weights at the start of the step (``ratio_anchor: proximal``),
   ``group_advantages`` then ``policy_loss`` per row (``bandits.simulate.per_row_policy_loss``),
   Adam or SGD; theta_{s+1} is kept while a later step samples from it.

Departures from an LLM run, on purpose: the policy is tabular (no generalisation between
prompts), lengths depend on the prompt only (not on the sampled actions), and the metrics
``reward/expected`` and ``reward/by_prompt`` are exact expectations under the current policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bandits.problems import PromptedProblem
from bandits.simulate import OPTIMIZERS, per_row_policy_loss
from reclight.advantages import group_advantages, shape_rewards
from reclight.algorithms import AlgorithmConfig
from reclight.checks import check_choice
from reclight.clock import AsyncClock, ClockConfig, ClockCosts, PromptStream, ScriptedGenerator, StepPlan

SCHEDULES = ("sync", "pace", "drop", "drop_norequeue", "none")
"""The bench's schedules: ``sync`` is the synchronous on-policy loop (pace, eta 0, drain, B slots);
``drop`` requeues discarded prompts, ``drop_norequeue`` does not."""


def schedule_config(name: str, *, eta: int, max_inflight: int, weight_update: str, recompute_kv_on_update: bool,
                    starve_after: int, costs: ClockCosts, groups_per_step: int) -> ClockConfig:
    """The clock settings of one named schedule (``sync`` keeps only the costs)."""
    check_choice("schedule", name, SCHEDULES)
    if name == "sync":
        return ClockConfig(enabled=True, max_inflight=groups_per_step, weight_update="drain", staleness="pace",
                           max_staleness=0, costs=costs)
    return ClockConfig(enabled=True, max_inflight=max_inflight, weight_update=weight_update,
                       recompute_kv_on_update=recompute_kv_on_update and weight_update == "inflight",
                       staleness="drop" if name.startswith("drop") else name, max_staleness=eta,
                       requeue=name == "drop", starve_after=starve_after, costs=costs)


def bench_schedule(cfg: ClockConfig, horizons: Sequence[int], groups_per_step: int, group_size: int, steps: int,
                   stream_seed: int) -> list[StepPlan]:
    """The plans of ``steps`` steps: prompts from epoch permutations seeded by ``stream_seed``,
    every sequence of prompt p ends after H_p tokens, each prompt costs one prefill token."""
    horizons = [int(h) for h in horizons]
    gen = ScriptedGenerator(lambda n, prompt: [horizons[prompt]] * group_size, lambda prompt: 1)
    clock = AsyncClock(cfg, groups_per_step, group_size, PromptStream.shuffled(len(horizons), stream_seed), gen)
    return [clock.step(s) for s in range(steps)]


def group_seed(run_seed: int, n: int) -> int:
    """Sampling seed of the group with admission index n (rank 0)."""
    return (run_seed * 1_000_003 + n) % (2**63)


def behaviour_token_logp(problem: PromptedProblem, snapshots: dict[int, Tensor], prompt: int,
                         versions: Sequence[int]) -> Tensor:
    """log mu(a_t | s_t) of every token of every outcome of ``prompt`` when token t is sampled by
    theta_{versions[t]} (``snapshots[v]``: logits [R, S, A]). Returns [R, M_p, H_p]."""
    flat = problem.flat_index()[prompt, : int(problem.n_outcomes[prompt]), : len(versions)]  # [M_p, H_p]
    tables = {v: torch.log_softmax(snapshots[v], -1).flatten(1) for v in set(versions)}
    return torch.stack([tables[v][:, flat[:, t]] for t, v in enumerate(versions)], -1)


def sample_batch(problem: PromptedProblem, plan: StepPlan, snapshots: dict[int, Tensor], group_size: int,
                 run_seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The batch of one plan for every row: ``(prompts [B], outcomes [R, B, K], rewards [R, B, K],
    logp_behav [R, B, K, T])`` (``logp_behav`` 0 on padded tokens). See the module docstring."""
    prompts, outcomes, rewards, behav = [], [], [], []
    for g in plan.groups:
        versions = g.token_versions[: int(problem.horizons[g.prompt])]
        tok = behaviour_token_logp(problem, snapshots, g.prompt, versions)  # [R, M_p, H_p]
        rows, n_out, h = tok.shape
        gen = torch.Generator().manual_seed(group_seed(run_seed, g.n))
        out = torch.multinomial(tok.sum(-1).exp(), group_size, replacement=True, generator=gen)  # [R, K]
        means = problem.reward_means.expand(rows, -1, -1)[:, g.prompt, :n_out].gather(1, out)
        if problem.bernoulli:
            means = (torch.rand(means.shape, generator=gen, dtype=means.dtype) < means).to(means.dtype)
        lb = tok.gather(1, out[..., None].expand(rows, group_size, h))
        behav.append(torch.nn.functional.pad(lb, (0, problem.horizon - h)))
        prompts.append(g.prompt)
        outcomes.append(out)
        rewards.append(means)
    return (torch.tensor(prompts), torch.stack(outcomes, 1), torch.stack(rewards, 1), torch.stack(behav, 1))


def last_use(plans: Sequence[StepPlan]) -> dict[int, int]:
    """The last step that samples from each version (versions never read are absent)."""
    out: dict[int, int] = {}
    for plan in plans:
        for g in plan.groups:
            for v in set(g.token_versions):
                out[v] = plan.step
    return out


def run_schedule(problem: PromptedProblem, cfg: AlgorithmConfig, plans: Sequence[StepPlan], logits_init: Tensor,
                 *, group_size: int, lr: float, optimizer: str = "adam", seed: int = 0,
                 keep_snapshots: bool = False) -> dict[str, Tensor | list[Tensor]]:
    """Train every row of ``logits_init`` [R, S, A] through ``plans``. Returns the histories
    ``reward/expected`` [steps + 1, R], ``reward/by_prompt`` [steps + 1, R, P],
    ``policy/entropy`` [steps + 1, R], ``clip/frac`` [steps, R], and with ``keep_snapshots`` the
    logits of every version (``snapshots``: a list of [R, S, A])."""
    check_choice("optimizer", optimizer, OPTIMIZERS)
    logits = logits_init.clone().requires_grad_(True)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([logits], lr=lr)
    adv_gen = torch.Generator().manual_seed(seed)  # RED-Drop's random drops only
    uses = last_use(plans)
    snapshots = {0: logits.detach().clone()}
    kept = [snapshots[0]] if keep_snapshots else []
    hist: dict[str, list[Tensor]] = {"reward/expected": [], "reward/by_prompt": [], "policy/entropy": [],
                                     "clip/frac": []}

    def record() -> None:
        for key, value in problem.exact_metrics(logits.detach()).items():
            hist[key].append(value)

    for plan in plans:
        record()
        prompts, outcomes, rewards, logp_behav = sample_batch(problem, plan, snapshots, group_size, seed)
        rows, n_groups, _ = rewards.shape
        flat = rewards.flatten(0, 1)  # [R*B, K]
        # The trainer's reward shaping: each episode's length is its prompt's horizon (none is
        # truncated), the longest horizon plays max_new_tokens (DAPO's overlong penalty).
        lengths = problem.horizons[prompts][None, :, None].expand(rows, -1, flat.shape[-1]).flatten(0, 1).to(flat)
        shaped, shaping_keep = shape_rewards(flat, torch.ones_like(flat, dtype=torch.bool), lengths,
                                             torch.zeros_like(flat, dtype=torch.bool), cfg,
                                             max_new_tokens=problem.horizon)
        adv, keep = group_advantages(shaped, cfg, adv_gen)
        adv, keep = adv.view(rows, n_groups, -1), (keep & shaping_keep).view(rows, n_groups, -1)
        mask = problem.token_mask(prompts)[None, :, None, :] & keep[..., None]  # [R, B, K, T]
        logp_prox = problem.token_logp(logits.detach(), outcomes, prompts) if cfg.needs_proximal else None
        logp = problem.token_logp(logits, outcomes, prompts)
        # L of seq_mean_token_sum_norm: the longest horizon T, the bench's max_new_tokens
        loss, metrics = per_row_policy_loss(logp, logp_behav, adv, mask, cfg, logp_prox, norm_length=problem.horizon)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        hist["clip/frac"].append(metrics["clip/frac"].detach())
        version = plan.step + 1
        snapshots[version] = logits.detach().clone()
        if keep_snapshots:
            kept.append(snapshots[version])
        for v in [v for v in snapshots if v != version and uses.get(v, -1) <= plan.step]:
            del snapshots[v]
    record()
    out: dict[str, Tensor | list[Tensor]] = {k: torch.stack(v) for k, v in hist.items()}
    if keep_snapshots:
        out["snapshots"] = kept
    return out


def schedule_summary(plans: Sequence[StepPlan], horizons: Sequence[int]) -> dict[str, float | list[float]]:
    """Exact figures of a schedule (no seeds): staleness, discards, clock, and the selection:
    the share of trained groups per prompt and the trained vs completed mean length."""
    n_prompts = len(horizons)
    trained = [0] * n_prompts
    for plan in plans:
        for g in plan.groups:
            trained[g.prompt] += 1
    total = sum(trained)
    m = [p.metrics for p in plans]
    return {
        "share_by_prompt": [c / total for c in trained],
        "staleness_mean": sum(x["async/staleness_mean"] for x in m) / len(m),
        "staleness_max": max(x["async/staleness_max"] for x in m),
        "versions_spanned_mean": sum(x["async/versions_spanned_mean"] for x in m) / len(m),
        "discarded": sum(x["async/discarded"] for x in m),
        "starved_max": max(x["async/starved"] for x in m),
        "trained_len_mean": m[-1]["async/trained_len_mean_run"],
        "completed_len_mean": m[-1]["async/completed_len_mean"],
        "clock": plans[-1].train_end,
        "trainer_idle_frac": m[-1]["async/trainer_idle_frac_total"],
        "generator_idle_frac": m[-1]["async/generator_idle_frac_total"],
    }
