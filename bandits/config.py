"""Typed configuration of the bench; jsonargparse turns it into the CLI and YAML.

Every field has a docstring (shown by ``python -m bandits claims --help``). Validation runs in
``__post_init__`` so a bad YAML fails before any run starts, naming the field, the value and
what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bandits.envs import REWARD_NOISES, ChainEnv
from bandits.simulate import OPTIMIZERS
from reclight.algorithms import PRESETS
from reclight.checks import check_choice, check_float, check_int, check_subset
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
    """Independent runs per (preset, setting, env), trained together as one tensor batch."""
    steps: int = 200
    """Optimizer updates per run."""
    group_size: int = 8
    """K, samples per group (>= 2: the baseline is the group mean)."""
    lr: float = 0.1
    """Learning rate on the logits."""
    optimizer: str = "adam"
    """``adam`` or ``sgd`` (both elementwise, so rows stay independent)."""
    presets: list[str] = field(default_factory=lambda: list(PRESETS))
    """Algorithms to run (names of ``reclight.algorithms.PRESETS``)."""
    settings: list[str] = field(default_factory=lambda: list(PAPER_SETTINGS))
    """Off-policy settings (names of ``reclight.sync.PAPER_SETTINGS``)."""
    envs: list[str] = field(default_factory=lambda: list(ENVS))
    """Environments: ``bandit`` and/or ``chain``."""
    margin: float = 0.02
    """delta, in reward units (rewards lie in [0, 1]): the practical-significance margin of
    every claim rule. Fixed before any run; never tuned per claim."""
    seed: int = 0
    """Base seed: seed n of a run uses environment and initial policy n + seed."""
    out_dir: str = "reports/bandits"
    """Where the report (claims.md), summary.json and the PNG plots are written."""
    bandit: BanditConfig = field(default_factory=BanditConfig)
    """The contextual bandit."""
    chain: ChainConfig = field(default_factory=ChainConfig)
    """The chain walk."""

    def __post_init__(self) -> None:
        check_int("seeds", self.seeds, minimum=2)
        check_int("steps", self.steps, minimum=4)
        check_int("group_size", self.group_size, minimum=2)
        check_float("lr", self.lr, gt=0, accepted="a number > 0")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_subset("presets", self.presets, list(PRESETS))
        check_subset("settings", self.settings, list(PAPER_SETTINGS))
        check_subset("envs", self.envs, ENVS)
        check_float("margin", self.margin, gt=0, accepted="a number > 0")
        if isinstance(self.bandit, dict):  # built from a plain dict (e.g. tests)
            self.bandit = BanditConfig(**self.bandit)
        if isinstance(self.chain, dict):
            self.chain = ChainConfig(**self.chain)
