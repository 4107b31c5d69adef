"""``samples.jsonl`` (reclight.trainer.samples): short in-process fits of the micro model with a
CSV logger, and the file's resume and logger paths by hand.

- every ``samples_every`` steps the first ``samples_per_step`` samples, with the documented
  fields; reward, advantage (r - group mean), versions and texts equal the step's batch;
- ``clip_frac`` is the loss's own mask per sample: 0 on-policy in fp32 even in a 1e-6 band, and
  off-policy its token-weighted mean over the whole batch is the logged ``clip/frac``;
- the asynchronous schedule's per-token versions, run-length coded;
- the size cap stops the writing with one printed line; ``samples_every: 0`` writes nothing;
- a resumed run cuts the lines at or past its step (the old file kept aside), never the earlier,
  and then writes the same lines as the straight run;
- TensorBoard gets the samples as text, W&B as a table; a full disk names the file.
"""

import json
import re

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from conftest import ROOT, DigitTask, Recorder, micro_module
from reclight.clock import ClockConfig, ClockCosts
from reclight.engines.base import SamplingConfig
from reclight.engines.config import EngineConfig
from reclight.sync import SyncConfig, behavior_version
from reclight.trainer.config import MonitorConfig
from reclight.trainer.data import RLDataModule
from reclight.trainer.samples import FIELDS, SAMPLES_FILE, SampleLog, markdown_table, to_loggers, version_runs

TIGHT = {"eps_low": 1e-6, "eps_high": 1e-6}  # two-side band [1 - 1e-6, 1 + 1e-6]: any ratio != 1 is clipped


class Steps(Recorder):
    """Every step's batch and its logged ``clip/frac``."""

    def __init__(self) -> None:
        super().__init__()
        self.batches, self.clip = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.batches[trainer.global_step] = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.clip[trainer.global_step - 1] = float(trainer.callback_metrics["clip/frac"])


def _fit(tmp_path, steps, monitor, callbacks=(), ckpt_path=None, **kw):
    """A micro fit (K = 3, 2 prompts per step, fp32) logging to ``tmp_path/run`` with the CSV
    logger; returns (module, recorder, the run folder's samples.jsonl lines)."""
    rec = Steps()
    module = micro_module(tmp_path, monitor=monitor, **kw)
    dm = RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4, eval_batch_size=4, seed=0)
    logger = CSVLogger(tmp_path, name="", version="run")
    trainer = pl.Trainer(max_steps=steps, callbacks=[rec, *callbacks], logger=logger,
                         enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                         accelerator="cpu", devices=1, precision="32-true", log_every_n_steps=1)
    # weights_only=False: the test's own checkpoint, whose hyper-parameters are the config dataclasses
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=False)
    path = tmp_path / "run" / SAMPLES_FILE
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None
    return module, rec, lines


def test_samples_every_n_steps_with_the_steps_own_values(tmp_path):
    """5 steps, every 2, 4 per step: steps 0, 2, 4, each group 0's K = 3 samples then group 1's
    first. rec_twoside_nois's advantage is reinforce's, A = r - mean over the group (no std).
    On-policy with one update in fp32 (HF engine and HF forward: the same code) the ratio is
    exactly 1, so even the band [1 - 1e-6, 1 + 1e-6] clips nothing: clip_frac 0. The version of
    step t's samples is t; no per-token versions outside the asynchronous schedule."""
    monitor = MonitorConfig(log_kl_init=False, samples_every=2, samples_per_step=4)
    module, rec, lines = _fit(tmp_path, 5, monitor, algorithm="rec_twoside_nois", algorithm_overrides=TIGHT)
    assert [(r["step"], r["group"], r["sample"]) for r in lines] == [
        (t, b, k) for t in (0, 2, 4) for b, k in ((0, 0), (0, 1), (0, 2), (1, 0))]
    assert all(list(r) == list(FIELDS) for r in lines)
    tok = module.tokenizer
    for r in lines:
        batch = rec.batches[r["step"]]
        b, k = r["group"], r["sample"]
        n = int(batch.response_mask[b, k].sum())
        group = batch.rewards[b].tolist()
        assert r["reward"] == pytest.approx(group[k], rel=1e-6)  # written to 7 significant digits
        assert r["correct"] == bool(batch.correct[b, k])
        if b == 0:  # the whole group is in the file: the advantage by hand from its lines
            mates = [x["reward"] for x in lines if x["step"] == r["step"] and x["group"] == 0]
            assert r["advantage"] == pytest.approx(r["reward"] - sum(mates) / 3, rel=1e-6, abs=1e-7)
        assert r["advantage"] == pytest.approx(group[k] - sum(group) / 3, rel=1e-6, abs=1e-7)
        assert r["in_loss"] and r["clip_frac"] == 0.0
        assert r["version"] == r["step"] and r["token_versions"] is None
        assert r["example_index"] == int(batch.example_index[b]) and r["response_tokens"] == n
        assert r["response"] == tok.decode(batch.response_ids[b, k, :n].tolist(), skip_special_tokens=True)
        assert r["prompt"] == tok.decode(batch.prompt_ids[b][batch.prompt_mask[b]].tolist(), skip_special_tokens=True)
        question = module.prompts.train[r["example_index"]].prompt
        assert question.strip() in r["prompt"]
    assert len({r["advantage"] for r in lines}) > 1  # the rewards vary: the check above is not 0 == 0


