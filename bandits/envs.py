"""Tabular environments of the bench, as ``gymnasium.Env`` subclasses registered under ids.

Three environments, all "prompts with one tabular softmax policy per context":

- ``reclight/ContextualBandit-v0``: S contexts x A arms, one action per episode (T = 1).
  Arm a in context s pays Bernoulli(p[s, a]) (or exactly p[s, a] with ``reward_noise="none"``).
- ``reclight/Chain-v0``: a walk on positions 0..L-1 for a fixed horizon T (actions: 0 = left,
  1 = stay, 2 = right; the walls absorb moves past the ends). The reward is paid once, at the
  end of the episode, from the final position only (a trajectory-level reward): the left end
  pays ``left_reward``, the right end ``right_reward``, every other position 0. The
  observation is the time-indexed state ``t * L + position``, so a tabular policy over
  observations can represent every Markov policy, including the KL-regularized optimum.
- ``reclight/ChainPrompts-v0``: P chain walks ("prompts") with their own horizons, one tabular
  state space each (a ``ChainEnv`` per prompt, states offset per prompt): episode p lasts H_p
  steps, so an episode's length depends on its prompt only. By default prompt p is a chain of
  H_p + 1 positions started at max(1, H_p // 2): both walls are reachable, the right one (the
  better reward) needs at least ceil(H_p / 2) net right moves, so a longer prompt takes longer
  and, from a uniform policy, ends at the right wall less often. The asynchronous bench
  (``bandits/async_bench.py``) uses it: completion order then selects prompts.

Each environment exposes its tables (``reward_means``, ``next_position``, ...) so that the
bench can simulate thousands of episodes at once on tensors; ``tests/bandits/test_bandits_envs.py``
checks that stepping the gymnasium environment and reading the tables agree.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from reclight.checks import check_choice, check_float, check_int

REWARD_NOISES = ("bernoulli", "none")
BANDIT_ID = "reclight/ContextualBandit-v0"
CHAIN_ID = "reclight/Chain-v0"
CHAIN_PROMPTS_ID = "reclight/ChainPrompts-v0"
LEFT, STAY, RIGHT = 0, 1, 2


def _draw(rng: np.random.Generator, mean: float, noise: str) -> float:
    return float(rng.random() < mean) if noise == "bernoulli" else float(mean)


class ContextualBanditEnv(gym.Env):
    """S contexts x A arms; observation = context index, one step per episode.

    Args:
        n_contexts: S >= 1.
        n_arms: A >= 2.
        reward_means: optional ``[S, A]`` array in [0, 1]; drawn U(0, 1) from ``problem_seed``
            when omitted.
        reward_noise: ``bernoulli`` (reward in {0, 1} with mean p[s, a]) or ``none``.
        problem_seed: seeds the drawn reward table (not the episodes; use ``reset(seed=...)``).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        n_contexts: int = 8,
        n_arms: int = 10,
        reward_means: np.ndarray | None = None,
        reward_noise: str = "bernoulli",
        problem_seed: int = 0,
    ) -> None:
        n_contexts = check_int("n_contexts", n_contexts, minimum=1)
        n_arms = check_int("n_arms", n_arms, minimum=2)
        check_choice("reward_noise", reward_noise, REWARD_NOISES)
        if reward_means is None:
            reward_means = np.random.default_rng(problem_seed).random((n_contexts, n_arms))
        reward_means = np.asarray(reward_means, dtype=np.float64)
        if reward_means.shape != (n_contexts, n_arms):
            raise ValueError(
                f"reward_means has shape {reward_means.shape}; accepted: (n_contexts, n_arms) "
                f"= {(n_contexts, n_arms)}"
            )
        if reward_noise == "bernoulli" and not ((reward_means >= 0) & (reward_means <= 1)).all():
            raise ValueError("reward_means must lie in [0, 1] with reward_noise='bernoulli'")
        self.reward_means = reward_means  # [S, A]
        self.reward_noise = reward_noise
        self.observation_space = spaces.Discrete(n_contexts)
        self.action_space = spaces.Discrete(n_arms)
        self._context: int | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._context = int(self.np_random.integers(self.observation_space.n))
        return self._context, {}

    def step(self, action: int):
        if self._context is None:
            raise RuntimeError("call reset() before step(): the episode is over")
        if not self.action_space.contains(action):
            raise ValueError(f"action={action!r} is not valid; accepted: 0..{self.action_space.n - 1}")
        mean = self.reward_means[self._context, action]
        obs, self._context = self._context, None
        return obs, _draw(self.np_random, mean, self.reward_noise), True, False, {"mean": mean}


