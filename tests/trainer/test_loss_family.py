"""The GRPO-family knobs in the trainer (docs/algorithms.md sections 6.3-6.6), through short fits of the micro
model: the reference is the one frozen RL-start copy, the entropy bonus is the logged entropy,
Dr. GRPO gets max_new_tokens and the batch's sample count, DAPO's shaping reaches the advantages,
oversampling keeps the informative groups."""

import pytest
import torch

import reclight.trainer.module as module_lib
from conftest import Capture, DigitTask, fit_micro, micro_module, micro_trainer
from reclight.advantages import truncated_responses, uniform_groups
from reclight.models.tokens import eos_ids
from reclight.trainer.data import RLDataModule


@pytest.mark.parametrize("log_kl_init", [True, False])
def test_reference_kl_uses_the_one_frozen_rl_start_copy(tmp_path, log_kl_init):
    """grpo_kl: k3 in the loss against the policy at the start of RL. At step 0 the policy IS the
    reference, so loss/kl and kl/ref are exactly 0; later they are positive. One frozen copy,
    shared with kl/init (logged only when asked)."""
    cap = Capture()
    module, _ = fit_micro(tmp_path, 3, callbacks=[cap], algorithm="grpo_kl", log_kl_init=log_kl_init)
    assert module._init_policy is not None
    copies = [m for m in vars(module).values() if isinstance(m, torch.nn.Module) and m is not module.policy]
    assert copies == []  # the frozen copy is not a registered module: not trained, not in the state dict
    assert cap.metrics[0]["loss/kl"] == 0.0 and cap.metrics[0]["kl/ref"] == 0.0
    assert cap.metrics[2]["kl/ref"] > 0 and cap.metrics[2]["loss/kl"] == pytest.approx(0.04 * cap.metrics[2]["kl/ref"])
    assert ("kl/init" in cap.metrics[2]) == log_kl_init


def test_entropy_bonus_is_minus_coef_times_the_logged_entropy(tmp_path):
    cap = Capture()
    fit_micro(tmp_path, 2, callbacks=[cap], log_kl_init=False, algorithm_overrides={"entropy_coef": 0.01})
    for m in cap.metrics.values():  # one update, every sample kept: the same tokens and the same forward
        assert m["loss/entropy"] == pytest.approx(-0.01 * m["policy/entropy"], rel=1e-5)


def test_dr_grpo_gets_max_new_tokens_and_the_batch_sample_count(tmp_path, monkeypatch):
    seen = []
    real = module_lib.policy_loss

    def record(*args, **kw):
        seen.append((kw["norm_length"], float(kw["num_samples"])))
        return real(*args, **kw)

    monkeypatch.setattr(module_lib, "policy_loss", record)
    fit_micro(tmp_path, 1, log_kl_init=False, algorithm="dr_grpo")
    assert seen == [(3, 6.0)]  # max_new_tokens 3; 2 prompts x K = 3 samples


def test_dapo_overlong_penalty_and_filter_reach_the_advantages(tmp_path, monkeypatch):
    """max_new_tokens 3: L = 3, C = max(1, 3 // 5) = 1, so a 3-token response gets -1 and a shorter
    one 0; with overlong_filter the truncated samples (no EOS within 3 tokens) leave the loss."""
    seen, masks = [], []
    real, real_loss = module_lib.group_advantages, module_lib.policy_loss

    def record(rewards, cfg, generator=None, *, valid=None):
        seen.append(rewards.clone())
        return real(rewards, cfg, generator, valid=valid)

    def record_loss(logp, logp_behav, adv, mask, cfg, **kw):
        masks.append(mask.clone())
        return real_loss(logp, logp_behav, adv, mask, cfg, **kw)

    monkeypatch.setattr(module_lib, "group_advantages", record)
    monkeypatch.setattr(module_lib, "policy_loss", record_loss)
    cap = Capture()
    module, _ = fit_micro(tmp_path, 2, callbacks=[cap], log_kl_init=False, algorithm="dapo",
                          algorithm_overrides={"overlong_filter": True})
    eos = eos_ids(module.tokenizer)
    for step, (rewards, mask) in enumerate(zip(seen, masks)):
        b = cap.batches[step]
        lengths = b.response_mask.sum(-1)
        assert torch.equal(rewards, b.rewards + torch.where(lengths == 3, -1.0, 0.0))
        truncated = truncated_responses(b.response_ids, b.response_mask, eos, 3)
        assert not mask[truncated].any()  # the loss never sees a truncated sample's tokens
    assert any(truncated_responses(b.response_ids, b.response_mask, eos, 3).any() for b in cap.batches.values())


def test_oversampling_keeps_the_informative_groups_first(tmp_path):
    """oversample 2 with 2 prompts per step: 4 prompts sampled, 2 groups kept, informative first."""
    cap = Capture()
    module = micro_module(tmp_path, log_kl_init=False)
    dm = RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4, eval_batch_size=4, seed=0, oversample=2.0)
    micro_trainer(tmp_path, 3, [cap]).fit(module, datamodule=dm)
    for step, b in cap.batches.items():
        assert b.rewards.shape[0] == 2 and b.sampled_groups == 4
        kept_informative = int((~uniform_groups(b.rewards, b.reward_valid)).sum())
        assert kept_informative == min(2, b.informative_groups)
        assert cap.metrics[step]["data/informative_frac"] == b.informative_groups / 4
    with pytest.raises(ValueError, match=r"data.oversample=0.5 is not valid; accepted: oversample >= 1"):
        RLDataModule(oversample=0.5)


def test_truncated_sampling_correction_reaches_the_loss(tmp_path, monkeypatch):
    """truncation_correction (docs/algorithms.md section 6.9): the HF engine records log S (the
    probability mass top-p kept) per token, and the trainer hands it to policy_loss, whose
    logp_behav becomes logp_behav - log S. With top_p 0.9 some token's S < 1; refused with the
    fast engine (it records no S)."""
    from reclight.engines.base import SamplingConfig
    from reclight.engines.config import EngineConfig
    from reclight.losses import policy_loss as real_policy_loss
    import reclight.trainer.module as module_py

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("logp_kept_mass"))
        return real_policy_loss(*args, **kwargs)

    monkeypatch.setattr(module_py, "policy_loss", spy)
    sampling = SamplingConfig(num_samples=3, max_new_tokens=3, top_p=0.9)
    fit_micro(tmp_path, 2, log_kl_init=False, algorithm="grpo", algorithm_overrides={"truncation_correction": True},
              sampling=sampling)
    assert seen and all(s is not None for s in seen)
    assert any(bool((s < 0).any()) for s in seen)  # some token's kept mass is below 1
    with pytest.raises(ValueError, match=r"model.algorithm.truncation_correction=True is not valid; accepted: false "
                                         r"with model.engine.name 'fast'"):
        micro_module(tmp_path, algorithm="grpo", algorithm_overrides={"truncation_correction": True},
                     sampling=sampling, engine=EngineConfig(name="fast"))
