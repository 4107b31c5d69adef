"""Per-step metrics of the rollout batch that are not the loss's own (rewards, lengths, entropy,
staleness, degenerate samples, rollout throughput), and how a step's metrics reach the loggers.

Why a step's metrics do not go through ``LightningModule.log``: Lightning 2.6 moves the stored
metric object to the value's device on every call (``_ResultCollection.log`` calls
``_ResultMetric.to``, which walks the metric's attributes), about 1.3-1.7 ms per key on this
project's CPUs. With ~30 keys a step that was 10-12% of the main job's RL phase (docs/benchmarks.md,
"Where the main job's time went"). :func:`publish_step_metrics` does what Lightning does with
them, in one pass: the same values (fp32 scalars) to every logger at the same step and cadence
(``trainer.log_every_n_steps``, and the last step of a stopping run), and into
``trainer.callback_metrics`` for callbacks (``ModelCheckpoint(monitor=...)``, ``EarlyStopping``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reclight.advantages import truncated_responses, uniform_groups
from reclight.rollout.batch import RolloutBatch


@torch.no_grad()
def rollout_health(
    response_ids: Tensor,  # [B, K, T] long
    response_mask: Tensor,  # [B, K, T] bool
    rewards: Tensor,  # [B, K]
    reward_valid: Tensor,  # [B, K] bool
    eos_ids: list[int],
    max_new_tokens: int,
) -> dict[str, Tensor]:
    """Fractions of degenerate samples in a rollout batch (all trained on as they are):

    - ``response/empty_frac``: responses with no token besides a final EOS (the EOS token still
      gets the sample's advantage: ending at once is a choice the policy made);
    - ``response/truncated_frac``: responses that hit ``max_new_tokens`` without an EOS (cut off;
      the task scores the cut text, usually as wrong);
    - ``reward/uniform_groups_frac``: groups whose valid rewards are all equal (or that have fewer
      than 2 valid rewards): their advantages are exactly 0, so only a regularizer moves them.
    """
    lengths = response_mask.sum(-1)  # [B, K]
    eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)) & response_mask
    has_eos = eos.any(-1)  # [B, K]
    empty = (lengths - has_eos.long()) <= 0
    truncated = truncated_responses(response_ids, response_mask, eos_ids, max_new_tokens)
    uniform = uniform_groups(rewards, reward_valid)  # [B]
    return {
        "response/empty_frac": empty.float().mean(),
        "response/truncated_frac": truncated.float().mean(),
        "reward/uniform_groups_frac": uniform.float().mean(),
    }




@torch.no_grad()
def batch_metrics(batch: RolloutBatch, entropy: Tensor, eos_ids: list[int], max_new_tokens: int) -> dict[str, Tensor]:
    """The step's metrics of its rollout batch (``entropy`` [B, K, T]: the policy's per-token
    entropy from the update's forward): reward and accuracy of the valid samples, response
    lengths, entropy, staleness (step - the version of each sample's oldest token), the degenerate
    samples of :func:`rollout_health`, DAPO's informative fraction, the rollout's tokens/s, and
    whatever the rollout path measured itself (``batch.metrics``: the asynchronous schedule's)."""
    m = batch.response_mask
    n_tok = m.sum().clamp(min=1)
    staleness = (batch.step - batch.version).float()
    valid = batch.reward_valid
    out = {
        "reward/mean": (batch.rewards * valid).sum() / valid.sum().clamp(min=1),
        "reward/acc": batch.correct.float().mean(),
        "reward/failed": (~valid).sum().float(),
        "response/len_mean": m.sum(-1).float().mean(),
        "response/len_max": m.sum(-1).float().max(),
        "policy/entropy": (entropy * m).sum() / n_tok,
        "rollout/staleness_mean": staleness.mean(),
        "rollout/staleness_max": staleness.max(),
        **rollout_health(batch.response_ids, m, batch.rewards, valid, eos_ids, max_new_tokens),
        **({"data/informative_frac": torch.tensor(batch.informative_groups / batch.sampled_groups)}
           if batch.sampled_groups else {}),
        "throughput/rollout_tok_s": n_tok / max(batch.gen_seconds, 1e-9),
    }
    out.update({k: torch.tensor(float(v)) for k, v in (batch.metrics or {}).items()})
    return out


def _plain(value: Tensor) -> Tensor:
    """A plain tensor of ``value``'s full value: under FSDP2 some metrics (the gradient norm) are
    ``DTensor``s, which cannot be stacked with plain tensors or turned into Python numbers
    (``full_tensor`` is collective: every rank publishes the same keys, so all take part)."""
    value = value.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def logged_step(trainer: Any, step: int) -> bool:
    """Whether training step ``step`` (0-based) writes a row to the loggers: Lightning's rule,
    ``(step + 1) % trainer.log_every_n_steps == 0`` or the run is stopping (never when
    ``log_every_n_steps`` is 0)."""
    every = trainer.log_every_n_steps
    return bool(every) and ((step + 1) % every == 0 or bool(trainer.should_stop))


def measured_step(trainer: Any, step: int, every: int) -> bool:
    """Whether a metric measured "every ``every`` steps" (``monitor.kl_init_every``) is measured at
    ``step``: only at logged steps (a value no row shows is not computed), at every
    ``ceil(every / log_every_n_steps)``-th of them, from the first: with ``log_every_n_steps: 1``
    steps 0, every, 2 * every, ...; with 50 and ``every`` <= 50, every logged step (49, 99, ...).
    A trainer without loggers (callbacks only): steps 0, every, 2 * every, ..."""
    if not trainer.loggers:
        return step % every == 0
    if not logged_step(trainer, step):
        return False
    n = trainer.log_every_n_steps
    return trainer.should_stop or ((step + 1) // n - 1) % -(-every // n) == 0


@torch.no_grad()
def publish_step_metrics(module: Any, metrics: dict[str, Tensor], step: int, bar: tuple[str, ...] = ()) -> None:
    """Hand one training step's scalar ``metrics`` to the loggers and callbacks as
    ``module.log(k, v, on_step=True, on_epoch=False)`` would (module docstring): logged at ``step``
    (the step the batch was for, Lightning's ``_batches_that_stepped``) with Lightning's ``epoch``
    column when ``(step + 1) % trainer.log_every_n_steps == 0`` or the run is stopping, always
    stored in ``trainer.callback_metrics``. The keys in ``bar`` also go through ``module.log`` for
    the progress bar only (``logger=False``)."""
    trainer = module.trainer
    keys = list(metrics)
    values = torch.stack([_plain(metrics[k]).float().reshape(()).cpu() for k in keys])  # one copy, one sync
    trainer.callback_metrics.update(dict(zip(keys, values.unbind())))
    for k in bar:
        if k in metrics:
            module.log(k, metrics[k].float(), on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1)
    if not module.loggers or not logged_step(trainer, step):
        return
    scalars = {**dict(zip(keys, values.tolist())), "epoch": trainer.current_epoch}
    for lg in module.loggers:
        lg.log_metrics(scalars, step=step)
        lg.save()
