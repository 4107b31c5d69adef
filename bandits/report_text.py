"""The fixed prose of the claims report: what was measured and how a row is decided."""

from __future__ import annotations

from bandits.config import AsyncBenchConfig, ClaimsConfig
from reclight.stats import ALPHA, MIN_SEEDS, rules_table, t_quantile
from reclight.sync import resolve_setting


def header(cfg: ClaimsConfig, wall: float, counts: str, adjusted: str) -> list[str]:
    settings = ", ".join(
        f"{s} (k={k}, d={d})" for s in cfg.settings for k, d in [resolve_setting(s, cfg.steps)]
    )
    b, c = cfg.bandit, cfg.chain
    return [
        "# Bandit bench: the paper's claims where the answer is known exactly",
        "",
        f"Produced by `python -m bandits claims` in {wall:.1f} s. **Verdicts: {counts}.** The seeded rows "
        f"Holm-adjusted as one family (`adjusted_verdict` in summary.json): {adjusted}.",
        "",
        "## What was measured",
        "",
        f"- Environments: `bandit` = contextual bandit, {b.n_contexts} contexts x {b.n_arms} arms, "
        f"reward {b.reward_noise} with means ~ U(0, 1) drawn per seed, one group per context per "
        f"step; `chain` = walk on {c.length} positions from {c.start}, T = {c.horizon} actions "
        f"(the tokens), reward {c.reward_noise} at the end: {c.left_reward} at the left wall, "
        f"{c.right_reward} at the right wall, else 0; {c.groups_per_step} groups per step.",
        f"- Policies: tabular softmax, initial logits ~ N(0, {b.init_logit_std}^2) (bandit) / "
        f"N(0, {c.init_logit_std}^2) (chain), the same per seed in every cell (paired seeds).",
        f"- Training: {cfg.steps} {cfg.optimizer} steps, lr {cfg.lr}, K = {cfg.group_size}, "
        f"{cfg.seeds} seeds per cell, loss = `reclight.losses.policy_loss` of each preset with "
        "`reclight.advantages.group_advantages`.",
        f"- Settings (`reclight.sync.behavior_version`): {settings}.",
        "- Figures, per seed, of the EXACT expected reward curve R_t under the current policy: "
        "`final` = R at the last step, `auc` = mean of R_t over steps, `early` = R at step "
        "steps/4, `drawdown` = max_t R_t - R_final.",
        "- Statistic: per-seed paired difference Delta of the figure between the two cells; "
        f"mean and 95% Student-t interval mean ± t sd/sqrt(n) over the n = {cfg.seeds} seeds "
        f"(t_0.975,{cfg.seeds - 1} = {t_quantile(0.975, cfg.seeds - 1):.3f}; `reclight.stats`). "
        f"Rows with fewer than {MIN_SEEDS} seeds get no verdict (inconclusive).",
        f"- Verdicts, with one margin delta = {cfg.margin} reward units fixed before running "
        f"(never tuned per claim): **yes** = the one-sided test of \"claim false\" rejects at {ALPHA:g}; "
        f"**no** = the test of \"claim true\" rejects at {ALPHA:g}; **inconclusive** = neither. "
        "`exact` rows are closed-form checks, no seeds: yes or no.",
        "",
        *rules_table(),
    ]


