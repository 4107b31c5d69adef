"""Batched tensor views of the environments, for many seeds at once.

A :class:`TabularProblem` is the environment of :mod:`bandits.envs` unrolled into tables:
P prompts, each with M enumerated outcomes (a bandit arm, or a whole chain trajectory), each
outcome a sequence of T (state, action) tokens. A tabular policy is a ``[R, S, A]`` logits
tensor, one row per (setting, seed) run. Because every outcome is enumerated, the expected
reward, the entropy and the KL to the optimum are exact; only the training batches are
sampled.

- Bandit: P = S contexts, M = A arms, T = 1. Each seed has its own reward table (drawn by
  ``ContextualBanditEnv(problem_seed=seed)``).
- Chain: P = 1 start, M = 3^T action sequences, T = horizon; the reward table is shared.
- Chain prompts (:class:`PromptedProblem`, the asynchronous bench): P chains with their own
  horizons H_p, M_p = 3^{H_p} outcomes each, padded to the largest M and T.

"KL to the optimal policy" is KL(pi_opt || pi_theta) with pi_opt = ``kl_regularized_optimum(
pi_0, r, tau=1e-3)`` per prompt: the reward-maximising policy closest to the initial policy
(it spreads over ties, e.g. the many chain trajectories that end at the right wall, the way
pi_0 does). It is finite while pi_theta has full support and grows when pi_theta collapses
onto a suboptimal outcome.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bandits.envs import ChainEnv, ChainPromptsEnv, ContextualBanditEnv
from bandits.exact import entropy, kl_divergence, kl_regularized_optimum

OPT_TAU = 1e-3
"""Temperature of the optimum used for the ``kl/opt`` metric (see the module docstring)."""


@dataclass
class TabularProblem:
    """P prompts x M outcomes x T tokens over a tabular policy with S states and A actions."""

    name: str
    states: Tensor  # [P, M, T] long, state index of each token
    actions: Tensor  # [P, M, T] long, action of each token
    reward_means: Tensor  # [R or 1, P, M], mean reward of each outcome
    n_states: int
    n_actions: int
    bernoulli: bool
    groups_per_prompt: int = 1

    @property
    def horizon(self) -> int:
        return self.states.shape[-1]

    def token_logp(self, logits: Tensor, outcomes: Tensor, prompts: Tensor) -> Tensor:
        """log pi(a_t | s_t) of every token of the given outcomes.

        logits [R, S, A]; outcomes [R, B, K] long (indices into M); prompts [B] long.
        Returns [R, B, K, T].
        """
        table = torch.log_softmax(logits, -1).flatten(1)  # [R, S*A]
        flat = self.states * self.n_actions + self.actions  # [P, M, T]
        idx = flat[prompts[None, :, None], outcomes]  # [R, B, K, T]
        return table.gather(1, idx.flatten(1)).view(idx.shape)

    def outcome_logp(self, logits: Tensor) -> Tensor:
        """log pi(outcome | prompt) of every enumerated outcome. [R, S, A] -> [R, P, M]"""
        table = torch.log_softmax(logits, -1).flatten(1)  # [R, S*A]
        flat = (self.states * self.n_actions + self.actions).flatten()  # [P*M*T]
        per_tok = table[:, flat].view(logits.shape[0], *self.states.shape)
        return per_tok.sum(-1)

    def prompts(self) -> Tensor:
        """The prompt of each of the B groups of a step: every prompt, ``groups_per_prompt``
        times. [B] long"""
        n_prompts = self.states.shape[0]
        return torch.arange(n_prompts).repeat_interleave(self.groups_per_prompt)

    def sample(
        self, logits_behav: Tensor, group_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw K outcomes per group from the behaviour policy, and their rewards.

        logits_behav [R, S, A]. Returns ``(prompts [B], outcomes [R, B, K], rewards [R, B, K])``.
        """
        prompts = self.prompts()
        probs = self.outcome_logp(logits_behav).exp()[:, prompts]  # [R, B, M]
        rows, n_groups, n_out = probs.shape
        outcomes = torch.multinomial(
            probs.reshape(-1, n_out), group_size, replacement=True, generator=generator
        ).view(rows, n_groups, group_size)
        means = self.reward_means.expand(rows, -1, -1)[:, prompts]  # [R, B, M]
        rewards = means.gather(-1, outcomes)
        if self.bernoulli:
            rewards = (torch.rand(rewards.shape, generator=generator) < rewards).to(rewards.dtype)
        return prompts, outcomes, rewards

    def optimal_logp(self, logits_init: Tensor) -> Tensor:
        """log pi_opt per prompt (see the module docstring). [R, S, A] -> [R, P, M]"""
        pi_0 = self.outcome_logp(logits_init).exp()
        pi_opt = kl_regularized_optimum(pi_0, self.reward_means.expand_as(pi_0), OPT_TAU)
        return pi_opt.clamp(min=1e-300).log()

    @torch.no_grad()
    def exact_metrics(self, logits: Tensor, logp_opt: Tensor) -> dict[str, Tensor]:
        """Exact per-row metrics of the policy ``logits`` [R, S, A], averaged over prompts.

        Returns ``reward/expected`` (E_pi r), ``kl/opt`` (KL(pi_opt || pi)) and
        ``policy/entropy`` (of the outcome distribution), each ``[R]``.
        """
        logp = self.outcome_logp(logits)  # [R, P, M]
        pi = logp.exp()
        return {
            "reward/expected": (pi * self.reward_means).sum(-1).mean(-1),
            "kl/opt": kl_divergence(logp_opt, logp).mean(-1),
            "policy/entropy": entropy(logp).mean(-1),
        }

    def repeat_rows(self, n: int) -> "TabularProblem":
        """The same problem for ``n`` copies of every per-seed row (setting-major), so that row
        ``i * seeds + j`` is seed j. Problems with a shared table are returned unchanged."""
        if self.reward_means.shape[0] == 1:
            return self
        return dataclasses.replace(self, reward_means=self.reward_means.repeat(n, 1, 1))

    def optimal_reward(self) -> Tensor:
        """max_m r per prompt, averaged over prompts. [R or 1]"""
        return self.reward_means.amax(-1).mean(-1)