class ChainEnv(gym.Env):
    """A walk on positions 0..L-1 for ``horizon`` steps, paid at the end by final position.

    Args:
        length: L >= 3 positions.
        start: starting position, 0 < start < L - 1.
        horizon: T >= 1 steps per episode (the "tokens" of a response).
        left_reward, right_reward: mean reward of ending at position 0 / L - 1, in [0, 1].
        reward_noise: ``bernoulli`` or ``none``.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        length: int = 7,
        start: int = 2,
        horizon: int = 6,
        left_reward: float = 0.5,
        right_reward: float = 1.0,
        reward_noise: str = "bernoulli",
    ) -> None:
        length = check_int("length", length, minimum=3)
        horizon = check_int("horizon", horizon, minimum=1)
        start = check_int("start", start, minimum=1, maximum=length - 2)
        left_reward = check_float("left_reward", left_reward, ge=0, le=1, accepted="a number in [0, 1]")
        right_reward = check_float("right_reward", right_reward, ge=0, le=1, accepted="a number in [0, 1]")
        check_choice("reward_noise", reward_noise, REWARD_NOISES)
        self.length, self.start, self.horizon = length, start, horizon
        self.reward_noise = reward_noise
        self.final_reward_means = np.zeros(length)  # [L]
        self.final_reward_means[0], self.final_reward_means[-1] = left_reward, right_reward
        moves = np.array([-1, 0, 1])
        positions = np.arange(length)[:, None]
        self.next_position = np.clip(positions + moves[None, :], 0, length - 1)  # [L, 3]
        self.observation_space = spaces.Discrete(horizon * length)
        self.action_space = spaces.Discrete(3)
        self._t: int | None = None
        self._pos = start

    def state_index(self, t: int, position: int) -> int:
        """The observation (tabular context) of position ``position`` at step ``t``."""
        return t * self.length + position

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t, self._pos = 0, self.start
        return self.state_index(0, self.start), {}

    def step(self, action: int):
        if self._t is None:
            raise RuntimeError("call reset() before step(): the episode is over")
        if not self.action_space.contains(action):
            raise ValueError(f"action={action!r} is not valid; accepted: 0, 1, 2")
        self._pos = int(self.next_position[self._pos, action])
        self._t += 1
        if self._t < self.horizon:
            return self.state_index(self._t, self._pos), 0.0, False, False, {}
        mean = self.final_reward_means[self._pos]
        self._t = None
        obs = self.state_index(self.horizon - 1, self._pos)  # terminal: last in-range index
        return obs, _draw(self.np_random, mean, self.reward_noise), True, False, {"mean": mean}


class ChainPromptsEnv(gym.Env):
    """P chain walks with their own horizons; ``reset(options={"prompt": p})`` picks prompt p
    (without it, a uniformly drawn prompt). Observation: ``state_offset[p] + t * L_p + position``.

    Args:
        horizons: H_p >= 1 per prompt (the episode length of prompt p).
        lengths: positions per prompt (default max(3, H_p + 1)).
        starts: start position per prompt (default max(1, H_p // 2), in [1, L_p - 2]).
        left_reward, right_reward, reward_noise: as :class:`ChainEnv`, shared by every prompt.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        horizons: tuple[int, ...] | list[int] = (2, 3, 4, 6),
        lengths: tuple[int, ...] | list[int] | None = None,
        starts: tuple[int, ...] | list[int] | None = None,
        left_reward: float = 0.5,
        right_reward: float = 1.0,
        reward_noise: str = "bernoulli",
    ) -> None:
        horizons = [check_int("horizons", h, minimum=1) for h in horizons]
        if not horizons:
            raise ValueError("horizons=[] is not valid; accepted: a non-empty list of integers >= 1")
        lengths = [max(3, h + 1) for h in horizons] if lengths is None else list(lengths)
        starts = [max(1, h // 2) for h in horizons] if starts is None else list(starts)
        if not len(lengths) == len(starts) == len(horizons):
            raise ValueError(f"lengths={lengths!r} and starts={starts!r} are not valid; accepted: one entry per "
                             f"prompt ({len(horizons)})")
        self.chains = [ChainEnv(length, start, h, left_reward, right_reward, reward_noise)
                       for h, length, start in zip(horizons, lengths, starts)]
        sizes = [c.observation_space.n for c in self.chains]
        self.state_offset = [sum(sizes[:p]) for p in range(len(sizes))]
        self.horizons = horizons
        self.observation_space = spaces.Discrete(sum(sizes))
        self.action_space = spaces.Discrete(3)
        self._prompt: int | None = None

    def state_index(self, prompt: int, t: int, position: int) -> int:
        """The observation of position ``position`` at step ``t`` of prompt ``prompt``."""
        return self.state_offset[prompt] + self.chains[prompt].state_index(t, position)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        prompt = (options or {}).get("prompt")
        if prompt is None:
            prompt = int(self.np_random.integers(len(self.chains)))
        self._prompt = check_int("prompt", prompt, minimum=0, maximum=len(self.chains) - 1)
        obs, info = self.chains[self._prompt].reset(seed=int(self.np_random.integers(2**31)))
        return self.state_offset[self._prompt] + obs, {**info, "prompt": self._prompt}

    def step(self, action: int):
        if self._prompt is None:
            raise RuntimeError("call reset() before step(): the episode is over")
        prompt = self._prompt
        obs, reward, terminated, truncated, info = self.chains[prompt].step(action)
        if terminated:
            self._prompt = None
        return self.state_offset[prompt] + obs, reward, terminated, truncated, {**info, "prompt": prompt}


def register_envs() -> None:
    """Register the environments with gymnasium (idempotent)."""
    for env_id, entry in ((BANDIT_ID, ContextualBanditEnv), (CHAIN_ID, ChainEnv),
                          (CHAIN_PROMPTS_ID, ChainPromptsEnv)):
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry)