def notes(cfg: ClaimsConfig) -> list[str]:
    return [
        "- On-policy (k=1, d=0) with one update per batch, rho = 1 exactly: no clipping mask ever "
        "fires and IS = NoIS. All REC variants are then the same algorithm as REINFORCE (identical "
        "curves with paired seeds), so 'IS alike NoIS' holds trivially and 'enlarged clipping learns "
        "faster on-policy' cannot hold; those rows are kept, marked [trivial ...]. "
        + (f"The `{cfg.multi_setting}` cell is on-policy with {cfg.multi_epochs} epoch(s) x "
           f"{cfg.multi_mini_batches} mini-batches = {cfg.multi_epochs * cfg.multi_mini_batches} updates "
           "per batch (run for the clipping presets its claims compare), as the paper's on-policy runs "
           "(and every peer) train: from the second update "
           "of a batch on rho != 1, so the same claims get real verdicts there."
           if cfg.multi_setting else "No cell with several updates per batch was run (multi_mini_batches = 1)."),
        "- A tabular policy has no parameter sharing: pushing down one sampled outcome cannot "
        "drag others along, which is one mechanism of REINFORCE's off-policy collapse in LLMs. "
        "Where a claim fails here, it fails for this mechanism-free setting only.",
        "- `kl/opt` (in summary.json and the plots' companion metrics) is KL(pi_opt || pi) with "
        "pi_opt = pi_0 exp(r/1e-3)/Z, the reward-maximising policy closest to pi_0.",
        "- Rows are reported as computed (yes / **no** / inconclusive); nothing was re-run or "
        "re-tuned to change a verdict.",
    ]


def async_header(cfg: AsyncBenchConfig, wall: float) -> list[str]:
    """What ``python -m bandits async`` measured (docs/bandits.md, "Asynchronous schedules")."""
    c = cfg.costs
    return [
        "# Bandit bench: asynchronous schedules on the simulated clock",
        "",
        f"Produced by `python -m bandits async` in {wall:.1f} s.",
        "",
        "## What was measured",
        "",
        f"- Environment: `reclight/ChainPrompts-v0`, {len(cfg.horizons)} prompts with horizons {cfg.horizons} "
        "(prompt p: a chain of H + 1 positions from max(1, H // 2); Bernoulli reward "
        f"{cfg.left_reward} at the left wall, {cfg.right_reward} at the right wall, else 0). A response's length "
        "is its prompt's horizon, so completion order selects prompts, and the schedule is exact.",
        f"- Schedules (`reclight.clock.AsyncClock`, docs/async.md): `sync` = pace, eta 0, drain, "
        f"{cfg.groups_per_step} slots (the synchronous on-policy loop, the reference); `pace`, `drop` (requeue), "
        f"`drop_norequeue`, `none` with eta = {cfg.max_staleness}, `{cfg.weight_update}` weight updates, "
        f"{cfg.max_inflight} slots; B = {cfg.groups_per_step}, K = {cfg.group_size}; the prompt stream is one "
        f"permutation per epoch (seed {cfg.seed}).",
        f"- Costs: decode {c.decode_a} + {c.decode_b} x live rows, prefill {c.prefill_b} per prompt token (one "
        f"token per prompt), swap {c.sync_cost}, training {c.train_c} + {c.train_e} x trained tokens.",
        f"- Training: {cfg.steps} {cfg.optimizer} steps, lr {cfg.lr}, tabular softmax with initial logits "
        f"~ N(0, {cfg.init_logit_std}^2), the same {cfg.seeds} seeds in every cell; "
        "`reclight.advantages.group_advantages` and `reclight.losses.policy_loss`; each token's `logp_behav` "
        "from the snapshot of the version the clock says sampled it; each group's draws seeded by (seed, "
        "admission index). Figures: the EXACT expected reward (uniform over prompts) of each seed's policy.",
    ]


def async_notes(cfg: AsyncBenchConfig) -> list[str]:
    return [
        "- `speedup vs sync` is the clock total of `sync` over the schedule's, for the same number of steps "
        "(the emulated speedup); `reward at clock budget` compares the schedules at the same simulated time.",
        "- The exact tables fix the schedule and the snapshots and enumerate the actions and rewards "
        "(`bandits/async_exact.py`); `fixed policy` sets every version to theta_0 (only the prompt "
        "selection differs from `sync`), `trained snapshots` uses the versions of a trained `sync` run (selection "
        "and staleness).",
        "- Under `token_mean` a sample weighs 1 / (tokens in its batch): completion order groups short responses "
        "into the same batches, which then weigh more, even where every prompt is trained equally often.",
        "- Tabular policies share no parameters and the lengths do not depend on the sampled actions: the bench "
        "isolates the schedule's effects; it says nothing about an LLM's length dynamics.",
    ]
