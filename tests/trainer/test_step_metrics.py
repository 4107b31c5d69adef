"""How a training step's metrics reach the loggers and callbacks, and the ``kl/init`` cadence.

- ``publish_step_metrics`` replaces one ``self.log`` call per key (reclight/trainer/metrics.py
  says why): the CSV a run writes and the ``callback_metrics`` callbacks see are checked equal,
  row for row and bit for bit, to what Lightning's own ``self.log`` path writes for the same run,
  at a cadence (``log_every_n_steps=2``) that makes Lightning skip steps.
- ``monitor.kl_init_every``: the reference forward and ``kl/init`` every k steps, at logged steps
  (steps 0, k, 2k, ... without a logger); the trained weights are bitwise those of a run that measures it every step (the
  reference forward draws nothing and writes nothing).
"""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import reclight.trainer.module as module_mod
from conftest import DigitTask, fit_micro, micro_module
from reclight.trainer.config import MonitorConfig
from reclight.trainer.data import RLDataModule


def _lightning_log(module, metrics, step, bar=()):
    """The per-key ``self.log`` path that ``publish_step_metrics`` replaced (the reference)."""
    for k, v in metrics.items():
        module.log(k, v.float(), on_step=True, on_epoch=False, prog_bar=k in bar, batch_size=1)


class Seen(pl.Callback):
    def __init__(self):
        self.metrics = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics[trainer.global_step - 1] = {k: v.clone() for k, v in trainer.callback_metrics.items()}


def _fit_with_csv(tmp_path, steps: int, every: int, kl_every: int = 1):
    seen = Seen()
    module = micro_module(tmp_path, monitor=MonitorConfig(kl_init_every=kl_every))
    logger = CSVLogger(str(tmp_path), name="run", version=0)
    trainer = pl.Trainer(max_steps=steps, callbacks=[seen], logger=logger, log_every_n_steps=every,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                         accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4,
                                                eval_batch_size=4, seed=0))
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, seen.metrics


def test_step_metrics_reach_the_csv_and_callbacks_as_self_log_would(tmp_path, monkeypatch):
    ours, ours_cb = _fit_with_csv(tmp_path / "ours", 5, every=2)
    monkeypatch.setattr(module_mod, "publish_step_metrics", _lightning_log)
    ref, ref_cb = _fit_with_csv(tmp_path / "lightning", 5, every=2)
    train_rows = [r for r in ref if r.get("reward/mean")]
    assert [int(r["step"]) for r in train_rows] == [1, 3]  # (step + 1) % 2 == 0: Lightning's cadence
    # same columns, rows, steps, epoch column and values (as written text), but for the wall-clock
    # figures, which differ between any two runs
    timed = ("throughput/", "rollout/wait_s")  # with kl_init_every=1 both paths log kl/init at rows 1, 3
    assert len(ours) == len(ref) and [r.keys() for r in ours] == [r.keys() for r in ref]
    for a, b in zip(ours, ref):
        assert {k: v for k, v in a.items() if not k.startswith(timed)} == {
            k: v for k, v in b.items() if not k.startswith(timed)}
        assert all((a[k] == "") == (b[k] == "") for k in a if k.startswith(timed))
    assert ours_cb.keys() == ref_cb.keys() == set(range(5))
    for step in range(5):
        assert ours_cb[step].keys() == ref_cb[step].keys(), step
        for k, v in ref_cb[step].items():
            assert k.startswith(timed) or torch.equal(ours_cb[step][k], v), (step, k)


def test_with_a_logger_kl_init_is_measured_at_logged_steps(tmp_path):
    """log_every_n_steps=2 (rows at steps 1, 3, 5, 7, 9) and kl_init_every=3: every
    ceil(3 / 2) = 2nd logged row, from the first: steps 1, 5, 9. Lightning would repeat a key's
    last value in later rows; here a row holds what its step measured."""
    rows, _ = _fit_with_csv(tmp_path, 10, every=2, kl_every=3)
    train = [r for r in rows if r.get("reward/mean")]
    assert [int(r["step"]) for r in train] == [1, 3, 5, 7, 9]
    assert [int(r["step"]) for r in train if r["kl/init"] != ""] == [1, 5, 9]


def test_kl_init_every_k_steps_and_weights_unchanged(tmp_path):
    runs = {}
    for every in (1, 3):
        module, _ = fit_micro(tmp_path / str(every), 5, callbacks=[cap := Seen()],
                              monitor=MonitorConfig(kl_init_every=every))
        runs[every] = (module, cap.metrics)
    (m1, every1), (m3, every3) = runs[1], runs[3]
    for a, b in zip(m1.policy.parameters(), m3.policy.parameters()):
        assert torch.equal(a, b)
    # No logger (callbacks only): measured at steps 0 and 3. kl/init stays in callback_metrics
    # between measurements (as Lightning keeps a key not logged in a step); at the measured steps it
    # equals the every-step run's value.
    for step in (0, 3):
        assert torch.equal(every3[step]["kl/init"], every1[step]["kl/init"]), step
    for step in (1, 2):
        assert torch.equal(every3[step]["kl/init"], every3[0]["kl/init"]), step
    assert torch.equal(every3[4]["kl/init"], every3[3]["kl/init"])
    assert every1[2]["kl/init"] > 0 and not torch.equal(every1[2]["kl/init"], every3[2]["kl/init"])


def test_a_preset_that_uses_the_reference_runs_it_every_step(tmp_path):
    module = micro_module(tmp_path, algorithm="grpo_kl", monitor=MonitorConfig(kl_init_every=1000))
    module._init_policy = object()  # only its presence is read by _reference_due
    assert module.algo.needs_reference
    assert all(module._reference_due(s) for s in range(5))


@pytest.mark.parametrize("value", [0, -1, 1.5, "10"])
def test_kl_init_every_bad_values_name_the_field(value):
    with pytest.raises(ValueError, match="model.monitor.kl_init_every"):
        MonitorConfig(kl_init_every=value)
