"""The asynchronous schedule in the LLM trainer (docs/algorithms.md section 7, docs/async.md),
through short in-process fits of the micro model with ``model.clock.enabled``:

- ``pace``, eta = 0, ``drain``, ``max_inflight = B`` is the synchronous on-policy loop: step s
  trains the stream's prompts sB .. (s+1)B - 1 (the per-step view's ``for_step(s)``) and every
  token has version s;
- a run is a function of its config and seed (two runs: the same batches and weights, bitwise);
- every token's ``logp_behav`` comes from the weights that sampled it: with in-flight updates
  and re-prefill, the log-prob of each token under the trainer's snapshot of its version;
- what cannot work is refused when the config is built, naming the field.
"""

import re

import pytest
import torch
from torch.testing import assert_close

from conftest import Recorder, fit_micro
from reclight.clock import ClockConfig, ClockCosts
from reclight.engines.base import SamplingConfig
from reclight.engines.config import EngineConfig
from reclight.models.forward import response_logprobs
from reclight.trainer.config import TrainForwardConfig

FAST = dict(engine=EngineConfig(name="fast"), train_forward=TrainForwardConfig(impl="hf"))
COSTS = ClockCosts(decode_a=1.0, decode_b=0.05, train_c=2.0, train_e=0.01)


class Batches(Recorder):
    """Records every step's batch and the policy's weights when the step starts (theta_s)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches, self.weights = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.batches[trainer.global_step] = batch
        self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}


def _fit(tmp_path, steps, clock, **kw):
    rec = Batches()
    module, _ = fit_micro(tmp_path, steps, callbacks=[rec], log_kl_init=False, clock=clock, **FAST, **kw)
    return module, rec


def test_pace_eta0_drain_with_b_slots_is_the_synchronous_on_policy_loop(tmp_path):
    clock = ClockConfig(enabled=True, max_inflight=2, weight_update="drain", staleness="pace", max_staleness=0,
                        costs=COSTS)
    module, rec = _fit(tmp_path, 4, clock)
    for s, batch in rec.batches.items():
        assert batch.example_index.tolist() == module.prompts.for_step(s)[0]  # groups sB .. (s+1)B - 1
        assert set(batch.token_version[batch.response_mask].tolist()) == {s}  # on-policy: theta_s only
        assert batch.version.eq(s).all() and batch.metrics["async/staleness_max"] == 0
        # the synchronous loop with the same costs is this run: no emulated speedup (sync_cost is 0)
        assert batch.metrics["async/speedup"] == pytest.approx(1.0, rel=1e-12)
    assert module.global_step == 4


def test_a_run_is_a_function_of_its_config_and_seed(tmp_path):
    clock = ClockConfig(enabled=True, max_inflight=4, weight_update="inflight", staleness="pace", max_staleness=1,
                        costs=COSTS)
    a, rec_a = _fit(tmp_path / "a", 4, clock)
    b, rec_b = _fit(tmp_path / "b", 4, clock)
    for s in rec_a.batches:
        x, y = rec_a.batches[s], rec_b.batches[s]
        for name in ("response_ids", "response_mask", "logp_behav", "token_version", "rewards", "example_index"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (s, name)
        assert x.metrics == y.metrics
    for (name, p), q in zip(a.policy.named_parameters(), b.policy.parameters()):
        assert torch.equal(p, q), name
    # in flight: some group was trained on tokens of an older version than the step's, and the
    # overlap of generation with training shows as an emulated speedup over the synchronous loop
    assert any(bool((rec_a.batches[s].version < s).any()) for s in rec_a.batches)
    assert rec_a.batches[3].metrics["async/speedup"] > 1.0


@pytest.mark.parametrize("recompute", [True, False])
def test_every_token_logp_behav_is_from_the_weights_that_sampled_it(tmp_path, recompute):
    """Micro model, fp32 (32-true trainer, fp32 engine copy). With re-prefill every token of
    version v was drawn from theta_v given its whole prefix, so its logp_behav equals the
    trainer's fp32 log-prob under theta_v (the snapshot taken when step v started) within
    1e-5 (two fp32 forwards of the same numbers summed in another order: the fast engine's
    fused matmuls vs HF's). With the cache kept (PipelineRL) the prefix's keys/values of an
    older version remain, so tokens decoded after a swap generally differ from theta_v's."""
    clock = ClockConfig(enabled=True, max_inflight=4, weight_update="inflight", staleness="none",
                        recompute_kv_on_update=recompute, costs=COSTS)
    module, rec = _fit(tmp_path, 5, clock, sampling=SamplingConfig(num_samples=3, max_new_tokens=6))
    policy = module.policy
    spanned, worst_stale = 0, 0.0
    for s, batch in rec.batches.items():
        spanned += int((batch.token_version.amax(-1) > batch.token_version.amin(-1)).any())
        for v in batch.token_version[batch.response_mask].unique().tolist():
            policy.load_state_dict(rec.weights[v])
            with torch.no_grad():
                logp, _ = response_logprobs(policy, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                            batch.response_mask, temperature=1.0)
            sel = batch.response_mask & (batch.token_version == v)
            if recompute or v == 0 or s == 0:
                assert_close(batch.logp_behav[sel], logp[sel], rtol=0, atol=1e-5)
            else:
                worst_stale = max(worst_stale, (batch.logp_behav[sel] - logp[sel]).abs().max().item())
    assert spanned > 0  # some sample's tokens came from two versions
    if not recompute:
        assert worst_stale > 1e-4  # the kept cache is visible


@pytest.mark.parametrize("change, field", [
    ({"engine": EngineConfig(name="hf")}, "model.engine.name='hf' is not valid; accepted: fast or auto"),
    ({"sampling": "top_p"}, "model.sampling.top_p=0.9 is not valid; accepted: 1.0 with model.clock.enabled"),
    ({"sync": "lag"}, "model.sync={'sync_interval': 1, 'sync_offset': 2, 'offline': False} is not valid"),
], ids=["hf engine", "top_p", "sync"])
def test_what_cannot_work_is_refused_before_any_model_loads(tmp_path, change, field):
    from conftest import micro_module
    from reclight.sync import SyncConfig

    if change.get("sampling") == "top_p":  # engine auto: the fast engine's own top_p check does not apply
        change = {"sampling": SamplingConfig(num_samples=3, max_new_tokens=3, top_p=0.9), "engine": EngineConfig()}
    if change.get("sync") == "lag":
        change = {"sync": SyncConfig(sync_offset=2)}
    with pytest.raises(ValueError, match=re.escape(field)):
        micro_module(tmp_path, clock=ClockConfig(enabled=True), **{**FAST, **change})
    assert not (tmp_path / "tiny").exists()


def test_oversampling_is_refused_with_the_clock(tmp_path):
    from conftest import DigitTask, micro_module, micro_trainer
    from reclight.trainer.data import RLDataModule

    module = micro_module(tmp_path, clock=ClockConfig(enabled=True), **FAST)
    dm = RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4, seed=0, oversample=2.0)
    with pytest.raises(ValueError, match=r"data.oversample=2.0 is not valid; accepted: 1.0 with model.clock.enabled"):
        micro_trainer(tmp_path, 1).fit(module, datamodule=dm)
