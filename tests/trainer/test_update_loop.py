"""Several updates per rollout batch (docs/algorithms.md section 6.1) and the proximal anchor (6.2) in the
trainer, through short in-process fits of the micro model.

The reference for "the same updates" is written out here by hand: the same policy loaded from
the same folder, the same fused AdamW, the mini-batches m, m + M, ... of the captured batch,
each update normalised by its own mini-batch's token and sequence counts.
"""

import pytest
import torch
from torch.testing import assert_close

import reclight.trainer.module as module_lib
from conftest import Capture, DigitTask, fit_micro, micro_module, micro_trainer
from reclight.advantages import group_advantages
from reclight.engines.config import EngineConfig
from reclight.losses import policy_loss
from reclight.models.forward import response_logprobs
from reclight.models.loading import load_causal_lm
from reclight.trainer.config import MonitorConfig, UpdatesConfig
from reclight.trainer.data import RLDataModule


def _reference(module, batch, epochs, mini_batches, lr=3e-2, clip=1.0):
    """The updates of one batch written out by hand, from the module's initial weights."""
    policy, _ = load_causal_lm(module._model_path)
    opt = torch.optim.AdamW(list(policy.parameters()), lr=lr, weight_decay=0.0, fused=True)
    adv, keep = group_advantages(batch.rewards, module.algo, valid=batch.reward_valid)
    mask = batch.response_mask & keep[..., None]
    B = batch.rewards.shape[0]
    for _ in range(epochs):
        for m in range(mini_batches):
            rows = torch.arange(m, B, mini_batches) if mini_batches > 1 else slice(None)
            logp, _ = response_logprobs(policy, batch.prompt_ids[rows], batch.prompt_mask[rows],
                                        batch.response_ids[rows], batch.response_mask[rows])
            loss, _ = policy_loss(logp, batch.logp_behav[rows], adv[rows], mask[rows], module.algo,
                                  num_tokens=mask[rows].sum().float().clamp(min=1),
                                  num_seqs=mask[rows].any(-1).sum().float().clamp(min=1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(policy.parameters()), clip)
            opt.step()
    return policy


def _fit_one(tmp_path, **kwargs):
    cap = Capture()
    module, _ = fit_micro(tmp_path, 1, callbacks=[cap], log_kl_init=False, **kwargs)
    return module, cap


def test_one_update_is_bitwise_the_plain_step(tmp_path):
    module, cap = _fit_one(tmp_path)
    ref = _reference(module, cap.batches[0], 1, 1)
    for (name, p), q in zip(module.policy.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


def test_two_epochs_of_two_mini_batches_are_four_hand_written_updates(tmp_path):
    """E = M = 2 on a batch of 2 prompts: updates on prompts {0}, {1}, {0}, {1}; the fit's weights
    equal the hand-written loop's within 1e-6, and differ from one update (the check can fail)."""
    module, cap = _fit_one(tmp_path, updates=UpdatesConfig(epochs=2, mini_batches=2))
    batch = cap.batches[0]
    ref = _reference(module, batch, 2, 2)
    one = _reference(module, batch, 1, 1)
    moved = 0.0
    for (name, p), q, r in zip(module.policy.named_parameters(), ref.parameters(), one.parameters()):
        assert_close(p, q, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, (q - r).abs().max().item())
    assert moved > 1e-3
    assert module.trainer.global_step == 1  # the step counts batches, not updates
    state = module.trainer.optimizers[0].state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {4}  # AdamW made 4 updates


def test_on_policy_first_update_has_ratio_one_later_ones_do_not(tmp_path, monkeypatch):
    """fp32 engine and trainer, on-policy: update 1 of each batch sees rho = 1 (within 1e-5 against
    the engine's logp_behav; EXACTLY 1 against the proximal anchor, the trainer's own forward);
    updates 2..4 moved the weights, so rho != 1 (the clipping can act on-policy)."""
    calls = []
    real = module_lib.policy_loss

    def record(logp, logp_behav, adv, mask, cfg, **kw):
        anchor = kw["logp_prox"] if cfg.needs_proximal else logp_behav
        rho = torch.where(mask, logp.detach() - anchor, 0.0).exp()[mask]
        calls.append((rho.min().item(), rho.max().item()))
        return real(logp, logp_behav, adv, mask, cfg, **kw)

    monkeypatch.setattr(module_lib, "policy_loss", record)
    for anchor, tol in (("behavior", 1e-5), ("proximal", 0.0)):
        calls.clear()
        fit_micro(tmp_path / anchor, 2, log_kl_init=False, updates=UpdatesConfig(epochs=2, mini_batches=2),
                  algorithm="rec_oneside_is", algorithm_overrides={"ratio_anchor": anchor})
        assert len(calls) == 8  # 2 steps x 4 updates, one policy_loss call each (no micro-batches)
        for step in range(2):
            first, later = calls[4 * step], calls[4 * step + 1: 4 * step + 4]
            assert 1 - tol <= first[0] and first[1] <= 1 + tol, (anchor, step, first)
            # updates 2-4 come after theta changed (unless a mini-batch's advantages were all 0:
            # then AdamW's first step is 0 too); the second epoch re-sees a mini-batch it moved
            assert any(hi - lo > 1e-3 for lo, hi in later), (anchor, step, later)


def test_proximal_logp_equals_behaviour_logp_on_policy_in_fp32_and_not_with_a_bf16_engine(tmp_path):
    """monitor.log_mismatch computes logp_prox (the trainer's forward at the start of the step).
    On-policy, fp32 engine and trainer: |logp_behav - logp_prox| <= 1e-5, weights 1. A bf16 engine
    against the fp32 trainer: the mismatch shows (weights not all 1)."""
    cap = Capture()
    fit_micro(tmp_path / "fp32", 3, callbacks=[cap], monitor=MonitorConfig(log_kl_init=False, log_mismatch=True))
    for m in cap.metrics.values():
        assert m["mismatch/logp_diff_max"] <= 1e-5 and abs(m["mismatch/weight_mean"] - 1) <= 1e-5
    cap = Capture()
    fit_micro(tmp_path / "bf16", 3, callbacks=[cap], monitor=MonitorConfig(log_kl_init=False, log_mismatch=True),
              engine=EngineConfig(dtype="bfloat16"))
    # bf16 weights round the logits by ~2^-8 relative: here max |diff| was 0.9e-3 .. 3e-3
    assert all(m["mismatch/logp_diff_max"] > 1e-4 for m in cap.metrics.values())
    assert all(abs(m["mismatch/weight_mean"] - 1) > 1e-5 for m in cap.metrics.values())


def test_mini_batches_must_divide_the_per_rank_prompts_before_the_model_loads(tmp_path, monkeypatch):
    import reclight.trainer.module as module_py

    def no_weights(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the check")

    monkeypatch.setattr(module_py, "load_causal_lm", no_weights)
    module = micro_module(tmp_path, updates=UpdatesConfig(mini_batches=3))
    dm = RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4, seed=0)
    with pytest.raises(ValueError, match=r"model.updates.mini_batches=3 is not valid; accepted: a divisor of the 2 "
                                         r"prompts per rank \(data.prompts_per_step=2 over 1 rank\(s\)\)"):
        micro_trainer(tmp_path, 1).fit(module, datamodule=dm)
    for bad in ({"epochs": 0}, {"mini_batches": True}):
        with pytest.raises(ValueError, match=r"model.updates.\w+=.* is not valid; accepted: an integer >= 1"):
            UpdatesConfig(**bad)