def test_clip_frac_is_the_losss_mask_per_sample_off_policy(tmp_path):
    """One step behind (sync_offset 1) with the 1e-6 band, every sample of every step written:
    with one update, the token-weighted mean of the per-sample clip_frac over the batch,
    sum_i f_i n_i / sum_i n_i, is the step's logged clip/frac, (mask & ~M).sum() / mask.sum();
    the versions follow the schedule, v = 0 for t < 1, else t - 1."""
    monitor = MonitorConfig(log_kl_init=False, samples_every=1, samples_per_step=6)
    _, rec, lines = _fit(tmp_path, 3, monitor, algorithm="rec_twoside_nois", algorithm_overrides=TIGHT,
                         sync=SyncConfig(sync_offset=1))
    assert len(lines) == 3 * 6
    for t in range(3):
        step = [r for r in lines if r["step"] == t]
        weighted = sum(r["clip_frac"] * r["response_tokens"] for r in step) / sum(r["response_tokens"] for r in step)
        assert weighted == pytest.approx(rec.clip[t], rel=1e-6, abs=1e-7)
        assert {r["version"] for r in step} == {behavior_version(t, 1, 1)}
    assert rec.clip[0] == 0.0 and rec.clip[2] > 0  # on-policy at step 0, then one step stale: clipped


def test_per_token_versions_of_the_asynchronous_schedule(tmp_path):
    """Clock on, weights swapped in flight: each line's token_versions, run-length coded, is the
    batch's token_version over the response, its first version is ``version`` and its runs
    cover the response's tokens; some sample spans two versions."""
    clock = ClockConfig(enabled=True, max_inflight=4, weight_update="inflight", staleness="none",
                        costs=ClockCosts(decode_a=1.0, decode_b=0.05, train_c=2.0, train_e=0.01))
    monitor = MonitorConfig(log_kl_init=False, samples_every=1, samples_per_step=6)
    _, rec, lines = _fit(tmp_path, 5, monitor, clock=clock, engine=EngineConfig(name="fast"),
                         sampling=SamplingConfig(num_samples=3, max_new_tokens=6))
    assert len(lines) == 5 * 6
    for r in lines:
        batch = rec.batches[r["step"]]
        b, k, n = r["group"], r["sample"], r["response_tokens"]
        assert r["token_versions"] == version_runs(batch.token_version[b, k, :n].tolist())
        assert r["token_versions"][0][0] == r["version"] == int(batch.version[b, k])
        assert sum(count for _, count in r["token_versions"]) == n
    assert any(len(r["token_versions"]) > 1 for r in lines)
    assert version_runs([3, 3, 4, 4, 4, 5]) == [[3, 2], [4, 3], [5, 1]]


def test_the_size_cap_stops_writing_with_one_line(tmp_path, caplog):
    """samples_max_mb 0.002 (2000 bytes): the lines that fit are written, the first that would
    pass the cap is not, one line says so, and no later step writes."""
    monitor = MonitorConfig(log_kl_init=False, samples_every=1, samples_per_step=6, samples_max_mb=0.002)
    with caplog.at_level("INFO"):
        _, _, lines = _fit(tmp_path, 4, monitor)
    size = (tmp_path / "run" / SAMPLES_FILE).stat().st_size
    one = len((json.dumps(lines[0], ensure_ascii=False) + "\n").encode())
    assert 2000 - 2 * one < size <= 2000 and 0 < len(lines) < 4 * 6
    said = [m for m in caplog.messages if "samples_max_mb" in m]
    assert len(said) == 1
    assert re.search(r"model.monitor.samples_max_mb=0.002 reached \([\d,]+ bytes\); no more samples", said[0])


def test_samples_every_zero_writes_nothing(tmp_path):
    monitor = MonitorConfig(log_kl_init=False, samples_every=0)
    module, _, lines = _fit(tmp_path, 2, monitor)
    assert lines is None and module.sample_log.path is None
    assert not list(tmp_path.rglob("samples*.jsonl"))


@pytest.mark.parametrize("field, value, accepted", [
    ("samples_every", -1, "an integer >= 0 (0: no samples are written)"),
    ("samples_per_step", 0, "an integer >= 1"),
    ("samples_max_mb", 0.0, "samples_max_mb > 0"),
])
def test_bad_settings_name_the_field(field, value, accepted, tmp_path):
    """In Python and through ``reclight fit`` (before any model is built)."""
    from reclight.trainer.cli import main

    expected = re.escape(f"model.monitor.{field}={value!r} is not valid; accepted: {accepted}")
    with pytest.raises(ValueError, match=expected):
        MonitorConfig(**{field: value})
    with pytest.raises(ValueError, match=expected):
        main(["--config", str(ROOT / "configs" / "smoke_test.yaml"), "--model.policy.tiny_dir", str(tmp_path / "tiny"),
              "--trainer.logger", "false", f"--model.monitor.{field}", str(value)], run=False)
    assert not (tmp_path / "tiny").exists()


