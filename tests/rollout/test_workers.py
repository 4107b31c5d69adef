"""Rollout workers (``model.rollout``, reclight/rollout/workers.py, docs/async.md "Rollout workers"):
the asynchronous schedule's generation in a process of its own, concurrent with training.

- ``paced``: the worker runs the in-process queue's code on the weights the trainer publishes,
  so every batch and the final weights are bitwise those of the in-process run (both at 1
  thread per role): on-policy, one-step-off and with in-flight updates;
- ``free``: the real clock decides, so no run is a reference; what must hold does: every
  trained token was sampled by the weights of the version recorded for it (its log-prob under
  those weights is ``logp_behav``), the staleness rule bounds what is trained, and a state taken
  while the worker generates loads back and the run goes on;
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
    "inflight_drop": ClockConfig(enabled=True, max_inflight=4, weight_update="inflight", staleness="drop",
                                 max_staleness=1, costs=COSTS),
}


class Batches(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.batches, self.pids = {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.batches[trainer.global_step] = batch
        self.thetas = getattr(self, "thetas", {})  # theta_s: the weights version s published
        self.thetas[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.policy.named_parameters()}
        if trainer.global_step == 0:
            self.theta0 = self.thetas[0]
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


def _logp_under(policy, theta, batch):
    """log-probs of ``batch``'s responses under the weights ``theta`` (the HF forward, fp32)."""
    import copy

    from reclight.models.forward import response_logprobs

    model = copy.deepcopy(policy)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(theta[name])
        return response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                 batch.response_mask)[0]


def test_free_worker_trains_on_tokens_of_the_versions_it_records(tmp_path):
    """One-step-off with drain (every group decodes with one version): each trained group's
    behaviour log-probs are its tokens' log-probs under theta of its recorded version (1e-5, the
    fast engine against the HF forward), versions are s or s - 1, and the run trains."""
    torch.set_num_threads(1)
    run, rec = _fit(tmp_path, 6, SETTINGS["one_step_off"], workers=1, mode="free")
    assert sorted(rec.batches) == list(range(6))
    for s, b in rec.batches.items():
        assert torch.equal(b.token_version, b.version[..., None].expand_as(b.token_version)), s  # drain: one each
        assert int(b.version.min()) >= s - 1 and int(b.version.max()) <= s, (s, b.version)
        assert b.metrics["async/staleness_max"] == s - int(b.version.min())
        for g in range(b.version.shape[0]):
            v = int(b.version[g, 0])
            want = _logp_under(run.policy, rec.thetas[v], b)[g]
            m = b.response_mask[g]
            assert torch.allclose(b.logp_behav[g][m], want[m], rtol=0, atol=1e-5), (s, g, v)
            if v != s:  # a stale group is not what the trainer's current weights give
                assert not torch.allclose(b.logp_behav[g][m], _logp_under(run.policy, rec.thetas[s], b)[g][m],
                                          rtol=0, atol=1e-5), (s, g)
        assert b.metrics["rollout/worker_rss_mib"] > 10 and b.metrics["rollout/worker_idle_s"] >= 0
    assert any(int(b.version.min()) < s for s, b in rec.batches.items())  # staleness 1 happened
    assert any(not torch.equal(rec.theta0[k], v) for k, v in run.policy.named_parameters())
    assert "mode free" in (tmp_path / "rollout-worker-0.log").read_text()
    assert not alive(rec.pids[0]) and run.rollouts.process is None


class StateMidRun(Batches):
    """At the end of step 2 (the worker generating the next batches), take the queue's state,
    check it, and load it back: the run must go on from it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == 3:
            self.state = pl_module.rollouts.state_dict()
            pl_module.rollouts.load_state_dict(self.state)


def test_free_worker_drop_rule_and_a_state_taken_while_it_generates(tmp_path):
    """In-flight swaps under ``drop`` (eta 1): a sample's token versions never decrease, no
    trained group is more than one version old, and a state taken mid-run (the worker stops
    between two events) is the clock after step 2 and loads back, the run going on to step 6."""
    torch.set_num_threads(1)
    rec = StateMidRun()
    run, _ = fit_micro(tmp_path, 6, callbacks=[rec], log_kl_init=False, clock=SETTINGS["inflight_drop"],
                       rollout=WorkersConfig(workers=1, mode="free"), **FAST)
    assert sorted(rec.batches) == list(range(6))
    for s, b in rec.batches.items():
        assert int(b.version.min()) >= s - 1 and int(b.token_version.max()) <= s, s
        tv = b.token_version.masked_fill(~b.response_mask, 10**6)  # past the end: ignore
        assert bool((tv[..., 1:] >= b.token_version[..., :-1]).all()), s  # versions only move forward
    clock = rec.state["clock"]
    assert clock["next_step"] == 3 and clock["published"] == 2
    assert all(g["token_versions"] and max(g["token_versions"]) <= 2 for g in clock["live"])
    assert not alive(rec.pids[0])


@pytest.mark.parametrize(
    "kwargs, field, accepted",
    [
        (dict(workers=2), "model.rollout.workers", "0 (in-process) or 1"),
        (dict(workers=-1), "model.rollout.workers", "0 (in-process) or 1"),
        (dict(mode="free"), "model.rollout.mode", "paced with model.rollout.workers 0"),
        (dict(workers=1, mode="async"), "model.rollout.mode", "paced, free"),
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