def bandit_problem(
    n_contexts: int, n_arms: int, seeds: list[int], reward_noise: str
) -> TabularProblem:
    """One contextual bandit per seed, reward tables from ``ContextualBanditEnv``."""
    means = [
        ContextualBanditEnv(n_contexts, n_arms, reward_noise=reward_noise, problem_seed=s).reward_means
        for s in seeds
    ]
    contexts = torch.arange(n_contexts)[:, None, None].expand(n_contexts, n_arms, 1)
    arms = torch.arange(n_arms)[None, :, None].expand(n_contexts, n_arms, 1)
    return TabularProblem(
        name="bandit",
        states=contexts.contiguous(),
        actions=arms.contiguous(),
        reward_means=torch.from_numpy(np.stack(means)),
        n_states=n_contexts,
        n_actions=n_arms,
        bernoulli=reward_noise == "bernoulli",
    )


def chain_problem(env: ChainEnv, groups_per_prompt: int) -> TabularProblem:
    """Every action sequence of the chain ``env`` from its start, with its final reward."""
    seqs = torch.tensor(list(itertools.product(range(3), repeat=env.horizon)))  # [M, T]
    states = torch.empty_like(seqs)
    final_means = torch.empty(len(seqs), dtype=torch.float64)
    for m, seq in enumerate(seqs.tolist()):
        pos = env.start
        for t, action in enumerate(seq):
            states[m, t] = env.state_index(t, pos)
            pos = int(env.next_position[pos, action])
        final_means[m] = env.final_reward_means[pos]
    return TabularProblem(
        name="chain",
        states=states[None],
        actions=seqs[None],
        reward_means=final_means[None, None],
        n_states=env.horizon * env.length,
        n_actions=3,
        bernoulli=env.reward_noise == "bernoulli",
        groups_per_prompt=groups_per_prompt,
    )