def test_a_resumed_run_cuts_the_lines_past_its_step_and_keeps_the_earlier(tmp_path):
    """A stopped run wrote steps 0, 50 and 100 and half of a line; resumed at step 60, the
    file keeps the lines of 0 and 50 byte for byte and the rest is kept aside as
    samples.before-resume-at-step=60.jsonl; a resume at the end of the file cuts nothing."""
    path = tmp_path / SAMPLES_FILE
    lines = [(json.dumps({"step": s, "prompt": "1+1="}) + "\n").encode() for s in (0, 0, 50, 100)]
    old = b"".join(lines) + b'{"step": 150, "pro'
    path.write_bytes(old)
    log = SampleLog(MonitorConfig())
    log._start(path, 60)
    assert path.read_bytes() == b"".join(lines[:3]) and log.size == len(b"".join(lines[:3]))
    assert (tmp_path / "samples.before-resume-at-step=60.jsonl").read_bytes() == old
    again = SampleLog(MonitorConfig())
    again._start(path, 60)  # a second resume at the same step: nothing more to cut
    assert path.read_bytes() == b"".join(lines[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.before-resume-at-step=60.jsonl", SAMPLES_FILE]


def test_a_run_resumed_from_a_checkpoint_rewrites_only_the_steps_after_it(tmp_path):
    """4 steps, samples every step, checkpoints after steps 2 and 4; resumed from the first into
    the same run folder up to step 4: the lines of steps 0 and 1 are untouched, those of steps 2
    and 3 are written again, and (the resume being exact) the file equals the straight run's;
    the straight run's file is kept as samples.before-resume-at-step=2.jsonl."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    monitor = MonitorConfig(log_kl_init=False, samples_every=1, samples_per_step=2)
    ckpt = lambda: ModelCheckpoint(tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)  # noqa: E731
    _fit(tmp_path, 4, monitor, callbacks=[ckpt()])
    path = tmp_path / "run" / SAMPLES_FILE
    straight = path.read_bytes()
    assert [json.loads(x)["step"] for x in straight.splitlines()] == [0, 0, 1, 1, 2, 2, 3, 3]
    _fit(tmp_path, 4, monitor, callbacks=[ckpt()], ckpt_path=str(tmp_path / "ck" / "epoch=0-step=2.ckpt"))
    assert path.read_bytes() == straight
    assert (tmp_path / "run" / "samples.before-resume-at-step=2.jsonl").read_bytes() == straight


def _record(step):
    return {"step": step, "group": 0, "sample": 1, "example_index": 7, "prompt": "2+2=", "response": "4 | x\nend",
            "response_tokens": 3, "truncated": False, "reward": 1.0, "correct": True, "advantage": 0.5,
            "in_loss": True, "clip_frac": 0.0, "version": step, "token_versions": [[2, 1], [3, 2]]}


def test_tensorboard_gets_a_text_table_and_wandb_a_table(tmp_path):
    """TensorBoard: the samples under the text tag ``samples`` at the step, as a markdown table
    (a '|' in a text escaped, a newline shown as \\n); W&B: ``log_table`` with FIELDS as columns."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    to_loggers([tb, CSVLogger(tmp_path)], [_record(4)], 4)
    tb.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb" / "version_0")).Reload()
    (event,) = events.Tensors("samples/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 4 and text == markdown_table([_record(4)])
    assert "| 0 | 1 | 7 | 2+2= | 4 \\| x\\nend | 3 |" in text

    from lightning.pytorch.loggers import WandbLogger

    class FakeWandb(WandbLogger):
        def __init__(self):  # no wandb run: only log_table is called
            self.tables = []

        def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
            self.tables.append((key, columns, data, step))

    wb = FakeWandb()
    to_loggers([wb], [_record(2)], 2)
    ((key, columns, data, step),) = wb.tables
    assert (key, columns, step) == ("samples", list(FIELDS), 2)
    assert data == [[2, 0, 1, 7, "2+2=", "4 | x\nend", 3, False, 1.0, True, 0.5, True, 0.0, 2, "[[2, 1], [3, 2]]"]]


def test_a_full_disk_while_writing_the_samples_names_the_file(tmp_path, monkeypatch):
    """The write fails with ENOSPC: a DiskWriteError naming samples.jsonl and the free space."""
    import errno
    import os

    import reclight.trainer.samples as samples
    from reclight.trainer.checkpoint import DiskWriteError

    class Full:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log = SampleLog(MonitorConfig())
    log._start(tmp_path / SAMPLES_FILE, 0)
    monkeypatch.setattr(samples, "open", lambda *a, **k: Full(), raising=False)
    with pytest.raises(DiskWriteError) as e:
        log._append([_record(0)])
    assert str(e.value).startswith(f"cannot write the samples {str(tmp_path / SAMPLES_FILE)!r}: no space left on the "
                                   "device (")
    assert "samples.jsonl may lack its last lines" in str(e.value)
