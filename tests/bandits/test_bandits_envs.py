"""The gymnasium environments of the bandit bench: ids, errors, and that stepping an
environment agrees with the tables the bench simulates from."""

import itertools

import gymnasium as gym
import pytest
import torch
from torch.testing import assert_close

import bandits  # noqa: F401  (registers the environments)
from bandits.envs import BANDIT_ID, CHAIN_ID, ChainEnv, ContextualBanditEnv
from bandits.problems import bandit_problem, chain_problem

F64 = torch.float64


def test_gym_ids_make_working_envs():
    env = gym.make(BANDIT_ID, n_contexts=3, n_arms=4)
    obs, _ = env.reset(seed=0)
    assert 0 <= obs < 3
    _, reward, terminated, truncated, _ = env.step(2)
    assert reward in (0.0, 1.0) and terminated and not truncated
    chain = gym.make(CHAIN_ID, horizon=3)
    obs, _ = chain.reset(seed=0)
    assert obs == chain.unwrapped.state_index(0, chain.unwrapped.start)


def test_env_errors_name_field_and_accepted():
    with pytest.raises(ValueError, match=r"n_arms=1 is not valid; accepted: an integer >= 2"):
        ContextualBanditEnv(n_arms=1)
    with pytest.raises(ValueError, match=r"start=0 is not valid; accepted: an integer in \[1, 5\]"):
        ChainEnv(length=7, start=0)


def test_chain_tables_match_gym_episodes():
    """Stepping the gymnasium env through every action sequence (noise off) ends with the
    reward the batched problem enumerates for that outcome, and visits its states."""
    env = ChainEnv(length=5, start=1, horizon=3, left_reward=0.3, right_reward=0.9, reward_noise="none")
    problem = chain_problem(env, groups_per_prompt=1)
    for m, seq in enumerate(itertools.product(range(3), repeat=3)):
        obs, _ = env.reset(seed=0)
        states = [obs]
        for action in seq:
            obs, reward, terminated, _, _ = env.step(action)
            states.append(obs)
        assert terminated
        assert reward == problem.reward_means[0, 0, m].item()
        assert states[:3] == problem.states[0, m].tolist()


def test_bandit_tables_match_env():
    problem = bandit_problem(3, 4, [5, 6], "bernoulli")
    for row, seed in enumerate([5, 6]):
        assert_close(problem.reward_means[row], torch.from_numpy(ContextualBanditEnv(3, 4, problem_seed=seed).reward_means))
