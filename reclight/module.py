"""The LightningModule: one optimizer step per rollout batch, with the loss from the library.

Each training step takes the rollout batch that :class:`reclight.callbacks.WeightSync` prepared
for it, computes ``logp`` of the response tokens under the policy (same temperature as
sampling), calls :func:`reclight.losses.policy_loss`, and steps AdamW with gradient clipping done
by hand (manual optimization). Metrics go to Lightning's loggers under namespaced keys.

Departures from a textbook trainer, listed up front:

- Micro-batching (``micro_batch_size`` prompts, whole groups) passes the FULL batch's token and
  sequence counts to every ``policy_loss`` call, so the summed gradient equals the full-batch
  gradient exactly (no 1/num_micro_batches approximation).
- ``kl/init`` is an estimate on the batch's own samples (drawn from the behaviour policy mu):
  KL(pi || pi_init) ~= token-mean of rho * (exp(d) - 1 - d), d = logp_init - logp,
  rho = pi / mu (the k3 estimator, importance-weighted to pi). It needs a frozen copy of the
  policy at the start of RL; set ``log_kl_init: false`` to save that memory.
- Samples whose reward failed (``reward_valid`` false) and RED-Drop's dropped samples are
  removed from the loss (``mask & keep``), and counted in ``reward/failed``.
- Guards (``reclight.reliability``, table in ``docs/reliability.md``): a step with more than
  ``max_failed_reward_frac`` failed rewards stops the run; a step whose loss or gradient is not
  finite is skipped (no weight or optimizer-state change, ``train/skipped_steps``) and
  ``max_consecutive_skips`` in a row stop it. The checkpoint adds the RNG states and these
  counters to the engine state, for a bitwise-exact resume (``tests/test_resume.py``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric

from reclight.advantages import group_advantages
from reclight.algorithms import get_algorithm
from reclight.engine_hf import HFGenerateEngine
from reclight.losses import policy_loss
from reclight.policy import ATTN_IMPLEMENTATIONS, TRAIN_FORWARDS, load_causal_lm, resolve_dtype, response_logprobs
from reclight.reliability import (
    NonFiniteGuard,
    check_model_path,
    check_reward_failures,
    is_finite,
    rng_state,
    rollout_health,
    set_rng_state,
)
from reclight.fsdp import is_sharded as _is_sharded
from reclight.fsdp import unsharded_copy
from reclight.rollout import RolloutBatch, SamplingConfig
from reclight.tiny import TinyModelConfig, build_tiny
from reclight.warmup import WarmupConfig, greedy_eval, supervised_warmup


class _Frozen:
    """Holds a module without registering it (not trained, not in the Lightning state dict)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model


FAST_ENGINE_OPTIONS = frozenset({"compile_decode"})


