"""RLModule, through short in-process fits of the micro model.

- micro-batching uses the exact global token counts: micro_batch_size=1 gives the weights of one
  step over the whole batch;
- the batch reaches ``training_step`` as its argument (a RolloutBatch of that step), built
  outside autocast by the rollout queue;
- ``kl/init`` is measured against the RL-start policy: exactly 0 at step 0 (the policy IS the
  start policy then), positive once the weights moved, and equal to the library estimator
  recomputed from the frozen copy.
"""

import lightning.pytorch as pl
import pytest
import torch
from torch.testing import assert_close

from conftest import DigitTask, fit_micro, micro_module
from reclight.rollout.queue import RolloutQueue
from reclight.trainer.data import RLDataModule
from reclight.losses import kl_estimate
from reclight.rollout.batch import RolloutBatch
from reclight.trainer.config import TrainForwardConfig
from reclight.trainer.module import RLModule


def _first_step_gradients(tmp_path, monkeypatch, **kwargs) -> list[torch.Tensor]:
    """The gradient step 0's update applies (captured when the optimizer is about to step)."""
    grads = []
    real = RLModule._clip_and_step

    def capture(self, loss, step, last=True):
        if step == 0:
            grads.extend(p.grad.detach().clone() for p in self.policy.parameters())
        return real(self, loss, step, last)

    monkeypatch.setattr(RLModule, "_clip_and_step", capture)
    fit_micro(tmp_path, 1, log_kl_init=False, **kwargs)
    monkeypatch.undo()
    return grads


def test_micro_batches_match_full_batch(tmp_path, monkeypatch):
    """micro_batch_size=1 accumulates the gradient of the whole batch: every micro-batch's loss
    divides by the FULL batch's token count, so the sum is the full-batch gradient, not an
    average of per-micro-batch means.

    Precision pinned: fp32 (the micro trainer's 32-true, fp32 weights). The two runs sample the
    same tokens (same weights, same seed) and differ only in how the backward pass groups the
    sum: each gradient entry is a sum over <= B*K*T = 18 token terms, each itself a reduction over
    at most 32 hidden units, and the kernels that compute those reductions may block and order them
    differently for a 1-prompt and a 2-prompt batch (they do on AVX-512 CPUs, not on AVX2 ones).
    fp32 unit round-off is 2^-24 ~ 6e-8 per addition; a ~50-term reduction carries at most
    ~50 x 6e-8 = 3e-6 of relative error of the sum of magnitudes, so entries agree within
    1e-5 x the tensor's largest magnitude (plus 1e-9 absolute for entries that are sums of
    cancelling terms near 0).

    The weights after the step are NOT compared: Adam's first update is lr * g / (|g| + eps),
    i.e. lr * sign(g) for |g| >> eps = 1e-8, so an entry whose true gradient is ~1e-9 moves by
    a different fraction of lr under any rounding difference (that made this test fail on a CPU
    with avx512_bf16 when it compared weights to 1e-6)."""
    full = _first_step_gradients(tmp_path / "full", monkeypatch)
    micro = _first_step_gradients(tmp_path / "micro", monkeypatch, train_forward=TrainForwardConfig(micro_batch_size=1))
    assert len(full) == len(micro) > 0
    for g, h in zip(full, micro):
        scale = g.abs().max().item()
        assert_close(h, g, rtol=0, atol=1e-5 * scale + 1e-9)
    assert max(g.abs().max().item() for g in full) > 1e-4  # a real gradient, not all zeros


def test_micro_batched_step_moves_the_weights(tmp_path):
    """One step at lr 3e-2 really moves the weights (so the gradient comparison above is about a
    step that trains)."""
    full, _ = fit_micro(tmp_path / "full", 1, log_kl_init=False)
    init, _ = fit_micro(tmp_path / "zero", 1, log_kl_init=False, lr=1e-12)
    moved = max((p - q).abs().max().item() for p, q in zip(full.policy.parameters(), init.policy.parameters()))
    assert moved > 1e-3


def test_training_step_gets_the_steps_rollout_batch_outside_autocast(tmp_path, monkeypatch):
    seen = []
    real = RLModule.training_step

    def training_step(self, batch, batch_idx):
        seen.append((type(batch), batch.step, self.global_step, torch.is_autocast_enabled("cpu")))
        return real(self, batch, batch_idx)

    autocast_in_queue = []
    real_batch = RolloutQueue.batch_for_step
    monkeypatch.setattr(RolloutQueue, "batch_for_step",
                        lambda self, step, policy: (autocast_in_queue.append(torch.is_autocast_enabled("cpu")),
                                                    real_batch(self, step, policy))[1])
    monkeypatch.setattr(RLModule, "training_step", training_step)
    module = micro_module(tmp_path)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path), accelerator="cpu", devices=1, precision="bf16-mixed")
    trainer.fit(module, datamodule=RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4, seed=0))
    assert [(t, s, g) for t, s, g, _ in seen] == [(RolloutBatch, i, i) for i in range(3)]
    assert all(on for *_, on in seen)  # training_step runs under bf16 autocast ...
    assert autocast_in_queue == [False, False, False]  # ... the rollouts are generated outside it


def test_kl_init_is_zero_at_the_start_and_matches_the_estimator(tmp_path):
    logged = {}

    class Grab(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            logged.setdefault("batches", {})[trainer.global_step] = batch
            logged.setdefault("weights", {})[trainer.global_step] = {
                n: p.detach().clone() for n, p in pl_module.policy.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.setdefault("kl", {})[trainer.global_step - 1] = float(trainer.callback_metrics["kl/init"])

    module, _ = fit_micro(tmp_path, 3, callbacks=[Grab()])
    assert logged["kl"][0] == 0.0  # step 0: the policy is the RL-start policy, d = 0 exactly
    assert logged["kl"][2] > 0.0
    # Recompute step 2's value: the frozen copy is the RL-start policy (its weights = step 0's).
    init = module._init_policy.model
    for name, p in init.named_parameters():
        assert torch.equal(p, logged["weights"][0][name]), name
    b = logged["batches"][2]
    policy = module.policy
    with torch.no_grad():
        for name, p in policy.named_parameters():
            p.copy_(logged["weights"][2][name])
        rows = slice(None)
        logp, _ = module._logprobs(policy, b, rows)
        logp_init, _ = module._logprobs(init, b, rows)
    expected = kl_estimate(logp, logp_init, b.response_mask, logp_behav=b.logp_behav)
    assert logged["kl"][2] == pytest.approx(expected.item(), rel=1e-5)
