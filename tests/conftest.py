"""Shared helpers of the test suite (no tests here); test files import them from ``conftest``.

- ``DigitTask`` gives a dense reward (fraction of response characters that are digits), so even
  a randomly initialised tiny model gets reward variance within a group and every step has a
  non-zero policy gradient: the smoke and schedule tests then see weights actually move. The
  ``reclight fit`` subprocesses of the tests name it ``conftest.DigitTask`` (with ``tests/`` on
  ``PYTHONPATH``).
- ``fit_micro``: a few-second in-process fit of the micro model, with a ``Recorder`` of the
  versions and ratios each step trained on.
- ``PauseAtStep``: parks a ``reclight fit`` subprocess at a known point so a test can SIGKILL it
  there (``--trainer.callbacks+=conftest.PauseAtStep``).
- ``SigtermAt``: the process sends itself SIGTERM at a known point (during a step's update, or
  when the next rollout starts), for the exact-resume-after-SIGTERM tests.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest

from reclight.engines.base import SamplingConfig
from reclight.engines.config import EngineConfig
from reclight.models.tiny import TinyModelConfig
from reclight.tasks.arithmetic import Arithmetic
from reclight.trainer.config import AlgorithmGroup, MonitorConfig, OptimConfig, PolicyConfig, TrainForwardConfig
from reclight.trainer.data import RLDataModule
from reclight.trainer.module import RLModule

ROOT = Path(__file__).resolve().parents[1]


# -- the suite leaves the working tree as it found it --------------------------------------------
def _tree_status() -> set[str] | None:
    """``git status --porcelain`` lines of the checkout (None where git or the repo is absent)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


def pytest_sessionstart(session) -> None:
    session.config._tree_before = _tree_status()


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run if the suite wrote into the checkout (a CLI run without a logger saves
    ``config.yaml`` into the working folder, a study its warm-ups under ``outputs/``): every test
    must write under its ``tmp_path``."""
    before = getattr(session.config, "_tree_before", None)
    after = _tree_status()
    if before is None or after is None or getattr(session.config.option, "collectonly", False):
        return
    if new := sorted(after - before):
        print("\nthe test suite changed the working tree (every test must write under tmp_path):\n  "
              + "\n  ".join(new))
        session.exitstatus = 1


@pytest.fixture(autouse=True, scope="session")
def _run_from_a_scratch_folder(tmp_path_factory):
    """The whole session runs from a scratch folder, so a relative path a run writes by default
    (Lightning's ``config.yaml`` without a logger, ``outputs/``) never lands in the checkout."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)
MICRO = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=32)


class DigitTask(Arithmetic):
    name = "digits"

    def __init__(self) -> None:
        super().__init__(digits=1, val_size=10, test_size=10)

    def reward(self, response: str, example) -> float:
        return sum(c.isdigit() for c in response) / max(len(response), 1)


class Capture(pl.Callback):
    """Records every step's batch and the metrics logged at its end (``metrics[step]``)."""

    def __init__(self):
        self.batches, self.metrics = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.global_step] = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics[trainer.global_step - 1] = {k: float(v) for k, v in trainer.callback_metrics.items()}


