"""Every config group's errors name the field as the user types it on the command line
(``model.sampling.num_samples``, never ``SamplingConfig.num_samples`` or ``sync.sync_interval``):
one bad value per group, through the real entry point, before any model is built."""

from pathlib import Path

import pytest

from reclight.trainer.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke_test.yaml"

CASES = {
    "model.policy": (["--model.policy.name_or_path", "/nonexistent/reclight-model"],
                     "model.policy.name_or_path='/nonexistent/reclight-model' is not valid: no such folder; accepted: "),
    "model.policy.tiny": (["--model.policy.tiny.num_layers", "0"],
                          "model.policy.tiny.num_layers=0 is not valid; accepted: an integer >= 1"),
    "model.policy.tiny (heads)": (["--model.policy.tiny.num_heads", "3"],
                                  "model.policy.tiny.hidden_size=32 is not valid; accepted: a multiple of "
                                  "model.policy.tiny.num_heads=3"),
    "model.engine": (["--model.engine.vllm.gpu_memory_utilization", "1.5"],
                     "model.engine.vllm.gpu_memory_utilization=1.5 is not valid; accepted: 0 < gpu_memory_utilization <= 1"),
    "model.train_forward": (["--model.train_forward.micro_batch_size", "0"],
                            "model.train_forward.micro_batch_size=0 is not valid; accepted: None or an integer >= 1"),
    "model.optim": (["--model.optim.lr", "0"], "model.optim.lr=0.0 is not valid; accepted: lr > 0"),
    "model.guards": (["--model.guards.max_abs_reward", "-1"],
                     "model.guards.max_abs_reward=-1.0 is not valid; accepted: max_abs_reward > 0"),
    "model.monitor": (["--model.monitor.eval_max_new_tokens", "0"],
                      "model.monitor.eval_max_new_tokens=0 is not valid; accepted: None or an integer >= 1"),
    "model.sync": (["--model.sync.sync_interval", "0"],
                   "model.sync.sync_interval=0 is not valid; accepted: an integer >= 1"),
    "model.updates": (["--model.updates.epochs", "0"], "model.updates.epochs=0 is not valid; accepted: an integer >= 1"),
    "model.sampling": (["--model.sampling.num_samples", "1"],
                       "model.sampling.num_samples=1 is not valid; accepted: an integer >= 2 (K, the group size"),
    "model.warmup": (["--model.warmup.lr", "0"], "model.warmup.lr=0.0 is not valid; accepted: lr > 0"),
    "model.algorithm": (["--model.algorithm.eps_low", "1.5"], "model.algorithm.eps_low=1.5 is not valid; accepted: "
                        "0 < eps_low < 1"),
    "model.clock": (["--model.clock.max_inflight", "0"], "model.clock.max_inflight=0 is not valid; accepted: "),
    "model.clock.costs": (["--model.clock.costs.decode_a", "-1"], "model.clock.costs.decode_a=-1.0 is not valid; "),
    "model.rollout": (["--model.rollout.workers", "2"], "model.rollout.workers=2 is not valid; accepted: 0 "
                      "(in-process) or 1 (one worker per rank"),
    "model.rollout.device": (["--model.rollout.device", "cuda:7"], "model.rollout.device='cuda:7' is not valid; "
                             "accepted: null, cpu or cuda:<i> with i < "),
    "model.rollout.engine": (["--model.clock.enabled", "true", "--model.rollout.workers", "1", "--model.engine.name",
                              "hf"], "model.engine.name='hf' is not valid; accepted: fast or auto with "
                                     "model.clock.enabled true"),
    "data": (["--data.eval_size", "0"], "data.eval_size=0 is not valid; accepted: None or an integer >= 1"),
}


@pytest.mark.parametrize("group", CASES)
def test_a_bad_value_names_the_field_as_typed(group, tmp_path):
    extra, expected = CASES[group]
    with pytest.raises(ValueError) as e:
        main(["--config", str(SMOKE), "--model.policy.tiny_dir", str(tmp_path / "tiny"), "--trainer.logger", "false",
              *extra], run=False)
    # model.warmup is an optional group: the parser's "any of the Union subtypes" wrapping is unwrapped
    assert str(e.value).startswith(expected), str(e.value)
    assert not (tmp_path / "tiny").exists()  # failed before the model was built


def test_every_group_of_the_module_has_a_case():
    """A new config group gets its case here (one test per group, issue #21 item 7)."""
    from reclight.trainer.config import MODEL_GROUPS

    assert {f"model.{name}" for name in MODEL_GROUPS} | {"data"} <= set(CASES)
