"""Rollout workers (``model.rollout``, reclight/rollout/workers.py, docs/async.md "Rollout workers"):
the asynchronous schedule's generation in a process of its own, concurrent with training.

- ``paced``: the worker runs the in-process queue's code on the weights the trainer publishes,
  so every batch and the final weights are bitwise those of the in-process run (both at 1
  thread per role): on-policy, one-step-off and with in-flight updates;
- its checkpoint state, taken when it is quiesced, is the in-process queue's;
- a worker that dies or stops answering stops the run within the heartbeat bound, naming it;
- what cannot work is refused when the config is built, naming the field.
"""

import re

import pytest
import torch

from conftest import Recorder, fit_micro
from reclight.clock import ClockConfig, ClockCosts
from reclight.engines.config import EngineConfig
from reclight.rollout.workers import WorkerRolloutQueue, WorkersConfig, alive
from reclight.trainer.config import TrainForwardConfig

FAST = dict(engine=EngineConfig(name="fast"), train_forward=TrainForwardConfig(impl="hf"))
COSTS = ClockCosts(decode_a=1.0, decode_b=0.05, train_c=2.0, train_e=0.01)
SETTINGS = {  # B = 2 groups per step
    "on_policy": ClockConfig(enabled=True, max_inflight=2, weight_update="drain", staleness="pace", max_staleness=0,
                             costs=COSTS),
    "one_step_off": ClockConfig(enabled=True, max_inflight=2, weight_update="drain", staleness="pace",
                                max_staleness=1, costs=COSTS),
    "inflight": ClockConfig(enabled=True, max_inflight=4, weight_update="inflight", staleness="pace",
                            max_staleness=1, recompute_kv_on_update=True, costs=COSTS),
}


class Batches(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.batches, self.pids = {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.batches[trainer.global_step] = batch
        if trainer.global_step == 0:
            self.theta0 = {k: v.detach().clone() for k, v in pl_module.policy.named_parameters()}
        if isinstance(pl_module.rollouts, WorkerRolloutQueue):
            self.pids.append(pl_module.rollouts.process.pid)


def _fit(tmp_path, steps, clock, workers=0, **kw):
    rec = Batches()
    module, _ = fit_micro(tmp_path, steps, callbacks=[rec], log_kl_init=False, clock=clock,
                          rollout=WorkersConfig(workers=workers, **kw), **FAST)
    return module, rec


def _assert_same_run(a, rec_a, b, rec_b):
    assert sorted(rec_a.batches) == sorted(rec_b.batches)
    for s in rec_a.batches:
        x, y = rec_a.batches[s], rec_b.batches[s]
        for name in ("example_index", "prompt_ids", "response_ids", "response_mask", "logp_behav", "version",
                     "token_version", "rewards", "reward_valid", "correct"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (s, name)
        assert {k: v for k, v in y.metrics.items() if not k.startswith("rollout/worker_")} == x.metrics, s
    for (name, p), q in zip(a.policy.named_parameters(), b.policy.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("setting", ["on_policy", "one_step_off", "inflight"])
def test_paced_worker_is_bitwise_the_in_process_run(tmp_path, setting):
    torch.set_num_threads(1)  # the reference: the in-process run at 1 thread (the worker's default)
    clock = SETTINGS[setting]
    ref, rec_ref = _fit(tmp_path / "ref", 4, clock)
    run, rec = _fit(tmp_path / "worker", 4, clock, workers=1)
    _assert_same_run(ref, rec_ref, run, rec)
    assert any(not torch.equal(rec.theta0[k], v) for k, v in run.policy.named_parameters())  # it trained
    # the worker measured its memory, and it is gone at the end of the run
    assert all(rec.batches[s].metrics["rollout/worker_rss_mib"] > 10 for s in rec.batches)
    assert len(set(rec.pids)) == 1 and not alive(rec.pids[0]) and run.rollouts.process is None
    assert (tmp_path / "worker" / "rollout-worker-0.log").read_text().startswith("rollout worker: pid ")
    if setting == "one_step_off":  # batch s + 1 was made with theta_s: staleness 1 is reached
        assert any(bool(rec.batches[s].version.lt(s).any()) for s in rec.batches)
    if setting == "inflight":  # a sample's tokens span versions: the swap landed mid-sequence
        assert any(bool((rec.batches[s].token_version != rec.batches[s].version[..., None]).any())
                   for s in rec.batches)


@pytest.mark.parametrize(
    "kwargs, field, accepted",
    [
        (dict(workers=2), "model.rollout.workers", "0 (in-process) or 1"),
        (dict(workers=-1), "model.rollout.workers", "0 (in-process) or 1"),
        (dict(mode="free"), "model.rollout.mode", "paced"),
        (dict(device="cuda:7"), "model.rollout.device", "null, cpu or cuda:<i> with i < "),
        (dict(device="gpu0"), "model.rollout.device", "null, cpu or cuda:<i>"),
        (dict(heartbeat_s=0.0), "model.rollout.heartbeat_s", "heartbeat_s > 0"),
        (dict(threads=0), "model.rollout.threads", "an integer >= 1"),
    ],
)
def test_bad_worker_settings_are_refused_naming_the_field(kwargs, field, accepted):
    with pytest.raises(ValueError, match=re.escape(field) + r"=.* is not valid; accepted: " + re.escape(accepted)):
        WorkersConfig(**kwargs)


def test_workers_need_the_asynchronous_schedule_on_the_fast_engine(tmp_path):
    from conftest import micro_module

    with pytest.raises(ValueError, match=r"model\.rollout\.workers=1 is not valid; accepted: 0 with "
                                         r"model\.clock\.enabled false"):
        micro_module(tmp_path, rollout=WorkersConfig(workers=1), **FAST)
    with pytest.raises(ValueError, match=r"model\.engine\.name='hf' is not valid"):
        micro_module(tmp_path, clock=SETTINGS["inflight"], rollout=WorkersConfig(workers=1),
                     engine=EngineConfig(name="hf"))


def test_workers_with_lora_are_refused_naming_both_fields(tmp_path):
    """A LoRA policy's parameters are base and adapter tensors; the worker's shared weights are the
    parameters by name and its engine would read the base without the adapter: refused."""
    from conftest import micro_module
    from reclight.models.lora import LoraConfig
    from reclight.trainer.config import PolicyConfig

    with pytest.raises(ValueError, match=r"model\.rollout\.workers=1 is not valid; accepted: 0 with "
                                         r"model\.policy\.lora\.enabled true"):
        micro_module(tmp_path, clock=SETTINGS["inflight"], rollout=WorkersConfig(workers=1), **FAST,
                     policy=PolicyConfig(lora=LoraConfig(enabled=True)))
