"""Shared helpers for the trainer tests (no tests here).

``DigitTask`` gives a dense reward (fraction of response characters that are digits), so even
a randomly initialised tiny model gets reward variance within a group and every step has a
non-zero policy gradient: the smoke and schedule tests then see weights actually move.
"""

from __future__ import annotations

import lightning.pytorch as pl

from reclight.callbacks import WeightSync
from reclight.data import RLDataModule
from reclight.module import RLModule
from reclight.rollout import SamplingConfig
from reclight.tasks.arithmetic import Arithmetic
from reclight.tiny import TinyModelConfig

MICRO = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=32)


class DigitTask(Arithmetic):
    name = "digits"

    def __init__(self) -> None:
        super().__init__(digits=1, val_size=10, test_size=10)

    def reward(self, response: str, example) -> float:
        return sum(c.isdigit() for c in response) / max(len(response), 1)


class Recorder(pl.Callback):
    """Records, per step, the rollout versions trained on and the logged ratio stats."""

    def __init__(self) -> None:
        self.versions: dict[int, list[int]] = {}
        self.ratio: dict[int, tuple[float, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.versions[trainer.global_step] = pl_module._rollout.version.flatten().tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.ratio[trainer.global_step - 1] = (float(m["ratio/min"]), float(m["ratio/max"]))


def fit_micro(tmp_path, max_steps: int, sync: WeightSync | None = None, **module_kwargs):
    """A few-second fit of the micro model on DigitTask; returns (module, recorder, sync)."""
    sync = sync or WeightSync()
    rec = Recorder()
    kwargs = dict(tiny=MICRO, tiny_dir=str(tmp_path / "tiny"), lr=3e-2, seed=0, log_kl_init=True, warmup=None,
                  sampling=SamplingConfig(num_samples=3, max_new_tokens=3))
    kwargs.update(module_kwargs)
    module = RLModule(**kwargs)
    dm = RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4, eval_batch_size=4, seed=0)
    trainer = pl.Trainer(
        max_steps=max_steps, callbacks=[sync, rec], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=str(tmp_path), accelerator="cpu", devices=1,
    )
    trainer.fit(module, datamodule=dm)
    return module, rec, sync
