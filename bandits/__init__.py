"""bandits: an exact-optimum simulation bench for the surrogate-loss theory of reclight.

Modules: :mod:`bandits.envs` (gymnasium environments, registered on import),
:mod:`bandits.exact` (closed forms and exact expectations of docs/algorithms.md section 5),
:mod:`bandits.problems` (batched tensor views of the environments), :mod:`bandits.simulate`
(vectorized stochastic runs under the off-policy settings), :mod:`bandits.claims` (the claim
rules), :mod:`bandits.suite` (the report) and :mod:`bandits.cli`.

The bench calls ``reclight.losses``, ``reclight.advantages`` and ``reclight.sync``; it never
re-implements them.
"""

from bandits.envs import BANDIT_ID, CHAIN_ID, register_envs

register_envs()

__all__ = ["BANDIT_ID", "CHAIN_ID", "register_envs"]
