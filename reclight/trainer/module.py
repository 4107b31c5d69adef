"""The LightningModule: off-policy RL fine-tuning of a causal LM with the library's losses.

One training step, as ``training_step`` reads: take the step's rollout batch, compute the group
advantages, the response log-probs under the policy (same temperature as sampling), the loss
(:func:`reclight.losses.policy_loss`), backpropagate, clip the gradient by hand, step AdamW
(manual optimization), log. Lightning orchestrates; the maths is in the library.

Where the batch comes from: the train loader yields only step indices (Lightning prefetches one
batch ahead, so a loader that generated rollouts would sample step t + 1 with the weights of
step t). :meth:`RLModule.on_before_batch_transfer` turns the index into the step's
:class:`~reclight.rollout.batch.RolloutBatch` by asking the :class:`~reclight.rollout.queue.RolloutQueue`,
handing it the current weights; that runs before ``training_step``, so outside the training
precision's autocast (the queue's docstring says why that matters).

Departures from a textbook trainer, listed up front:

- Micro-batching (``train_forward.micro_batch_size`` prompts, whole groups) passes the FULL
  batch's token and sequence counts to every ``policy_loss`` call, so the summed gradient equals
  the full-batch gradient exactly (no 1/num_micro_batches approximation); under data parallel
  the counts are all-reduced and the loss scaled by the world size, so the update is the
  single-process update on the union batch.
- ``kl/init`` is :func:`reclight.losses.kl_estimate` on the batch's own samples (drawn from the
  behaviour policy mu): k3, importance-weighted to pi by rho = pi / mu. It needs a frozen copy of
  the policy at the start of RL; ``monitor.log_kl_init: false`` saves that memory. Its no-grad
  forward runs every ``monitor.kl_init_every`` steps (10) at logged steps (every step when the
  loss uses the reference), so ``kl/init`` is a sampled curve.
  With LoRA (``policy.lora``, :mod:`reclight.models.lora`) the reference is the policy with its
  adapter disabled instead (the base is frozen, the adapter starts at B = 0 after a warm-up that
  trains the base), and a checkpoint holds the adapter and the base's hash, not the weights.
- A step's metrics reach the loggers and ``trainer.callback_metrics`` through
  :func:`reclight.trainer.metrics.publish_step_metrics`, not ``self.log`` per key (that module
  says why: Lightning's per-key cost).
- Samples whose reward failed (``reward_valid`` false) and RED-Drop's dropped samples are
  removed from the loss (``mask & keep``), and counted in ``reward/failed``.
- Guards (:mod:`reclight.trainer.guards`, table in ``docs/reliability.md``): a step with more
  than ``guards.max_failed_reward_frac`` failed rewards stops the run; a step whose loss or
  gradient is not finite is skipped (no weight or optimizer-state change,
  ``train/skipped_steps``) and ``guards.max_consecutive_skips`` in a row stop it. The checkpoint
  adds the rollout queue (engine included), the RNG states and these counters, for a
  bitwise-exact resume (``tests/trainer/test_resume.py``).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from reclight.advantages import group_advantages, shape_rewards, truncated_responses
from reclight.checks import check_int, invalid, run_seed
from reclight.engines.base import SamplingConfig
from reclight.engines.config import EngineConfig
from reclight.losses import kl_estimate, policy_loss
from reclight.kernels.compile import check_cpp_compiler
from reclight.models.forward import enable_checkpointing, resolve_forward_impl, response_logprobs
from reclight.models.loading import (
    Frozen,
    check_dtype_for_device,
    frozen_copy,
    load_causal_lm,
    load_model_config,
    load_tokenizer,
)
from reclight.models.fsdp import is_sharded, shard_on_mesh
from reclight.models.lora import adapter_disabled, attach_lora, base_sha256, base_training, is_adapter
from reclight.models.tiny import build_tiny
from reclight.models.tokens import eos_ids
from reclight.rollout.batch import RolloutBatch
from reclight.rollout.build import build_rollouts
from reclight.rollout.queue import RolloutQueue
from reclight.clock import ClockConfig
from reclight.rollout.workers import WorkerRolloutQueue, WorkersConfig, check_workers_settings
from reclight.sync import SyncConfig
from reclight.updates import check_mini_batches, fused_adamw_supported, merge_update_metrics, micro_batches, update_rows
from reclight.trainer.checkpoint import CheckpointError, check_state_dict_matches, rng_state, set_rng_state
from reclight.trainer.config import (
    AlgorithmGroup,
    GuardsConfig,
    MonitorConfig,
    OptimConfig,
    PolicyConfig,
    TrainForwardConfig,
    UpdatesConfig,
    check_async_data,
    check_settings,
)
from reclight.trainer.context import check_response_budget, max_positions
from reclight.trainer.evaluation import greedy_eval
from reclight.trainer.guards import NonFiniteGuard, check_reward_failures, is_finite
from reclight.trainer.metrics import batch_metrics, measured_step, publish_step_metrics
from reclight.kernels.threads import MicroBatchThreads, resolve_threads
from reclight.trainer.prompts import PromptSource
from reclight.trainer.resume import RECORD_KEY, apply_optim_config, check_resume_config, run_record
from reclight.trainer.samples import SampleLog
from reclight.trainer.warmup import WarmupConfig, supervised_warmup

# Lightning warns that the module's on_before_batch_transfer takes precedence over the data
# module's: that is the design (the data module has none; the module turns step indices into
# rollout batches), so the message would only alarm users.
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule`")


class RLModule(LightningModule):
    """Off-policy RL fine-tuning of a causal LM with the REC / REP / RED losses.

    Args:
        policy: the trained model (``model.policy``).
        algorithm: the preset and any of its fields (``model.algorithm``: ``{preset: dapo, eps_high:
            0.3}``; :class:`~reclight.trainer.config.AlgorithmGroup`); a preset name alone also works
            from Python.
        sampling: K, temperature, top_p and max_new_tokens of the behaviour policy.
        sync: the off-policy schedule: weights pushed every ``sync_interval`` steps, the engine
            ``sync_offset`` steps ahead, or ``offline``.
        clock: the asynchronous schedule on a simulated clock instead (``model.clock.enabled``).
        rollout: where that schedule's rollouts run: in-process, or a worker process concurrent
            with training (``model.rollout``, :mod:`reclight.rollout.workers`).
        updates: optimizer updates per rollout batch, ``epochs`` x ``mini_batches`` (``model.updates``).
        engine: the rollout engine and its options (``model.engine``).
        train_forward: how the training forward computes log-probs (``model.train_forward``).
        optim: AdamW, gradient clipping, learning-rate warm-up (``model.optim``).
        warmup: supervised warm-up before RL (skipped when resuming); null disables it.
        guards: when bad rewards or numerics stop the run (``model.guards``).
        monitor: ``kl/init``, the evaluation's response cap, ``samples.jsonl`` (``model.monitor``).
        seed: seeds model init (tiny), warm-up and sampling (null: the run's seed_everything).
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        algorithm: AlgorithmGroup = AlgorithmGroup(),
        sampling: SamplingConfig = SamplingConfig(),
        sync: SyncConfig = SyncConfig(),
        clock: ClockConfig = ClockConfig(),
        rollout: WorkersConfig = WorkersConfig(),
        updates: UpdatesConfig = UpdatesConfig(),
        engine: EngineConfig = EngineConfig(),
        train_forward: TrainForwardConfig = TrainForwardConfig(),
        optim: OptimConfig = OptimConfig(),
        warmup: WarmupConfig | None = WarmupConfig(),
        guards: GuardsConfig = GuardsConfig(),
        monitor: MonitorConfig = MonitorConfig(),
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        # Everything cheap is validated here, before any model is loaded.
        if isinstance(algorithm, str):
            algorithm = AlgorithmGroup(preset=algorithm)
        self.algo = algorithm.resolve()
        check_int("model.seed", seed, minimum=0, allow_none=True)
        check_settings(policy, self.algo, sampling, sync, clock, engine, monitor)
        check_workers_settings(rollout, clock.enabled, policy.lora.enabled)
        self.rollout_cfg = rollout
        self.policy_cfg, self.sampling, self.sync_cfg, self.engine_cfg = policy, sampling, sync, engine
        self.clock_cfg, self.updates_cfg = clock, updates
        self.forward_cfg, self.optim_cfg, self.warmup_cfg = train_forward, optim, warmup
        self.forward_impl = "hf" if train_forward.impl == "auto" else train_forward.impl  # resolved in configure_model
        self.micro_threads = MicroBatchThreads(1)  # model.train_forward.threads, resolved in configure_model
        self.guards_cfg, self.monitor_cfg = guards, monitor
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.rollouts: RolloutQueue | None = None
        self.prompts: PromptSource | None = None  # the data, fitted to the model (configure_model)
        self._init_policy: Frozen | None = None
        self._base_hash: str | None = None  # LoRA: SHA-256 of the frozen base weights (checkpointed)
        self._pending_base_hash: str | None = None  # LoRA: the resumed checkpoint's, checked in on_fit_start
        self._pending_rollouts: dict[str, Any] | None = None  # queue state, restored in on_fit_start
        self._pending_rng: dict[str, Any] | None = None  # restored at the first step after a resume
        self._skip_guard = NonFiniteGuard(guards.max_consecutive_skips)
        self.sample_log = SampleLog(monitor)  # samples.jsonl every monitor.samples_every steps (trainer/samples.py)
        self.allow_changes: list[str] = []  # settings a resume may change (the CLI's --allow_changes)
        self.precision_reason = "set by the caller"  # the CLI says why it chose trainer.precision
        self.engine_resolved: dict[str, Any] = {}  # model.engine name/dtype as resolved for this run
        self.resume_checked = False  # the CLI compared the run record before loading (trainer/resume.py)
        self.resume_changes: list[str] = []  # the allowed settings that differ from the checkpoint's
        self.val_acc, self.val_reward, self.val_len = MeanMetric(), MeanMetric(), MeanMetric()
        self.test_acc = MeanMetric()

    # -- set-up ---------------------------------------------------------------------------------
    @property
    def run_seed(self) -> int:
        return run_seed(self.hparams.seed)

    @property
    def eval_max_new_tokens(self) -> int:
        cap = self.monitor_cfg.eval_max_new_tokens
        return self.sampling.max_new_tokens if cap is None else cap

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        cfg = self.policy_cfg
        check_dtype_for_device(cfg.dtype, self.trainer.strategy.root_device if self._trainer is not None
                               else torch.device("cpu"))
        path = cfg.name_or_path or str(build_tiny(cfg.tiny_dir, cfg.tiny, seed=self.run_seed))
        self._model_path = path
        self.tokenizer = load_tokenizer(path)
        # The data fitted to the model's context, and the checks that relate it to this run's
        # settings: before any weight is loaded.
        if self._trainer is not None and self.trainer.datamodule is not None:  # else a bare module: no data
            self.prompts = self._prompt_source(load_model_config(path))
        self.policy, _ = load_causal_lm(path, cfg.dtype, attn_implementation=self.forward_cfg.attn_implementation,
                                        tokenizer=self.tokenizer)
        self.policy.train()
        mesh = getattr(self, "_device_mesh", None)  # set by Lightning's ModelParallelStrategy
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        sharded = mesh is not None or "FSDP" in strategy
        lora = cfg.lora
        if lora.enabled:
            if sharded or "ModelParallel" in strategy:
                raise invalid("model.policy.lora.enabled", True, f"false under FSDP (this run's strategy is {strategy}): "
                              "the adapter's merged weights and the base hash read full tensors; use the ddp strategy")
            # Seeded from the run seed alone, B = 0: the adapted model starts as the base model.
            attach_lora(self.policy, lora, seed=self.run_seed)
        f = self.forward_cfg
        no_fused = [f"model.policy.lora.dropout={lora.dropout} (the fused forward has no adapter dropout)"] \
            if lora.enabled and lora.dropout > 0 else []
        self.forward_impl, note = resolve_forward_impl(f.impl, f.compile, self.policy.config, sharded, no_fused)
        if note:
            rank_zero_info(note)
        if f.checkpointing and self.forward_impl == "hf":
            enable_checkpointing(self.policy)
        if mesh is not None:
            shard_on_mesh(self.policy, mesh)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        attn_dropout = float(getattr(self.policy.config, "attention_dropout", 0.0) or 0.0)
        dropout = (f"model.policy.lora.dropout={lora.dropout}" if lora.enabled and lora.dropout > 0 else
                   f"the model's attention_dropout={attn_dropout}" if attn_dropout > 0 else None)
        self.micro_threads = MicroBatchThreads(resolve_threads(
            f.threads, device=device, world_size=self.trainer.world_size if self._trainer is not None else 1,
            strategy=strategy, compiled=f.compile, dropout=dropout))
        if self.micro_threads.threads > 1:
            rank_zero_info(f"model.train_forward.threads {f.threads}: {self.micro_threads.threads} "
                           "(micro-batches side by side, each op on one thread)")
        if device.type == "cpu":
            check_cpp_compiler([name for name, on in (("model.train_forward.compile=true", f.compile),
                                                      ("model.engine.fast.compile_decode=true", self.engine_cfg.compiles))
                                if on])

    def _prompt_source(self, config: Any) -> PromptSource:
        """The run's prompts, the one thing the module reads of the data module
        (:meth:`RLDataModule.prompt_source`): every prompt fits the model's positions minus the
        longer response cap (:mod:`reclight.trainer.context`), and a mini-batch holds whole groups."""
        dm = self.trainer.datamodule
        if not hasattr(dm, "prompt_source"):
            raise TypeError(f"RLModule needs a data module with prompt_source() (RLDataModule); got {type(dm).__name__}")
        positions, budget, why = max_positions(config), None, ""
        if positions is not None:
            check_response_budget(positions, self.sampling.max_new_tokens, self.eval_max_new_tokens,
                                  f"the model {self._model_path!r}")
            new = max(self.sampling.max_new_tokens, self.eval_max_new_tokens)
            budget, why = positions - new, f"the model's {positions} positions minus max_new_tokens {new}"
        source = dm.prompt_source(self.tokenizer, budget, self.policy_cfg.use_chat_template, why)
        if self.clock_cfg.enabled:
            check_async_data(self.clock_cfg, source, self.sampling.num_samples)
        check_mini_batches(source.groups_per_rank, self.updates_cfg.mini_batches, "model.updates.mini_batches",
                           f"prompts per rank (data.prompts_per_step={source.groups_per_rank * source.world} over "
                           f"{source.world} rank(s))")
        return source

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        o = self.optim_cfg
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                                fused=fused_adamw_supported(params, sharded=is_sharded(self.policy)))
        if not o.lr_warmup_steps:
            return opt
        # Stepped by hand after each APPLIED update (a skipped non-finite step does not count).
        warm = o.lr_warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: min(1.0, (n + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        p = self.prompts
        lora, resumed = self.policy_cfg.lora.enabled, self.trainer.ckpt_path is not None
        # With LoRA a checkpoint holds no base weights: a resume re-runs the (seeded) warm-up to
        # rebuild them, and the base hash below checks that it came out bitwise the same.
        if self.warmup_cfg is not None and (not resumed or lora):
            with base_training(self.policy) if lora else contextlib.nullcontext():  # the base, adapter off
                stats = supervised_warmup(
                    self.policy, self.tokenizer, p.fitted_task, self.warmup_cfg, seed=self.run_seed,
                    max_new_tokens=self.eval_max_new_tokens, use_chat_template=self.policy_cfg.use_chat_template,
                    log=None if resumed else self._log_warmup, threads=self.micro_threads,
                    eval_pieces=self._eval_pieces(),
                )
            self.print(f"LoRA base rebuilt by the warm-up: {stats}" if resumed else f"warm-up: {stats}")
        if lora:
            self._base_hash = base_sha256(self.policy)
            if self._pending_base_hash is not None and self._pending_base_hash != self._base_hash:
                raise CheckpointError(
                    f"--ckpt_path={str(self.trainer.ckpt_path)!r}: the LoRA adapter was trained on another base model "
                    f"(base weights SHA-256: the checkpoint has {self._pending_base_hash}, this run "
                    f"{self._base_hash}); accepted: the same model.policy (name_or_path, tiny shape, seed) and "
                    "model.warmup as the checkpoint's run")
            self._pending_base_hash = None
        self.rollouts, self.engine_resolved, notes = build_rollouts(
            self.engine_cfg, self.policy, self.tokenizer, self.sampling, p, sync=self.sync_cfg, clock=self.clock_cfg,
            total_steps=int(self.trainer.max_steps), seed=self.run_seed, rank=self.global_rank,
            use_chat_template=self.policy_cfg.use_chat_template, max_abs_reward=self.guards_cfg.max_abs_reward,
            model_path=self._model_path, precision=str(self.trainer.precision))
        if self.rollout_cfg.workers:  # one worker per rank, no process group (docs/async.md "Rollout workers")
            if is_sharded(self.policy):
                raise invalid("model.rollout.workers", self.rollout_cfg.workers, "0 with a sharded policy (FSDP): "
                              "the worker's weights would be gathered every step; not built (docs/async.md)")
            self.rollouts = WorkerRolloutQueue(self.rollouts, self.policy, self.rollout_cfg,
                                               self.trainer.log_dir or self.trainer.default_root_dir,
                                               index=self.global_rank)
        for note in notes:
            rank_zero_info(note)
        if self._pending_rollouts is not None:
            self.rollouts.load_state_dict(self._pending_rollouts)
            self._pending_rollouts = None
        # The RL-start reference: a frozen copy, or with LoRA the base itself (adapter disabled)
        if (self.monitor_cfg.log_kl_init or self.algo.needs_reference) and self._init_policy is None and not lora:
            self._init_policy = frozen_copy(self.policy)

    def _log_warmup(self, metrics: dict[str, float], step: int) -> None:
        # Warm-up runs before the RL steps: log to the loggers directly (self.log is not allowed).
        for lg in self.loggers:
            lg.log_metrics(metrics, step=step)
        self.print(f"warm-up step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))

    def on_train_start(self) -> None:
        # The global RNG is restored here, as late as possible before the first resumed step:
        # after loading, Lightning still sets up the loops (the loaders have their own
        # generators, so that draws nothing from it).
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        if any(k.startswith("model.optim.") for k in self.resume_changes):
            o = self.optim_cfg
            apply_optim_config(self.trainer.optimizers, self.lr_schedulers(), o.lr, o.weight_decay, o.betas)
        if self.global_step == 0:  # the "before" figure: greedy accuracy at the start of RL
            metrics = self._evaluate("val")
            name, count = self.prompts.context_counts()  # prompts too long for the model's positions (train + val)
            metrics[name] = count
            for lg in self.loggers:
                lg.log_metrics(metrics, step=0)
            self.print(f"start of RL: {metrics}")

    # -- training -------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training: the loader's step index becomes that step's rollout batch (module doc).
        The step is the optimizer-step count, never the loader's value: the loader only paces."""
        if not self.trainer.training:
            return batch
        return self.rollouts.batch_for_step(self.global_step, self.policy)

    def training_step(self, batch: RolloutBatch, batch_idx: int) -> Tensor:
        start = time.perf_counter()
        self._check_rewards(batch)
        logp_ref = self._reference_logprobs(batch)  # [B, K, T], or None at a step that needs none
        adv, keep = self._advantages(batch, logp_ref)  # [B, K]
        mask = batch.response_mask & keep[..., None]  # [B, K, T]: the tokens that are trained on
        logp_prox = self._logprobs_no_grad(self.policy, batch) if self._needs_prox else None  # theta_t's
        logp = torch.zeros_like(batch.logp_behav)  # [B, K, T], filled by each update (detached)
        entropy = torch.zeros_like(batch.logp_behav)
        updates = []
        u = self.updates_cfg
        for i, rows in enumerate(update_rows(batch.rewards.shape[0], u.epochs, u.mini_batches, batch.rewards.device)):
            counts = self._global_counts(mask[rows])
            loss, metrics = self._backward(batch, rows, adv, mask, counts, logp, entropy, logp_prox, logp_ref)
            metrics["grad/norm"] = self._clip_and_step(loss, batch.step, last=i == self.updates_cfg.count - 1)
            updates.append(metrics)
        if isinstance(self.rollouts, WorkerRolloutQueue):  # the worker's end-of-step metrics (rollout/workers.py)
            self.rollouts.finish_step(batch)
        self._log_step(batch, merge_update_metrics(updates), logp, entropy, logp_ref, time.perf_counter() - start)
        self.sample_log.write(self, batch, adv, mask, logp, entropy, logp_prox, logp_ref)  # no extra forward
        return sum(updates[-1][k] for k in ("loss/policy", "loss/reg", "loss/kl", "loss/entropy"))

    def _reference_due(self, step: int) -> bool:
        """Whether step ``step`` runs the reference forward: every step when the loss or the
        advantages use it, else where ``kl/init`` is measured (``monitor.kl_init_every``: at
        logged steps only, :func:`reclight.trainer.metrics.measured_step`)."""
        if self._init_policy is None and not self.policy_cfg.lora.enabled:  # no reference kept
            return False
        if self.algo.needs_reference:
            return True
        return self.monitor_cfg.log_kl_init and measured_step(self.trainer, step, self.monitor_cfg.kl_init_every)

    def _advantages(self, batch: RolloutBatch, logp_ref: Tensor | None) -> tuple[Tensor, Tensor]:
        """Group advantages and ``keep`` [B, K] of the batch's rewards after the algorithm's reward
        shaping (:func:`reclight.advantages.shape_rewards`). RED-Drop's random choice is seeded by
        (seed, step, rank)."""
        m = batch.response_mask
        truncated = truncated_responses(batch.response_ids, m, eos_ids(self.tokenizer), self.sampling.max_new_tokens)
        rewards, kept = shape_rewards(batch.rewards, batch.reward_valid, m.sum(-1), truncated, self.algo,
                                      max_new_tokens=self.sampling.max_new_tokens, logp_behav=batch.logp_behav,
                                      logp_ref=logp_ref, mask=m)
        drop_rng = torch.Generator(device=rewards.device).manual_seed(self.rollouts.seed_for(batch.step))
        adv, keep = group_advantages(rewards, self.algo, drop_rng, valid=batch.reward_valid)
        return adv, keep & kept

    def _reference_logprobs(self, batch: RolloutBatch) -> Tensor | None:
        """Log-probs under the RL-start policy, the reference of the KL terms and of ``kl/init``,
        at the steps that use it (:meth:`_reference_due`, else None): the frozen copy, or with
        LoRA the policy with its adapter disabled (its base is frozen and the adapter started at
        B = 0, so that is the RL-start policy exactly)."""
        if not self._reference_due(batch.step):
            return None
        if self.policy_cfg.lora.enabled:
            with adapter_disabled(self.policy):
                return self._logprobs_no_grad(self.policy, batch)
        return self._logprobs_no_grad(self._init_policy.model, batch)

    @property
    def _needs_prox(self) -> bool:
        return self.algo.needs_proximal or self.monitor_cfg.log_mismatch

    def _check_rewards(self, batch: RolloutBatch) -> None:
        """Stop the run past ``guards.max_failed_reward_frac`` (same decision on every rank)."""
        failed = torch.stack([(~batch.reward_valid).sum(), torch.tensor(batch.reward_valid.numel(), device=self.device)])
        failed = self._all_reduce_sum(failed.float())
        check_reward_failures(int(failed[0]), int(failed[1]), batch.step, self.guards_cfg.max_failed_reward_frac)

    def _all_reduce_sum(self, x: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(x, reduce_op="sum") if self.trainer.world_size > 1 else x

    def _global_counts(self, mask: Tensor) -> dict[str, Tensor]:
        """Token, sequence and sample counts of the union batch over data-parallel ranks: every
        rank's loss is then its share of the union batch's loss (and micro-batches shares of the
        batch). ``num_samples`` counts every sequence, dropped or not (Dr. GRPO's N)."""
        samples = torch.tensor(mask.shape[0] * mask.shape[1], device=mask.device)
        n = self._all_reduce_sum(torch.stack([mask.sum(), mask.any(-1).sum(), samples]).float())
        return {"num_tokens": n[0].clamp(min=1), "num_seqs": n[1].clamp(min=1), "num_samples": n[2].clamp(min=1)}

    def _backward(self, batch: RolloutBatch, rows: slice | Tensor, adv: Tensor, mask: Tensor,
                  counts: dict[str, Tensor], logp_out: Tensor, entropy_out: Tensor,
                  logp_prox: Tensor | None, logp_ref: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Gradients of the loss of ``rows``, accumulated over micro-batches of whole groups;
        writes the detached log-probs and entropies into ``logp_out``/``entropy_out``."""
        self.optimizers().zero_grad(set_to_none=True)
        world = self.trainer.world_size
        kept = batch.logp_kept_mass if self.algo.truncation_correction else None  # top-p's kept mass (log S)
        extra = lambda r: dict(logp_prox=None if logp_prox is None else logp_prox[r],  # noqa: E731
                               logp_ref=None if logp_ref is None else logp_ref[r],
                               logp_kept_mass=None if kept is None else kept[r],
                               norm_length=self.sampling.max_new_tokens, **counts)
        micro = micro_batches(rows, self.forward_cfg.micro_batch_size)

        def piece(sl: slice | Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]]:
            logp, ent = self._logprobs(self.policy, batch, sl, return_entropy=True)
            loss, metrics = policy_loss(logp, batch.logp_behav[sl], adv[sl], mask[sl], self.algo,
                                        entropy=ent if self.algo.entropy_coef > 0 else None, **extra(sl))
            return loss, (loss.detach(), logp.detach(), ent.detach(), metrics)

        if self.micro_threads.threads > 1:  # side by side, the gradients added in micro-batch order
            params = [p for p in self.policy.parameters() if p.requires_grad]
            outs = self.micro_threads.backward(piece, micro, params)
        else:
            outs = []
            for sl in micro:
                loss, out = piece(sl)
                # DDP averages gradients over ranks; x world turns that mean into the union's sum.
                self.manual_backward(loss * world if world > 1 else loss)
                outs.append(out)
        loss_sum = torch.zeros((), device=self.device)
        for sl, (loss, logp, ent, metrics) in zip(micro, outs):
            loss_sum = loss_sum + loss
            logp_out[sl], entropy_out[sl] = logp, ent
        if len(micro) > 1:  # metrics of the whole update (the loss value is the same sum)
            _, metrics = policy_loss(logp_out[rows], batch.logp_behav[rows], adv[rows], mask[rows], self.algo,
                                     entropy=entropy_out[rows] if self.algo.entropy_coef > 0 else None, **extra(rows))
        return loss_sum, metrics

    def _logprobs(self, model: torch.nn.Module, batch: RolloutBatch, rows: slice | Tensor,
                  return_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        f = self.forward_cfg
        return response_logprobs(model, batch.prompt_ids[rows], batch.prompt_mask[rows], batch.response_ids[rows],
                                 batch.response_mask[rows], temperature=self.sampling.temperature,
                                 return_entropy=return_entropy, impl=self.forward_impl, compile_pointwise=f.compile,
                                 checkpointing=f.checkpointing and torch.is_grad_enabled())

    @torch.no_grad()
    def _logprobs_no_grad(self, model: torch.nn.Module, batch: RolloutBatch) -> Tensor:  # [B, K, T]
        """``model``'s log-probs of the batch's tokens, in the training forward's micro-batches."""
        out = torch.zeros_like(batch.logp_behav)
        micro = micro_batches(slice(0, batch.rewards.shape[0]), self.forward_cfg.micro_batch_size)
        for sl, logp in zip(micro, self.micro_threads.map(lambda sl: self._logprobs(model, batch, sl)[0], micro)):
            out[sl] = logp
        return out

    def _clip_and_step(self, loss: Tensor, step: int, last: bool = True) -> Tensor:
        """Clip the global gradient norm, skip the update if anything is not finite (guard),
        step AdamW and the LR schedule (both per applied update). Returns the gradient norm
        before clipping. Only the batch's ``last`` update goes through Lightning's optimizer
        wrapper, which counts it: ``global_step`` (and ``trainer.max_steps``) count rollout
        batches, however many updates each one makes."""
        opt = self.optimizers()
        params = [p for p in self.policy.parameters() if p.grad is not None]
        clip = self.optim_cfg.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        bad = not is_finite(loss, grad_norm)
        if self.trainer.world_size > 1:  # grad_norm is already global; the loss is local: skip if any rank saw one
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        skip = self._skip_guard.update(bad, step, loss.item(), grad_norm.item())
        if skip:  # with no gradients AdamW leaves weights and state untouched; the step still counts
            opt.zero_grad(set_to_none=True)
        self._lr_used = float(opt.param_groups[0]["lr"])
        # The raw torch optimizer for the earlier updates: the same step without Lightning's count.
        opt.step() if last else opt.optimizer.step()
        sched = self.lr_schedulers()
        if sched is not None and not skip:
            sched.step()
        return grad_norm

    @torch.no_grad()
    def _log_step(self, batch: RolloutBatch, metrics: dict[str, Tensor], logp: Tensor, entropy: Tensor,
                  logp_ref: Tensor | None, train_seconds: float) -> None:
        """Log the step: its updates' loss metrics, the batch's own (:func:`batch_metrics`), the
        trainer's state and ``kl/init``."""
        m = batch.response_mask
        out = {
            **metrics,
            **batch_metrics(batch, entropy, eos_ids(self.tokenizer), self.sampling.max_new_tokens),
            "rollout/wait_s": torch.tensor(self.rollouts.last_wait_s),
            "train/skipped_steps": torch.tensor(float(self._skip_guard.total)),
            "train/lr": torch.tensor(self._lr_used),  # the LR of this step's update
            "throughput/train_tok_s": m.sum().clamp(min=1) / max(train_seconds, 1e-9),
        }
        if logp_ref is not None and self.monitor_cfg.log_kl_init:
            out["kl/init"] = kl_estimate(logp, logp_ref, m, logp_behav=batch.logp_behav, estimator="k3")
        publish_step_metrics(self, out, batch.step, bar=("reward/mean", "reward/acc"))  # not self.log: metrics.py says why

    # -- evaluation -----------------------------------------------------------------------------
    def _greedy(self, split: str, index: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        examples = self.prompts.eval_examples(split)
        if index is not None:
            examples = [examples[i] for i in index]
        return greedy_eval(self.policy, self.tokenizer, self.prompts.task, examples,
                           max_new_tokens=self.eval_max_new_tokens,
                           use_chat_template=self.policy_cfg.use_chat_template,
                           max_abs_reward=self.guards_cfg.max_abs_reward, **self._eval_pieces())

    def _eval_pieces(self) -> dict[str, Any]:
        """The greedy evaluations' pieces: a rollout piece's rows (``model.engine.fast``)."""
        fast = self.engine_cfg.fast
        if fast.micro_batch_size is None:
            return {}
        return {"micro_batch_size": fast.micro_batch_size * self.sampling.num_samples, "threads": fast.threads}

    def _evaluate(self, split: str) -> dict[str, float]:
        correct, rewards, lengths = self._greedy(split)
        return {f"{split}/acc": correct.float().mean().item(), f"{split}/reward": rewards.mean().item(),
                f"{split}/len_mean": lengths.mean().item()}

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        correct, rewards, lengths = self._greedy("val", batch.tolist())
        self.val_acc.update(correct.float())
        self.val_reward.update(rewards)
        self.val_len.update(lengths)
        self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True)
        self.log("val/reward", self.val_reward, on_epoch=True)
        self.log("val/len_mean", self.val_len, on_epoch=True)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        correct, _, _ = self._greedy("test", batch.tolist())
        self.test_acc.update(correct.float())
        self.log("test/acc", self.test_acc, on_epoch=True)

    def teardown(self, stage: str) -> None:
        self.micro_threads.close()
        if isinstance(self.rollouts, WorkerRolloutQueue):  # the run ends, however it ends: so does its worker
            self.rollouts.close()

    # -- checkpoint state -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"rng": rng_state(), "skip_guard": self._skip_guard.state_dict()}
        if self.rollouts is not None:
            state["rollouts"] = self.rollouts.state_dict()
        if self._init_policy is not None:
            state["init_policy"] = self._init_policy.model.state_dict()
        if self._trainer is not None:  # what the run depends on, compared on resume (trainer/resume.py)
            state[RECORD_KEY] = run_record(self, self.trainer.datamodule, self.trainer)
        if self.policy_cfg.lora.enabled:  # the adapter only, and which base it belongs to
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter(k)}
            state["lora"] = {"base_sha256": self._base_hash or base_sha256(self.policy),
                             "rank": self.policy_cfg.lora.rank}
        checkpoint["reclight"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("reclight", {})
        if self._trainer is not None:
            path = self.trainer.ckpt_path
            if self.trainer.state.fn == "fit" and not self.resume_checked:  # the CLI checks before loading
                self.resume_changes = check_resume_config(state.get(RECORD_KEY), run_record(
                    self, self.trainer.datamodule, self.trainer), self.allow_changes, path)
            self._load_lora_state(checkpoint, state, path)
            if checkpoint.get("state_dict"):  # ModelParallelStrategy (FSDP2) loads and removes it first
                check_state_dict_matches(checkpoint["state_dict"], self.state_dict(), path)
        self._pending_rollouts = state.get("rollouts")
        self._pending_rng = state.get("rng")
        if "skip_guard" in state:
            self._skip_guard.load_state_dict(state["skip_guard"])
        if "init_policy" in state and self.policy is not None:
            self._init_policy = frozen_copy(self.policy)
            self._init_policy.model.load_state_dict(state["init_policy"])

    def _load_lora_state(self, checkpoint: dict[str, Any], state: dict[str, Any], path: Any) -> None:
        """A LoRA checkpoint holds the adapter only: refuse it into a run without LoRA (and the
        reverse), and complete its state dict with this run's base weights, whose hash is
        checked against the checkpoint's once the warm-up (if any) has rebuilt them."""
        saved, lora = state.get("lora"), self.policy_cfg.lora
        if (saved is not None) != lora.enabled:
            raise CheckpointError(
                f"--ckpt_path={str(path)!r}: model.policy.lora.enabled: the checkpoint has {saved is not None}, this "
                f"run {lora.enabled} (a LoRA checkpoint holds the adapter, not the full weights); accepted: the "
                "checkpoint's model.policy.lora")
        if saved is None:
            return
        if saved["rank"] != lora.rank:
            raise CheckpointError(f"--ckpt_path={str(path)!r}: model.policy.lora.rank: the checkpoint has "
                                  f"{saved['rank']}, this run {lora.rank}; accepted: the checkpoint's rank")
        sd = checkpoint.get("state_dict")
        if sd:
            for k, v in self.state_dict().items():
                if not is_adapter(k):
                    sd.setdefault(k, v)
        self._pending_base_hash = saved["base_sha256"]
        if self.trainer.state.fn != "fit" and base_sha256(self.policy) != self._pending_base_hash:
            # validate / test: no warm-up runs, so a warmed-up base cannot be rebuilt here
            raise CheckpointError(
                f"--ckpt_path={str(path)!r}: the LoRA adapter was trained on another base model (base weights "
                f"SHA-256: the checkpoint has {self._pending_base_hash}, this run {base_sha256(self.policy)}); "
                "accepted: the checkpoint's model.policy; a base changed by the warm-up exists only inside `fit` "
                "(evaluate a LoRA run's checkpoints there, or a run without model.warmup)")