@dataclass
class PromptedProblem:
    """P prompts with their own horizons H_p, every outcome enumerated: prompt p has M_p
    outcomes of H_p tokens, padded to M = max M_p outcomes and T = max H_p tokens (padding:
    state and action 0, never a valid token or outcome). A response's length depends on its
    prompt only, so a schedule of the clock is a function of the prompts alone."""

    name: str
    states: Tensor  # [P, M, T] long
    actions: Tensor  # [P, M, T] long
    horizons: Tensor  # [P] long, H_p
    n_outcomes: Tensor  # [P] long, M_p
    reward_means: Tensor  # [R or 1, P, M], 0 on padded outcomes
    n_states: int
    n_actions: int
    bernoulli: bool

    @property
    def n_prompts(self) -> int:
        return self.states.shape[0]

    @property
    def horizon(self) -> int:
        return self.states.shape[-1]

    def token_mask(self, prompts: Tensor) -> Tensor:
        """Real tokens of prompts [B]: t < H_p. Returns [B, T] bool."""
        return torch.arange(self.horizon)[None, :] < self.horizons[prompts][:, None]

    def outcome_valid(self) -> Tensor:
        """Real outcomes, m < M_p. [P, M] bool"""
        return torch.arange(self.states.shape[1])[None, :] < self.n_outcomes[:, None]

    def flat_index(self) -> Tensor:
        """state * A + action of every token. [P, M, T] long"""
        return self.states * self.n_actions + self.actions

    def token_logp(self, logits: Tensor, outcomes: Tensor, prompts: Tensor) -> Tensor:
        """log pi(a_t | s_t) of the sampled outcomes, 0 on padded tokens.
        logits [R, S, A]; outcomes [R, B, K]; prompts [B]. Returns [R, B, K, T]."""
        table = torch.log_softmax(logits, -1).flatten(1)  # [R, S*A]
        idx = self.flat_index()[prompts[None, :, None], outcomes]  # [R, B, K, T]
        logp = table.gather(1, idx.flatten(1)).view(idx.shape)
        return logp * self.token_mask(prompts)[None, :, None, :]

    def outcome_logp(self, logits: Tensor) -> Tensor:
        """log pi(outcome | prompt), -inf on padded outcomes. [R, S, A] -> [R, P, M]"""
        table = torch.log_softmax(logits, -1).flatten(1)
        per_tok = table[:, self.flat_index().flatten()].view(logits.shape[0], *self.states.shape)
        tok_mask = torch.arange(self.horizon)[None, None, :] < self.horizons[:, None, None]  # [P, 1, T]
        logp = (per_tok * tok_mask).sum(-1)
        return logp.masked_fill(~self.outcome_valid(), -torch.inf)

    @torch.no_grad()
    def exact_metrics(self, logits: Tensor) -> dict[str, Tensor]:
        """Exact ``reward/expected`` [R] (uniform over prompts), ``reward/by_prompt`` [R, P] and
        ``policy/entropy`` [R] (of the outcome distribution, mean over prompts)."""
        logp = self.outcome_logp(logits)
        by_prompt = (logp.exp() * self.reward_means).sum(-1)
        return {"reward/expected": by_prompt.mean(-1), "reward/by_prompt": by_prompt,
                "policy/entropy": entropy(logp).mean(-1)}

    def optimal_reward(self) -> Tensor:
        """max over real outcomes of r, per prompt. [R or 1, P]"""
        return self.reward_means.masked_fill(~self.outcome_valid(), -torch.inf).amax(-1)


def chain_prompts_problem(env: ChainPromptsEnv) -> PromptedProblem:
    """Every action sequence of every prompt of ``env``, padded (see :class:`PromptedProblem`)."""
    parts = [chain_problem(chain, 1) for chain in env.chains]
    n_out = [p.states.shape[1] for p in parts]
    m_max, t_max = max(n_out), max(env.horizons)
    n_prompts = len(parts)
    states = torch.zeros(n_prompts, m_max, t_max, dtype=torch.long)
    actions = torch.zeros_like(states)
    means = torch.zeros(1, n_prompts, m_max, dtype=torch.float64)
    for p, (part, h) in enumerate(zip(parts, env.horizons)):
        states[p, : n_out[p], :h] = part.states[0] + env.state_offset[p]
        actions[p, : n_out[p], :h] = part.actions[0]
        means[0, p, : n_out[p]] = part.reward_means[0, 0]
    return PromptedProblem(
        name="chain_prompts", states=states, actions=actions, horizons=torch.tensor(env.horizons),
        n_outcomes=torch.tensor(n_out), reward_means=means, n_states=env.observation_space.n, n_actions=3,
        bernoulli=env.chains[0].reward_noise == "bernoulli")
