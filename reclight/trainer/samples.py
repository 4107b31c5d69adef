"""``samples.jsonl``: what the policy generated, in a form a researcher can read.

Every ``model.monitor.samples_every`` steps (from step 0), the first ``samples_per_step`` samples
of the step's rollout batch (group 0's K samples, then group 1's, ...) go to ``samples.jsonl`` in
the run folder, one JSON object per sample (fields: :data:`FIELDS`, documented in docs/llm.md,
"Samples in the logs"), and to the loggers' own text view where they have one (TensorBoard's
text tab, a W&B table; the CSV logger has none, the file is enough).

Everything comes from tensors the step already holds: the batch (prompts, responses, rewards,
versions), the advantages and the loss mask of ``training_step``, and the log-probs of its last
update. No generation and no forward is added. The fraction of a sample's tokens whose gradient
the loss's keep mask M zeroes (``clip_frac``) is the core's own code:
:func:`reclight.losses.policy_loss` on that one sample, whose ``clip/frac`` is then the sample's
(every rule of M is per token or per sequence, so one sample alone gives its own M).

One owner, :class:`SampleLog`, holds the file's state; the module calls :meth:`SampleLog.write`
once per step. Only rank 0 writes (the samples of its share of the batch under data parallel).

The file's size is capped (``samples_max_mb``): a line that would pass the cap is not written,
and one printed line says so. A resumed run appends to the file of the run folder it continues;
lines a stopped run wrote for steps at or past the resumed step are dropped first (the resumed
run writes those steps again), with the old file kept as ``samples.before-resume-at-step=N.jsonl``,
as :func:`reclight.trainer.resume.start_loggers` does for ``metrics.csv``; earlier lines are never
rewritten (the file is cut after them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from reclight.advantages import truncated_responses
from reclight.losses import policy_loss
from reclight.models.tokens import eos_ids
from reclight.rollout.batch import RolloutBatch
from reclight.trainer.checkpoint import writing
from reclight.trainer.config import MonitorConfig
from reclight.trainer.resume import LOG_FOLDER_SETTING

SAMPLES_FILE = "samples.jsonl"
MB = 1_000_000
"""``samples_max_mb`` counts megabytes of 10^6 bytes."""
FIELDS = ("step", "group", "sample", "example_index", "prompt", "response", "response_tokens", "truncated",
          "reward", "correct", "advantage", "in_loss", "clip_frac", "version", "token_versions")
"""The keys of each line, in order (docs/llm.md documents each). Later fields are added after
these, never renamed: a reader should ignore keys it does not know."""
NOTE = ("the checkpoints already written are intact; samples.jsonl may lack its last lines (a resume cuts a "
        "partial one)")
"""What a disk error while writing the samples leaves (:func:`reclight.trainer.checkpoint.writing`)."""


def run_folder(trainer: Any) -> Path:
    """The run folder, as Lightning's ``trainer.log_dir`` chooses it (the CSV or TensorBoard
    logger's version folder, another logger's ``save_dir``, else ``default_root_dir``) but
    without its broadcast, so that rank 0 alone may ask."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return Path(logger.log_dir)
    folder = getattr(logger, "save_dir", None) if logger is not None else None
    return Path(folder or trainer.default_root_dir)


def _number(x: float) -> float | None:
    """7 significant digits (float32's precision: ``-0.1666667``, not ``-0.1666666716337204``);
    JSON has no NaN or inf: they are written as null."""
    return float(f"{x:.7g}") if math.isfinite(x) else None


def version_runs(versions: list[int]) -> list[list[int]]:
    """``[[version, n_tokens], ...]``: the per-token versions of one response, run-length coded
    in response order (``[3, 3, 4] -> [[3, 2], [4, 1]]``)."""
    runs: list[list[int]] = []
    for v in versions:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return runs


@torch.no_grad()
def sample_records(
    batch: RolloutBatch,
    adv: Tensor,  # [B, K], the advantages the loss used
    mask: Tensor,  # [B, K, T] bool, the tokens the loss trains on (response mask & kept samples)
    logp: Tensor,  # [B, K, T], the policy's log-probs from the last update that trained on each row
    entropy: Tensor,  # [B, K, T]
    logp_prox: Tensor | None,  # [B, K, T]
    logp_ref: Tensor | None,  # [B, K, T]
    tokenizer: Any,
    algo: Any,
    max_new_tokens: int,
    count: int,
) -> list[dict[str, Any]]:
    """The first ``count`` samples of ``batch`` in (group, sample) order, one dict per sample
    with the keys of :data:`FIELDS`. ``clip_frac`` is the ``clip/frac`` of
    :func:`reclight.losses.policy_loss` on that sample alone (null when it is not in the loss)."""
    B, K, _ = batch.response_mask.shape
    picks = [divmod(i, K) for i in range(min(count, B * K))]
    lengths = batch.response_mask.sum(-1)  # [B, K]
    truncated = truncated_responses(batch.response_ids, batch.response_mask, eos_ids(tokenizer), max_new_tokens)
    groups = sorted({b for b, _ in picks})
    texts = tokenizer.batch_decode([batch.prompt_ids[b][batch.prompt_mask[b]].tolist() for b in groups],
                                   skip_special_tokens=True)
    prompts = dict(zip(groups, texts))
    responses = tokenizer.batch_decode([batch.response_ids[b, k, :lengths[b, k]].tolist() for b, k in picks],
                                       skip_special_tokens=True)
    kept_mass = batch.logp_kept_mass if algo.truncation_correction else None
    out = []
    for (b, k), response in zip(picks, responses):
        one = (slice(b, b + 1), slice(k, k + 1))  # the sample as a [1, 1, T] batch
        part = lambda t: None if t is None else t[one]  # noqa: E731
        in_loss = bool(mask[b, k].any())
        clip_frac = None
        if in_loss:
            _, metrics = policy_loss(logp[one], batch.logp_behav[one], adv[one], mask[one], algo,
                                     logp_prox=part(logp_prox), logp_ref=part(logp_ref), entropy=part(entropy),
                                     logp_kept_mass=part(kept_mass), norm_length=max_new_tokens)
            clip_frac = _number(float(metrics["clip/frac"]))
        token_versions = None
        if batch.token_version is not None:
            token_versions = version_runs(batch.token_version[b, k, :lengths[b, k]].tolist())
        out.append({
            "step": int(batch.step), "group": b, "sample": k, "example_index": int(batch.example_index[b]),
            "prompt": prompts[b], "response": response, "response_tokens": int(lengths[b, k]),
            "truncated": bool(truncated[b, k]),
            "reward": _number(float(batch.rewards[b, k])) if bool(batch.reward_valid[b, k]) else None,
            "correct": bool(batch.correct[b, k]), "advantage": _number(float(adv[b, k])), "in_loss": in_loss,
            "clip_frac": clip_frac, "version": int(batch.version[b, k]), "token_versions": token_versions,
        })
    return out


