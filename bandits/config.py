"""Typed configuration of the bench; jsonargparse turns it into the CLI and YAML.

Every field has a docstring (shown by ``python -m bandits claims --help``). Validation runs in
``__post_init__`` so a bad YAML fails before any run starts, naming the field, the value and
what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bandits.envs import REWARD_NOISES, ChainEnv
from bandits.simulate import OPTIMIZERS
from reclight.algorithms import PAPER_PRESETS, PRESETS
from reclight.stats import MIN_SEEDS
from reclight.checks import check_choice, check_float, check_int, check_out_dir, check_subset
from reclight.sync import PAPER_SETTINGS

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
    Presets that need a reference policy (``grpo_kl``) are not run by the bench, and the trainer-side
    knobs of a preset (DAPO's overlong penalty: the bench's outcomes have no length) do not apply."""
    settings: list[str] = field(default_factory=lambda: list(PAPER_SETTINGS))
    """Off-policy settings (names of ``reclight.sync.PAPER_SETTINGS``)."""
    multi_epochs: int = 1
    """Epochs of the extra on-policy cell with several updates per batch (ALGORITHMS.md 6.1)."""
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
        groups = {"bandit": self.bandit.n_contexts, "chain": self.chain.groups_per_step}
        for env in self.envs:
            if groups[env] % self.multi_mini_batches:
                raise ValueError(
                    f"multi_mini_batches={self.multi_mini_batches} is not valid with {env}'s {groups[env]} groups "
                    f"per step; accepted: a divisor of {groups[env]}")

    @property
    def multi_setting(self) -> str | None:
        """The name of the extra on-policy cell with U > 1 updates per batch (None: no such cell)."""
        if self.multi_epochs * self.multi_mini_batches == 1 or "on_policy" not in self.settings:
            return None
        return f"on_policy_{self.multi_epochs}x{self.multi_mini_batches}"
