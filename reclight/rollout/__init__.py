"""Rollout production: the batch format (:mod:`~reclight.rollout.batch`), the prompt sampler
(:mod:`~reclight.rollout.sampler`), scoring (:mod:`~reclight.rollout.scoring`) and the queue
that realises the off-policy schedule (:mod:`~reclight.rollout.queue`)."""

from reclight.rollout.batch import RolloutBatch
from reclight.rollout.queue import RolloutQueue
from reclight.rollout.sampler import PromptSampler

__all__ = ["PromptSampler", "RolloutBatch", "RolloutQueue"]
