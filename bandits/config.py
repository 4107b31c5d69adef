"""Typed configuration of the bench; jsonargparse turns it into the CLI and YAML.

Every field has a docstring (shown by ``python -m bandits claims --help``). Validation runs in
``__post_init__`` so a bad YAML fails before any run starts, naming the field, the value and
what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from bandits.envs import REWARD_NOISES, ChainEnv
from bandits.simulate import OPTIMIZERS
from reclight.algorithms import PAPER_PRESETS, PRESETS
from reclight.stats import MIN_SEEDS
from reclight.checks import check_bool, check_choice, check_float, check_int, check_out_dir, check_subset
from reclight.clock import WEIGHT_UPDATES, ClockCosts
from reclight.sync import PAPER_SETTINGS
from reclight.updates import check_mini_batches

ENVS = ("bandit", "chain")


@dataclass
class BanditConfig:
    """The contextual bandit (``reclight/ContextualBandit-v0``), one reward table per seed."""

    n_contexts: int = 8
    """S, the number of contexts ("prompts"); every step samples one group per context."""
    n_arms: int = 10
    """A, the number of arms ("responses") per context."""
    reward_noise: str = "bernoulli"
    """``bernoulli`` (reward in {0, 1}, mean p[s, a] ~ U(0, 1)) or ``none`` (reward = p)."""
    init_logit_std: float = 1.0
    """Initial logits ~ N(0, std^2) per seed: a non-uniform "pretrained" policy pi_0."""

    def __post_init__(self) -> None:
        check_int("bandit.n_contexts", self.n_contexts, minimum=1)
        check_int("bandit.n_arms", self.n_arms, minimum=2)
        check_choice("bandit.reward_noise", self.reward_noise, REWARD_NOISES)
        check_float("bandit.init_logit_std", self.init_logit_std, ge=0, accepted="a number >= 0")


@dataclass
class ChainConfig:
    """The chain walk (``reclight/Chain-v0``): actions are the tokens, T = horizon."""

    length: int = 7
    """Number of positions L."""
    start: int = 2
    """Starting position, in [1, L - 2]."""
    horizon: int = 6
    """Episode length T; the bench enumerates all 3^T trajectories, so keep T <= 8."""
    left_reward: float = 0.5
    """Mean reward for ending at the left wall (a near, suboptimal goal)."""
    right_reward: float = 1.0
    """Mean reward for ending at the right wall (the far, optimal goal)."""
    reward_noise: str = "bernoulli"
    """``bernoulli`` or ``none``."""
    groups_per_step: int = 4
    """B, groups of K trajectories sampled per step (all from the start)."""
    init_logit_std: float = 1.0
    """Initial logits ~ N(0, std^2) per seed and state."""

    def __post_init__(self) -> None:
        check_int("chain.horizon", self.horizon, minimum=1, maximum=8,
                  accepted="an integer in [1, 8] (3^T trajectories)")
        check_int("chain.groups_per_step", self.groups_per_step, minimum=1)
        try:
            self.make_env()
        except ValueError as err:
            raise ValueError(f"chain.{err}") from None
        check_float("chain.init_logit_std", self.init_logit_std, ge=0, accepted="a number >= 0")

    def make_env(self) -> ChainEnv:
        return ChainEnv(
            self.length, self.start, self.horizon, self.left_reward, self.right_reward,
            self.reward_noise,
        )


@dataclass
class ClaimsConfig:
    """The claims suite: every preset x every off-policy setting x every environment."""

    seeds: int = 32
    """Independent runs per (preset, setting, env), trained together as one tensor batch
    (verdicts need at least ``reclight.stats.MIN_SEEDS`` = 3; with 2 every row is inconclusive)."""
    steps: int = 200
    """Optimizer updates per run."""
    group_size: int = 8
    """K, samples per group (>= 2: the baseline is the group mean)."""
    lr: float = 0.1
    """Learning rate on the logits."""
    optimizer: str = "adam"
    """``adam`` or ``sgd`` (both elementwise, so rows stay independent)."""
    presets: list[str] = field(default_factory=lambda: list(PAPER_PRESETS))
    """Algorithms to run (names of ``reclight.algorithms.PRESETS``; default: the paper's 14).
    Presets that need a reference policy (``grpo_kl``) are not run by the bench. Reward shaping is
    the trainer's own (``reclight.advantages.shape_rewards``): every episode's length is the horizon
    T and none is truncated, so DAPO's overlong penalty is one constant per group here; Dr. GRPO's
    constant L is T too (1 for the bandit, ``chain.horizon``)."""
    settings: list[str] = field(default_factory=lambda: list(PAPER_SETTINGS))
    """Off-policy settings (names of ``reclight.sync.PAPER_SETTINGS``)."""
    multi_epochs: int = 1
    """Epochs of the extra on-policy cell with several updates per batch (docs/algorithms.md section 6.1)."""
    multi_mini_batches: int = 4
    """Mini-batches of whole groups of that cell: with ``multi_epochs`` x ``multi_mini_batches``
    = U > 1 updates per batch, every preset also runs on-policy with U updates, where the ratio
    of update 2..U is no longer 1 and clipping and IS can act (1 x 1: no extra cell). Must divide
    the groups per step of every environment (bandit: ``n_contexts``; chain: ``groups_per_step``)."""
    envs: list[str] = field(default_factory=lambda: list(ENVS))
    """Environments: ``bandit`` and/or ``chain``."""
    margin: float = 0.02
    """delta, in reward units (rewards lie in [0, 1]; 0 < margin < 1): the practical-significance
    margin of every claim rule. Fixed before any run; never tuned per claim."""
    seed: int = 0
    """Base seed: seed n of a run uses environment and initial policy n + seed."""
    out_dir: str = "reports/bandits"
    """Where the report (claims.md), summary.json and the PNG plots are written."""
    bandit: BanditConfig = field(default_factory=BanditConfig)
    """The contextual bandit."""
    chain: ChainConfig = field(default_factory=ChainConfig)
    """The chain walk."""

    def __post_init__(self) -> None:
        check_int("seeds", self.seeds, minimum=2,
                  accepted=f"an integer >= 2 (verdicts need >= {MIN_SEEDS} paired seeds; fewer give inconclusive rows)")
        check_int("steps", self.steps, minimum=4)
        check_int("group_size", self.group_size, minimum=2)
        check_float("lr", self.lr, gt=0, accepted="a number > 0")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_subset("presets", self.presets, [p for p in PRESETS if not PRESETS[p].needs_reference])
        check_subset("settings", self.settings, list(PAPER_SETTINGS))
        check_subset("envs", self.envs, ENVS)
        check_float("margin", self.margin, gt=0, lt=1,
                    accepted="0 < margin < 1 (reward units: every claim figure lies in [0, 1], so a margin "
                    ">= 1 makes every greater/less claim unreachable and every alike claim hold)")
        check_int("seed", self.seed, minimum=0)
        check_int("multi_epochs", self.multi_epochs, minimum=1)
        check_int("multi_mini_batches", self.multi_mini_batches, minimum=1)
        check_out_dir("out_dir", self.out_dir)
        if isinstance(self.bandit, dict):  # built from a plain dict (e.g. tests)
            self.bandit = BanditConfig(**self.bandit)
        if isinstance(self.chain, dict):
            self.chain = ChainConfig(**self.chain)
        groups = {"bandit": (self.bandit.n_contexts, "bandit.n_contexts"),
                  "chain": (self.chain.groups_per_step, "chain.groups_per_step")}
        for env in self.envs:
            n, source = groups[env]
            check_mini_batches(n, self.multi_mini_batches, "multi_mini_batches", f"groups per step of {env} ({source})")

    @property
    def multi_setting(self) -> str | None:
        """The name of the extra on-policy cell with U > 1 updates per batch (None: no such cell)."""
        if self.multi_epochs * self.multi_mini_batches == 1 or "on_policy" not in self.settings:
            return None
        return f"on_policy_{self.multi_epochs}x{self.multi_mini_batches}"


ASYNC_SCHEDULES = ("sync", "pace", "drop", "drop_norequeue", "none")
"""Schedules of ``python -m bandits async`` (``bandits.async_bench.SCHEDULES``): ``sync`` = pace,
eta 0, drain, B slots (the synchronous on-policy loop, the reference); ``drop`` requeues."""


@dataclass(frozen=True)
class AsyncCosts(ClockCosts):
    """The clock's cost model (``reclight.clock.ClockCosts``), in one arbitrary time unit."""

    field_prefix: ClassVar[str] = "costs."


@dataclass
class AsyncBenchConfig:
    """The asynchronous bench: chain prompts of different horizons under the clock's schedules."""

    seeds: int = 16
    """Independent runs per (schedule, preset), trained together (paired across cells)."""
    steps: int = 80
    """Training steps per run."""
    group_size: int = 8
    """K, samples per group (>= 2)."""
    lr: float = 0.1
    """Learning rate on the logits."""
    optimizer: str = "adam"
    """``adam`` or ``sgd``."""
    presets: list[str] = field(default_factory=lambda: ["reinforce", "rec_oneside_nois", "decoupled_tis"])
    """Losses trained under every schedule (names of ``reclight.algorithms.PRESETS``)."""
    schedules: list[str] = field(default_factory=lambda: list(ASYNC_SCHEDULES))
    """Schedules to run; ``sync`` (the reference) is always run."""
    max_staleness: int = 1
    """eta of ``pace`` and ``drop`` (>= 0)."""
    max_inflight: int = 8
    """Generator slots (groups) of the asynchronous schedules (``sync`` has B)."""
    weight_update: str = "inflight"
    """``inflight`` or ``drain`` for the asynchronous schedules."""
    recompute_kv_on_update: bool = False
    """Charge a re-prefill at each in-flight swap (costs only: the bench has no KV cache)."""
    starve_after: int = 3
    """Discards in a row after which a prompt counts as starved."""
    costs: AsyncCosts = field(default_factory=AsyncCosts)
    """The cost model of the clock."""
    horizons: list[int] = field(default_factory=lambda: [2, 3, 4, 6])
    """H_p of each prompt (1..7; prompt p enumerates 3^H_p trajectories)."""
    groups_per_step: int = 4
    """B, a multiple of the number of prompts: each synchronous step then trains every prompt
    equally often (the uniform reference)."""
    left_reward: float = 0.5
    """Mean (Bernoulli) reward for ending at the left wall."""
    right_reward: float = 1.0
    """Mean (Bernoulli) reward for ending at the right wall."""
    init_logit_std: float = 1.0
    """Initial logits ~ N(0, std^2) per seed and state."""
    exact_start: int = 10
    """First step of the window of the exact tables."""
    exact_steps: int = 20
    """Steps in the window of the exact tables (0: no exact tables)."""
    seed: int = 0
    """Base seed (initial policies, sampling, the prompt order)."""
    out_dir: str = "reports/bandits_async"
    """Where ``async.md``, ``summary.json`` and the plot are written."""

    def __post_init__(self) -> None:
        check_int("seeds", self.seeds, minimum=2)
        check_int("steps", self.steps, minimum=1)
        check_int("group_size", self.group_size, minimum=2)
        check_float("lr", self.lr, gt=0, accepted="a number > 0")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_subset("presets", self.presets, [p for p in PRESETS if not PRESETS[p].needs_reference])
        check_subset("schedules", self.schedules, ASYNC_SCHEDULES)
        if "sync" not in self.schedules:
            self.schedules = ["sync", *self.schedules]
        check_int("max_staleness", self.max_staleness, minimum=0)
        check_int("max_inflight", self.max_inflight, minimum=1)
        check_choice("weight_update", self.weight_update, WEIGHT_UPDATES)
        check_bool("recompute_kv_on_update", self.recompute_kv_on_update)
        check_int("starve_after", self.starve_after, minimum=1)
        if isinstance(self.costs, dict):
            self.costs = AsyncCosts(**self.costs)
        if not isinstance(self.horizons, list) or not self.horizons:
            raise ValueError(f"horizons={self.horizons!r} is not valid; accepted: a non-empty list of integers in "
                             "[1, 7]")
        for h in self.horizons:
            check_int("horizons", h, minimum=1, maximum=7, accepted="integers in [1, 7] (3^H trajectories each)")
        check_int("groups_per_step", self.groups_per_step, minimum=1)
        if self.groups_per_step % len(self.horizons):
            raise ValueError(f"groups_per_step={self.groups_per_step} is not valid; accepted: a multiple of the "
                             f"{len(self.horizons)} prompts (len(horizons)), so that every synchronous step trains "
                             "every prompt equally often")
        check_float("left_reward", self.left_reward, ge=0, le=1, accepted="a number in [0, 1]")
        check_float("right_reward", self.right_reward, ge=0, le=1, accepted="a number in [0, 1]")
        check_float("init_logit_std", self.init_logit_std, ge=0, accepted="a number >= 0")
        check_int("exact_start", self.exact_start, minimum=0)
        check_int("exact_steps", self.exact_steps, minimum=0, maximum=max(self.steps - self.exact_start, 0),
                  accepted=f"an integer in [0, steps - exact_start] = [0, {max(self.steps - self.exact_start, 0)}]")
        check_int("seed", self.seed, minimum=0)
        check_out_dir("out_dir", self.out_dir)