def _cpp_compiler_missing() -> str | None:
    """Why torch.compile on CPU would find no C++ compiler (None: one is there)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # pragma: no cover - a torch without inductor's builder: let compile report it
        return None
    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - any failure to find one is the same problem for the user
        return f"{type(e).__name__}: {e}; set CXX or install g++"
    return None


class RLModule(LightningModule):
    """Off-policy RL fine-tuning of a causal LM with the REC / REP / RED losses.

    Args:
        model_name_or_path: Hugging Face model id or local folder; None builds the embedded tiny
            Llama (``tiny``) under ``tiny_dir``.
        tiny: shape of the embedded tiny model (used only when ``model_name_or_path`` is None).
        tiny_dir: cache folder of the embedded tiny model (reused when it exists).
        dtype: dtype of the trained weights (``float32``; use trainer precision ``bf16-mixed``
            for bf16 compute).
        engine_dtype: dtype of the rollout engine's copy (None: same as ``dtype``). With trainer
            precision ``bf16-mixed`` and ``engine_dtype: bfloat16`` (``configs/perf/bf16.yaml``) the
            master weights and optimizer stay fp32.
        engine: rollout engine: ``hf`` (Hugging Face ``generate``, any causal LM) or ``fast``
            (:class:`reclight.engine_fast.FastLlamaEngine`: Llama models, ``top_p`` 1, no stop
            strings; same sampling distribution, much less Python per generated token) or
            ``vllm`` (:class:`reclight.engine_vllm.VLLMEngine`: GPU, ``pip install 'reclight[vllm]'``).
        engine_options: extra keyword arguments of the ``vllm`` engine (e.g.
            ``{gpu_memory_utilization: 0.3, recompute_logp_behav: true}``); with
            ``recompute_logp_behav`` the sync callback generates eagerly (``WeightSync.eager``).
            For the ``fast`` engine: ``{compile_decode: true}`` compiles its decoding step
            (``torch.compile``; ~23% faster rollouts on CPU, see ``configs/perf/compiled.yaml``).
        train_forward: the training log-prob forward: ``hf`` (the model's own forward on the
            ``B * K`` sequences, any causal LM) or ``fused`` (Llama models, single device or DDP:
            :func:`reclight.fused_llama.shared_prefix_hidden`: each prompt run once for its K
            samples, attention written out; same values up to float rounding, faster on CPU) or
            ``fused_compiled`` (``fused`` with its element-wise chains (norms, RoPE, softmax,
            SwiGLU) compiled by ``torch.compile``: ~12% faster training pass on CPU in bf16; the
            first step compiles (~30 s on a 2-core CPU) and needs a C++ compiler, or Triton on GPU).
        attn_implementation: the HF attention kernel of the policy (None: the transformers
            default, ``sdpa``); ``eager`` is faster for bf16 training on CPU (measured in
            ``docs/benchmarks.md``).
        use_chat_template: None uses the tokenizer's chat template when it has one.
        algorithm: preset name (``reclight.algorithms.PRESETS``).
        algorithm_overrides: fields of ``AlgorithmConfig`` to change, e.g. ``{eps_high: 0.28}``.
        sampling: K, temperature, top_p and max_new_tokens of the behaviour policy.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        grad_clip: clip the global gradient norm to this (0 disables).
        micro_batch_size: prompts (whole groups) per forward/backward; None = the whole batch.
        warmup: supervised warm-up before RL (skipped when resuming); None disables it.
        log_kl_init: keep a frozen copy of the RL-start policy and log ``kl/init``.
        eval_max_new_tokens: greedy-evaluation response cap (None: ``sampling.max_new_tokens``).
        seed: seeds model init (tiny), warm-up and sampling (None: the run's seed_everything).
        lr_warmup_steps: linear learning-rate warm-up over this many optimizer updates (0: constant).
        max_failed_reward_frac: stop the run when a step has more than this fraction of samples
            whose reward function raised or returned NaN/inf (those samples get no gradient and
            are counted in ``reward/failed``); 1.0 never stops.
        max_consecutive_skips: a step whose loss or gradient is not finite is skipped (weights and
            optimizer state untouched, counted in ``train/skipped_steps``); stop after this many
            in a row.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        tiny: TinyModelConfig = TinyModelConfig(),
        tiny_dir: str = "outputs/tiny-model",
        dtype: str = "float32",
        engine_dtype: str | None = None,
        engine: str = "hf",
        engine_options: dict[str, Any] | None = None,
        train_forward: str = "hf",
        attn_implementation: str | None = None,
        use_chat_template: bool | None = None,
        algorithm: str = "rec_oneside_nois",
        algorithm_overrides: dict[str, Any] | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float = 1.0,
        micro_batch_size: int | None = None,
        warmup: WarmupConfig | None = WarmupConfig(),
        log_kl_init: bool = True,
        eval_max_new_tokens: int | None = None,
        seed: int | None = None,
        lr_warmup_steps: int = 0,
        max_failed_reward_frac: float = 0.5,
        max_consecutive_skips: int = 3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        # Validate everything cheap before any model is loaded.
        self.algo = get_algorithm(algorithm, **(algorithm_overrides or {}))
        resolve_dtype(dtype, "dtype")
        if engine_dtype is not None:
            resolve_dtype(engine_dtype, "engine_dtype")
        if engine not in ("hf", "fast", "vllm"):
            raise ValueError(f"engine={engine!r} is not valid; accepted: 'hf', 'fast', 'vllm'")
        if train_forward not in TRAIN_FORWARDS:
            raise ValueError(f"train_forward={train_forward!r} is not valid; accepted: "
                             + ", ".join(map(repr, TRAIN_FORWARDS)))
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={attn_implementation!r} is not valid; accepted: "
                             + ", ".join(map(repr, ATTN_IMPLEMENTATIONS)))
        if engine_options and engine == "hf":
            raise ValueError(
                f"engine_options={engine_options!r} is not valid with engine='hf'; accepted: engine_options "
                "only with engine='vllm' (its keyword arguments) or engine='fast' ({compile_decode: bool})"
            )
        if engine == "fast" and set(engine_options or {}) - FAST_ENGINE_OPTIONS:
            raise ValueError(
                f"engine_options={engine_options!r} is not valid with engine='fast'; accepted keys: "
                + ", ".join(sorted(FAST_ENGINE_OPTIONS))
            )
        if not lr > 0:
            raise ValueError(f"lr={lr!r} is not valid; accepted: lr > 0")
        if grad_clip < 0:
            raise ValueError(f"grad_clip={grad_clip!r} is not valid; accepted: grad_clip >= 0 (0 disables)")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size!r} is not valid; accepted: None or an integer >= 1")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay!r} is not valid; accepted: weight_decay >= 0")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas={tuple(betas)!r} is not valid; accepted: two numbers in [0, 1)")
        if isinstance(lr_warmup_steps, bool) or not isinstance(lr_warmup_steps, int) or lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={lr_warmup_steps!r} is not valid; accepted: an integer >= 0")
        if not 0 <= max_failed_reward_frac <= 1:
            raise ValueError(f"max_failed_reward_frac={max_failed_reward_frac!r} is not valid; accepted: a number in [0, 1]")
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips!r} is not valid; accepted: an integer >= 1")
        check_model_path(model_name_or_path)
        # hparams may hold the CLI's plain dicts; keep the typed objects themselves.
        self.sampling = sampling
        self.tiny_cfg = tiny
        self.warmup_cfg = warmup
        self.use_chat_template = use_chat_template
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.engine: HFGenerateEngine | None = None
        self._init_policy: _Frozen | None = None
        self._rollout: RolloutBatch | None = None
        self._rollout_wait = 0.0
        self._engine_state: dict[str, Any] | None = None
        self._skip_guard = NonFiniteGuard(max_consecutive_skips)
        self._pending_rng: dict[str, Any] | None = None  # restored at the first step after a resume
        self.val_acc, self.val_reward, self.val_len = MeanMetric(), MeanMetric(), MeanMetric()
        self.test_acc = MeanMetric()

    # -- set-up ---------------------------------------------------------------------------------
    @property
    def run_seed(self) -> int:
        seed = self.hparams.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)

    def rollout_seed(self, step: int) -> int:
        """Sampling seed of step ``step``'s rollouts: a function of (run seed, step, rank) only
        (rank 0 of a single-process run adds nothing)."""
        return (self.run_seed * 1_000_003 + step + 7_919 * self.global_rank) % (2**63)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = self.hparams.model_name_or_path
        if path is None:
            path = str(build_tiny(self.hparams.tiny_dir, self.tiny_cfg, seed=self.run_seed))
        self._model_path = path
        self.policy, self.tokenizer = load_causal_lm(path, self.hparams.dtype,
                                                     attn_implementation=self.hparams.get("attn_implementation"))
        self.policy.train()
        mesh = getattr(self, "_device_mesh", None)  # set by Lightning's ModelParallelStrategy
        fsdp_strategy = self._trainer is not None and "FSDP" in type(self.trainer.strategy).__name__
        fused = self._train_forward != "hf"
        if fused and (mesh is not None or fsdp_strategy):
            raise ValueError(f"train_forward={self._train_forward!r} is not valid with a sharded policy (FSDP: it reads "
                             "the full parameters outside the wrapped modules' forward); accepted with FSDP: 'hf'")
        if mesh is not None:
            self._shard_policy(mesh)
        if fused:
            from reclight.fused_llama import llama_problems

            problems = llama_problems(self.policy.config)
            if problems:
                raise ValueError(f"train_forward={self._train_forward!r} does not support " + "; ".join(problems)
                                 + "; use train_forward='hf'")
        compiled = [f for f, on in (
            ("train_forward='fused_compiled'", self._train_forward == "fused_compiled"),
            ("engine_options.compile_decode=True",
             self.hparams.engine == "fast" and bool((self.hparams.engine_options or {}).get("compile_decode"))),
        ) if on]
        device = self.trainer.strategy.root_device if self._trainer is not None else next(self.policy.parameters()).device
        if compiled and device.type == "cpu":
            missing = _cpp_compiler_missing()
            if missing:
                raise ValueError(f"{' and '.join(compiled)} need(s) a C++ compiler for torch.compile on CPU ({missing}); "
                                 "accepted without one: train_forward 'fused' or 'hf', compile_decode false")

    def _shard_policy(self, mesh: Any) -> None:
        """FSDP2 over the data-parallel dimension of Lightning's ``ModelParallelStrategy`` mesh
        (``configs/strategy/fsdp.yaml``); tensor parallelism is not implemented."""
        from reclight.fsdp import shard_policy

        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
            raise ValueError(f"ModelParallelStrategy tensor_parallel_size={mesh['tensor_parallel'].size()} is not "
                             "valid; accepted: 1 (reclight shards the policy with FSDP over data_parallel only)")
        shard_policy(self.policy, mesh["data_parallel"] if "data_parallel" in names else mesh)

    @property
    def _train_forward(self) -> str:  # validated against the strategy once, in configure_model
        return self.hparams.get("train_forward", "hf")

    def configure_callbacks(self) -> list:
        from reclight.callbacks import WeightSync

        has_sync = self._trainer is not None and any(isinstance(c, WeightSync) for c in self.trainer.callbacks)
        return [] if has_sync else [WeightSync()]  # default: on-policy

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        h = self.hparams
        # torch's fused AdamW kernel (one pass per tensor instead of ~10 ops): 4.4 -> 1.9 ms per
        # step on the 3.4M-parameter benchmark model (CPU). Not for sharded (DTensor) parameters.
        from reclight.fsdp import is_sharded

        fused = not is_sharded(self.policy) and all(p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas),
                                fused=True if fused else None)
        warm = h.get("lr_warmup_steps", 0)
        if not warm:
            return opt
        # Stepped by hand after each APPLIED update (a skipped non-finite step does not count).
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: min(1.0, (n + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @property
    def eval_max_new_tokens(self) -> int:
        return self.hparams.eval_max_new_tokens or self.sampling.max_new_tokens

    def on_fit_start(self) -> None:
        task = self.trainer.datamodule.task
        resuming = self.trainer.ckpt_path is not None
        if self.warmup_cfg is not None and not resuming:
            stats = supervised_warmup(
                self.policy, self.tokenizer, task, self.warmup_cfg, seed=self.run_seed,
                max_new_tokens=self.eval_max_new_tokens, use_chat_template=self.use_chat_template,
                log=self._log_warmup,
            )
            self.print(f"warm-up: {stats}")
        stop = tuple(getattr(task, "stop_strings", ()))
        if self.hparams.engine == "vllm":
            self.engine = self._make_vllm_engine()
        else:
            engine_cls = HFGenerateEngine
            if self.hparams.engine == "fast":
                from reclight.engine_fast import FastLlamaEngine as engine_cls
            # Sharded (FSDP2): the engine is built from a gathered, unsharded copy.
            source = unsharded_copy(self.policy) if _is_sharded(self.policy) else self.policy
            opts = dict(self.hparams.engine_options or {}) if self.hparams.engine == "fast" else {}
            self.engine = engine_cls(source, self.tokenizer, self.sampling, self.hparams.engine_dtype, stop, **opts)
        if self._engine_state is not None:
            self.engine.load_state_dict(self._engine_state)
            self._engine_state = None
        if self.hparams.log_kl_init and self._init_policy is None:
            self._init_policy = _Frozen(unsharded_copy(self.policy).eval().requires_grad_(False))

    def _log_warmup(self, metrics: dict[str, float], step: int) -> None:
        # Warm-up runs before the RL steps: log to the loggers directly (self.log is not allowed).
        for lg in self.loggers:
            lg.log_metrics(metrics, step=step)
        self.print(f"warm-up step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))

    def _make_vllm_engine(self) -> Any:
        """vLLM loads its own copy from the model path; the trainer's current weights (after any
        warm-up) are pushed once as version 0. Trainer-side re-scoring needs eager generation."""
        from reclight.callbacks import WeightSync
        from reclight.engine_vllm import VLLMEngine

        opts = dict(self.hparams.engine_options or {})
        engine = VLLMEngine(self._model_path, self.tokenizer, self.sampling,
                            dtype=self.hparams.engine_dtype or "bfloat16", seed=self.run_seed, **opts)
        engine.update_weights(self.policy, 0)
        if opts.get("recompute_logp_behav"):
            for cb in self.trainer.callbacks:
                if isinstance(cb, WeightSync) and not cb.eager:
                    cb.eager = True
                    self.print("recompute_logp_behav: WeightSync generates each version's batches at its sync")
        return engine

    def on_train_start(self) -> None:
        # The global RNG is restored here, as late as possible before the first resumed step and
        # before any callback's on_train_batch_start: after loading, Lightning still sets up the
        # loops (the loaders have their own generators, so that draws nothing from it).
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        if self.global_step == 0:  # the "before" figure: greedy accuracy at the start of RL
            metrics = self._evaluate("val")
            for lg in self.loggers:
                lg.log_metrics(metrics, step=0)
            self.print(f"start of RL: {metrics}")

    def _evaluate(self, split: str) -> dict[str, float]:
        dm = self.trainer.datamodule
        correct, rewards, lengths = greedy_eval(
            self.policy, self.tokenizer, dm.task, dm.eval_examples(split),
            max_new_tokens=self.eval_max_new_tokens, use_chat_template=self.use_chat_template,
        )
        return {f"{split}/acc": correct.float().mean().item(), f"{split}/reward": rewards.mean().item(),
                f"{split}/len_mean": lengths.mean().item()}

    # -- training -------------------------------------------------------------------------------
    def set_rollout(self, rollout: RolloutBatch, wait_seconds: float = 0.0) -> None:
        """Called by ``WeightSync`` at the start of each step with that step's batch."""
        self._rollout = rollout.to(self.device)
        self._rollout_wait = wait_seconds

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        r, self._rollout = self._rollout, None
        if r is None or r.step != self.global_step:
            raise RuntimeError(
                f"training step {self.global_step} got rollout for step {None if r is None else r.step}; "
                "add reclight.callbacks.WeightSync to the trainer callbacks"
            )
        start = time.perf_counter()
        opt = self.optimizers()
        world = self.trainer.world_size
        failed = torch.stack([(~r.reward_valid).sum(), torch.tensor(r.reward_valid.numel(), device=r.rewards.device)])
        if world > 1:  # every rank must take the same decision
            failed = self.trainer.strategy.reduce(failed.float(), reduce_op="sum")
        check_reward_failures(int(failed[0]), int(failed[1]), r.step, self.hparams.max_failed_reward_frac)
        gen = torch.Generator(device=r.rewards.device).manual_seed(self.rollout_seed(r.step))
        adv, keep = group_advantages(r.rewards, self.algo, gen, valid=r.reward_valid)  # [B, K]
        mask = r.response_mask & keep[..., None]  # [B, K, T]
        # Global counts: summed over data-parallel ranks, so every rank's loss is its share of the
        # union batch's loss (and micro-batches are shares of the full batch).
        n = torch.stack([mask.sum(), mask.any(-1).sum()]).float()
        if world > 1:
            n = self.trainer.strategy.reduce(n, reduce_op="sum")
        counts = dict(num_tokens=n[0].clamp(min=1), num_seqs=n[1].clamp(min=1))
        B = r.rewards.shape[0]
        mb = self.hparams.micro_batch_size or B
        logp_all = torch.zeros_like(r.logp_behav)
        ent_all = torch.zeros_like(r.logp_behav)
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=r.rewards.device)
        for s in range(0, B, mb):
            sl = slice(s, s + mb)
            logp, ent = response_logprobs(
                self.policy, r.prompt_ids[sl], r.prompt_mask[sl], r.response_ids[sl], r.response_mask[sl],
                temperature=self.sampling.temperature, return_entropy=True, forward=self._train_forward,
            )
            loss, metrics = policy_loss(logp, r.logp_behav[sl], adv[sl], mask[sl], self.algo, **counts)
            # DDP averages gradients over ranks; x world turns that mean into the union's sum.
            self.manual_backward(loss * world if world > 1 else loss)
            loss_sum = loss_sum + loss.detach()
            logp_all[sl], ent_all[sl] = logp.detach(), ent.detach()
        if mb < B:  # metrics of the whole batch (the loss value is the same sum)
            _, metrics = policy_loss(logp_all, r.logp_behav, adv, mask, self.algo, **counts)
        params = [p for p in self.policy.parameters() if p.grad is not None]
        clip = self.hparams.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        bad = not is_finite(loss_sum, grad_norm)
        if world > 1:  # grad_norm is already global; the loss is local: skip if any rank saw one
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        skip = self._skip_guard.update(bad, r.step, loss_sum.item(), grad_norm.item())
        if skip:  # with no gradients AdamW leaves weights and state untouched; the step still counts
            opt.zero_grad(set_to_none=True)
        self._lr_used = float(opt.param_groups[0]["lr"])
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None and not skip:
            sched.step()
        train_seconds = time.perf_counter() - start
        self._log_step(r, metrics, logp_all, ent_all, grad_norm, train_seconds)
        return metrics["loss/policy"] + metrics["loss/reg"]

    @torch.no_grad()
    def _log_step(self, r: RolloutBatch, metrics: dict, logp: torch.Tensor, entropy: torch.Tensor,
                  grad_norm: torch.Tensor, train_seconds: float) -> None:
        m = r.response_mask
        n_tok = m.sum().clamp(min=1)
        staleness = (r.step - r.version).float()
        valid = r.reward_valid
        out = {
            **metrics,
            "reward/mean": (r.rewards * valid).sum() / valid.sum().clamp(min=1),
            "reward/acc": r.correct.float().mean(),
            "reward/failed": (~valid).sum().float(),
            "response/len_mean": m.sum(-1).float().mean(),
            "response/len_max": m.sum(-1).float().max(),
            "policy/entropy": (entropy * m).sum() / n_tok,
            "rollout/staleness_mean": staleness.mean(),
            "rollout/staleness_max": staleness.max(),
            "rollout/wait_s": torch.tensor(self._rollout_wait),
            "grad/norm": grad_norm.float(),
            "train/skipped_steps": torch.tensor(float(self._skip_guard.total)),
            "train/lr": torch.tensor(self._lr_used),  # the LR of this step's update
            **rollout_health(r.response_ids, r.response_mask, r.rewards, valid, self._eos_ids,
                             self.sampling.max_new_tokens),
            "throughput/rollout_tok_s": n_tok / max(r.gen_seconds, 1e-9),
            "throughput/train_tok_s": n_tok / max(train_seconds, 1e-9),
        }
        if self._init_policy is not None:
            logp_init, _ = response_logprobs(self._init_policy.model, r.prompt_ids, r.prompt_mask, r.response_ids,
                                             m, temperature=self.sampling.temperature, forward=self._train_forward)
            d = torch.where(m, logp_init - logp, 0.0)
            rho = torch.where(m, logp - r.logp_behav, 0.0).exp()
            out["kl/init"] = (rho * (d.exp() - 1 - d) * m).sum() / n_tok
        bar = {"reward/mean", "reward/acc"}
        for k, v in out.items():
            self.log(k, v.float(), on_step=True, on_epoch=False, prog_bar=k in bar, batch_size=1)

    # -- evaluation -----------------------------------------------------------------------------
    def _eval_batch(self, split: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dm = self.trainer.datamodule
        examples = dm.eval_examples(split)
        return greedy_eval(self.policy, self.tokenizer, dm.task, [examples[i] for i in index.tolist()],
                           max_new_tokens=self.eval_max_new_tokens, use_chat_template=self.use_chat_template)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        correct, rewards, lengths = self._eval_batch("val", batch)
        self.val_acc.update(correct.float())
        self.val_reward.update(rewards)
        self.val_len.update(lengths)
        self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True)
        self.log("val/reward", self.val_reward, on_epoch=True)
        self.log("val/len_mean", self.val_len, on_epoch=True)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        correct, _, _ = self._eval_batch("test", batch)
        self.test_acc.update(correct.float())
        self.log("test/acc", self.test_acc, on_epoch=True)

    # -- checkpoint state (issue #5 builds exact resume on these) -------------------------------
    @property
    def _eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"rng": rng_state(), "skip_guard": self._skip_guard.state_dict()}
        if self.engine is not None:
            state["engine"] = self.engine.state_dict()
        if self._init_policy is not None:
            state["init_policy"] = self._init_policy.model.state_dict()
        checkpoint["reclight"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("reclight", {})
        self._engine_state = state.get("engine")
        self._pending_rng = state.get("rng")
        if "skip_guard" in state:
            self._skip_guard.load_state_dict(state["skip_guard"])
        if "init_policy" in state and self.policy is not None:
            init = unsharded_copy(self.policy).eval().requires_grad_(False)
            init.load_state_dict(state["init_policy"])
            self._init_policy = _Frozen(init)