class Recorder(pl.Callback):
    """Records, per step, the rollout versions trained on and the logged ratio stats."""

    def __init__(self) -> None:
        self.versions: dict[int, list[int]] = {}
        self.ratio: dict[int, tuple[float, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.versions[trainer.global_step] = batch.version.flatten().tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.ratio[trainer.global_step - 1] = (float(m["ratio/min"]), float(m["ratio/max"]))


def micro_module(tmp_path, **kwargs) -> RLModule:
    """The micro model's module (lr 3e-2, K=3, 3 new tokens, no warm-up, the HF engine and the
    HF training forward: the same code on both sides, so on-policy ratios are exactly 1 in fp32);
    ``kwargs`` override RLModule arguments, ``lr=...`` / ``log_kl_init=...`` the fields of their
    groups, and ``algorithm=<preset>`` with ``algorithm_overrides={...}`` make the algorithm group."""
    optim = OptimConfig(lr=kwargs.pop("lr", 3e-2), **kwargs.pop("optim_kwargs", {}))
    if "algorithm" in kwargs or "algorithm_overrides" in kwargs:  # a preset name and fields to change
        kwargs["algorithm"] = AlgorithmGroup(preset=kwargs.pop("algorithm", "rec_oneside_nois"),
                                             **kwargs.pop("algorithm_overrides", {}))
    monitor = MonitorConfig(log_kl_init=kwargs.pop("log_kl_init", True), kl_init_every=1)  # kl/init every step
    args = dict(policy=PolicyConfig(tiny=MICRO, tiny_dir=str(tmp_path / "tiny")), optim=optim, monitor=monitor,
                seed=0, warmup=None, sampling=SamplingConfig(num_samples=3, max_new_tokens=3),
                engine=EngineConfig(name="hf"), train_forward=TrainForwardConfig(impl="hf"))
    args.update(kwargs)
    return RLModule(**args)


def micro_trainer(tmp_path, max_steps: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=str(tmp_path), accelerator="cpu", devices=1,
    )


def fit_micro(tmp_path, max_steps: int, task=None, callbacks=(), **module_kwargs):
    """A few-second fit of the micro model on ``task`` (DigitTask); returns (module, recorder)."""
    rec = Recorder()
    module = micro_module(tmp_path, **module_kwargs)
    dm = RLDataModule(task=task or DigitTask(), prompts_per_step=2, eval_size=4, eval_batch_size=4, seed=0)
    micro_trainer(tmp_path, max_steps, [rec, *callbacks]).fit(module, datamodule=dm)
    return module, rec


class PauseAtStep(pl.Callback):
    """At the start of step ``step`` (after checkpoint ``step={step}.ckpt`` was written at the end
    of the previous step), write ``marker`` and sleep until killed."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(self.step))
            while True:
                time.sleep(0.05)


class SigtermAt(pl.Callback):
    """SIGTERM to this process at step ``step``: ``where="update"``: at its start (after its
    rollout, before its update); ``where="rollout"``: when the engine starts the first
    generation after step ``step - 1`` (a rollout in progress is then abandoned)."""

    def __init__(self, step: int, where: str) -> None:
        self.step = step
        self.where = where

    def _kill(self) -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.where == "update" and trainer.global_step == self.step:
            self._kill()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "rollout" and trainer.global_step == self.step:
            engine = pl_module.rollouts.engine
            real = engine.generate

            def generate(*args, **kwargs):
                engine.generate = real
                self._kill()
                return real(*args, **kwargs)

            engine.generate = generate


class SignalWorkerAt(pl.Callback):
    """Signal ``sig`` (a name: SIGTERM, SIGSTOP, ...) to the run's rollout worker at the start of
    step ``step`` (after its batch arrived, while the worker runs the step's training window)."""

    def __init__(self, step: int, sig: str) -> None:
        self.step = step
        self.sig = sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.global_step == self.step:
            os.kill(pl_module.rollouts.process.pid, getattr(signal, self.sig))


class BatchLog(pl.Callback):
    """Writes, per rank, every step's example indices and token versions and, at the end, a
    checksum of the weights to ``<folder>/rank<r>.json`` (for multi-process tests)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.steps: dict[int, dict] = {}

    @staticmethod
    def _digest(tensors) -> str:
        import hashlib

        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps[trainer.global_step] = {
            "example_index": batch.example_index.tolist(),
            "versions": sorted(set(batch.token_version[batch.response_mask].tolist()))
            if batch.token_version is not None else None,
            "digest": self._digest([batch.response_ids, batch.logp_behav, batch.rewards])}  # bitwise comparisons

    def on_train_end(self, trainer, pl_module):
        import json

        state = pl_module.policy.state_dict()
        weights = {k: float(v.double().sum()) for k, v in state.items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"steps": self.steps, "weights": weights, "world": trainer.world_size,
             "weights_digest": self._digest([state[k] for k in sorted(state)])}))