def _cell(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("\n", "\\n")


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The records as a markdown table (TensorBoard's text tab renders it)."""
    lines = ["| " + " | ".join(FIELDS[1:]) + " |", "|---" * (len(FIELDS) - 1) + "|"]
    lines += ["| " + " | ".join(_cell(r[f]) for f in FIELDS[1:]) + " |" for r in records]
    return "\n".join(lines)


def to_loggers(loggers: list[Any], records: list[dict[str, Any]], step: int) -> None:
    """The records in each logger's own text view: TensorBoard ``add_text`` (a markdown table
    under ``samples``), W&B ``log_table`` (key ``samples``); other loggers have none."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("samples", markdown_table(records), global_step=step)
        elif isinstance(logger, WandbLogger):
            rows = [[r[f] if not isinstance(r[f], list) else json.dumps(r[f]) for f in FIELDS] for r in records]
            logger.log_table(key="samples", columns=list(FIELDS), data=rows, step=step)


class SampleLog:
    """The run's ``samples.jsonl`` (module doc): settings from ``model.monitor``, the file's path
    (known at the first step this process trains) and size, and whether the cap stopped it."""

    def __init__(self, cfg: MonitorConfig) -> None:
        self.every = cfg.samples_every
        self.per_step = cfg.samples_per_step
        self.max_bytes = int(cfg.samples_max_mb * MB)
        self.max_mb = cfg.samples_max_mb
        self.path: Path | None = None
        self.size = 0
        self.stopped = False

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and not self.stopped

    def write(self, module: Any, batch: RolloutBatch, adv: Tensor, mask: Tensor, logp: Tensor, entropy: Tensor,
              logp_prox: Tensor | None, logp_ref: Tensor | None) -> list[dict[str, Any]]:
        """Called by the module once per training step with the step's tensors (shapes:
        :func:`sample_records`); on rank 0, at a due step, appends the samples to the file and
        the loggers. Reads the module's trainer, tokenizer, algorithm and ``max_new_tokens``.
        Returns the records written."""
        trainer = module.trainer
        if self.every == 0 or not trainer.is_global_zero:
            return []
        if self.path is None:
            self._start(run_folder(trainer) / SAMPLES_FILE, batch.step)
        if not self.due(batch.step):
            return []
        records = sample_records(batch, adv, mask, logp, entropy, logp_prox, logp_ref, module.tokenizer, module.algo,
                                 module.sampling.max_new_tokens, self.per_step)
        written = self._append(records)
        if written:
            to_loggers(trainer.loggers, written, batch.step)
        return written

    def _start(self, path: Path, first_step: int) -> None:
        """Take over ``path`` for a run whose first step here is ``first_step``: lines of steps
        at or past it (a stopped run's, or a partial last line) are cut off, the old file kept
        aside; earlier lines stay byte for byte."""
        self.path = path
        if not path.is_file():
            return
        keep = 0
        with open(path, "rb") as f:
            for line in f:
                try:
                    step = json.loads(line)["step"] if line.endswith(b"\n") else None
                except (ValueError, KeyError, TypeError):
                    step = None
                if not isinstance(step, int) or step >= first_step:
                    break
                keep += len(line)
        size = path.stat().st_size
        if keep < size:
            backup = path.with_name(f"samples.before-resume-at-step={first_step}.jsonl")
            with writing(path, "the samples", LOG_FOLDER_SETTING, NOTE):
                if not backup.exists():
                    shutil.copyfile(path, backup)
                os.truncate(path, keep)
        self.size = keep

    def _append(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        lines = []
        for r in records:
            line = (json.dumps(r, ensure_ascii=False) + "\n").encode()
            if self.size + len(line) > self.max_bytes:
                self.stopped = True
                rank_zero_info(f"{self.path}: model.monitor.samples_max_mb={self.max_mb:g} reached "
                               f"({self.size:,} bytes); no more samples are written in this run")
                break
            lines.append(line)
            self.size += len(line)
        if lines:
            with writing(self.path, "the samples", LOG_FOLDER_SETTING, NOTE):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "ab") as f:
                    f.write(b"".join(lines))
        return records[:len(lines)]
