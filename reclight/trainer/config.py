"""The trainer's typed config groups: ``RLModule``'s arguments, one dataclass per concern.

Every field has a docstring (``reclight fit --help`` shows it), string choices are ``Literal``
so the parser refuses a misspelt value, and every value is checked in ``__post_init__`` with
:mod:`reclight.checks`, so a bad config fails when it is parsed, before any model is loaded.

========================  ====================================================================
group                     what
========================  ====================================================================
``model.algorithm``       the preset and any of its fields (:class:`AlgorithmGroup`)
``model.policy``          which model is trained, its dtype and prompt rendering
``model.engine``          the rollout engine (:mod:`reclight.engines.config`)
``model.train_forward``   how the training forward computes log-probs
``model.optim``           AdamW, gradient clipping, learning-rate warm-up
``model.guards``          when bad rewards or numerics stop the run
``model.monitor``         what is measured besides the loss
``model.sync``            the off-policy schedule (:class:`reclight.sync.SyncConfig`)
``model.updates``         optimizer updates per rollout batch (epochs x mini-batches)
``model.sampling``        K, temperature, top-p, max_new_tokens (:mod:`reclight.engines.base`)
``model.warmup``          the supervised warm-up (:mod:`reclight.trainer.warmup`)
========================  ====================================================================
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from reclight.algorithms import FIELD_PREFIX, PRESETS, AlgorithmConfig, get_algorithm
from reclight.checks import check_bool, check_choice, check_float, check_int, invalid
from reclight.kernels.threads import check_pieces_config
from reclight.clock import ClockConfig
from reclight.engines.base import SamplingConfig
from reclight.engines.config import EngineConfig
from reclight.models.loading import ATTN_IMPLEMENTATIONS, DTYPES, check_model_path
from reclight.models.lora import LoraConfig
from reclight.models.tiny import TinyModelConfig
from reclight.rollout.scoring import DEFAULT_MAX_ABS_REWARD
from reclight.rollout.workers import WorkersConfig
from reclight.sync import SyncConfig
from reclight.trainer.context import check_response_budget
from reclight.trainer.warmup import WarmupConfig


@dataclass(frozen=True)
class PolicyConfig:
    """The trained model."""

    name_or_path: str | None = None
    """Hugging Face model id or local folder; null builds the embedded tiny Llama (``tiny``)
    under ``tiny_dir``."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the embedded tiny model (used only when ``name_or_path`` is null)."""
    tiny_dir: str = "outputs/tiny-model"
    """Cache folder of the embedded tiny model (reused when it exists)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the trained (master) weights; use trainer precision ``bf16-mixed`` for bf16
    compute with fp32 master weights."""
    use_chat_template: bool | None = None
    """Render prompts through the tokenizer's chat template; null: when it has one."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA through peft (off by default; ``pip install 'reclight[lora]'``; docs/lora.md)."""

    def __post_init__(self) -> None:
        check_choice("model.policy.dtype", self.dtype, tuple(DTYPES))
        if self.use_chat_template is not None:
            check_bool("model.policy.use_chat_template", self.use_chat_template)
        check_model_path(self.name_or_path, "model.policy.name_or_path")


@dataclass(frozen=True)
class TrainForwardConfig:
    """The training forward that computes ``logp`` (and the entropy) of the response tokens."""

    impl: Literal["auto", "hf", "fused"] = "auto"
    """``auto`` (default): ``fused`` where it applies (a Llama model, not sharded by FSDP), else
    ``hf``; the run prints which. ``hf``: the model's own forward on the B * K sequences (any
    causal LM). ``fused``: each prompt run once for its K samples, padded positions skipped,
    attention written out (:mod:`reclight.kernels.fused_forward`); same values up to float
    rounding, faster on CPU."""
    compile: bool = False
    """``fused`` (or ``auto`` resolving to it) only: its element-wise chains (norms, RoPE, softmax, SwiGLU) compiled by
    ``torch.compile`` (~12% faster training pass on CPU in bf16; the first step compiles and
    needs a C++ compiler, or Triton on GPU)."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = None
    """The HF attention kernel of the policy (null: the transformers default, ``sdpa``);
    ``eager`` trains faster in bf16 on CPU; no effect on ``fused``."""
    micro_batch_size: int | None = None
    """Prompts (whole groups) per forward/backward; null: the whole batch. The gradient is the
    full batch's up to float rounding (each micro-batch's loss uses the whole update's counts)."""
    threads: int = 1
    """Micro-batches run side by side on this many threads, each torch op on one intra-op thread
    (CPU, one process, no ``compile``, no dropout; needs ``micro_batch_size``; capped at the
    usable cores). The gradients are added in micro-batch order, so at one intra-op thread
    (``OMP_NUM_THREADS=1``) the numbers do not depend on it (:mod:`reclight.kernels.threads`).
    At the embedded model's sizes this is how a second core helps (``configs/perf/cores.yaml``):
    a second intra-op thread costs more than it computes."""
    checkpointing: bool = False
    """Gradient checkpointing: keep only each decoder layer's input for the backward and run the
    layer again there (less activation memory, about one more forward of time). ``hf``: the
    model's own ``gradient_checkpointing_enable`` (non-reentrant); ``fused``: each layer under
    ``torch.utils.checkpoint`` (non-reentrant). Same gradients up to float rounding."""

    def __post_init__(self) -> None:
        check_choice("model.train_forward.impl", self.impl, ("auto", "hf", "fused"))
        check_bool("model.train_forward.compile", self.compile)
        if self.compile and self.impl == "hf":
            raise invalid("model.train_forward.compile", self.compile,
                          f"true only with model.train_forward.impl: fused (this run's impl is {self.impl!r})")
        check_choice("model.train_forward.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        check_pieces_config("model.train_forward", self.micro_batch_size, self.threads, "micro-batches")
        check_bool("model.train_forward.checkpointing", self.checkpointing)


@dataclass(frozen=True)
class UpdatesConfig:
    """Several optimizer updates per rollout batch (docs/algorithms.md section 6.1): the step's B prompts are
    split into ``mini_batches`` mini-batches of whole groups, iterated ``epochs`` times, so one
    batch makes U = epochs x mini_batches updates. A version, a step (``trainer.max_steps``,
    the sync schedule) and the rollout queue all count batches, not updates."""

    epochs: int = 1
    """E: passes over the batch."""
    mini_batches: int = 1
    """M: mini-batches per pass; must divide the per-rank number of prompts. Mini-batch m holds
    the prompts m, m + M, m + 2M, ... of each rank's block, so on any number of ranks the union
    of mini-batch m is the single-process mini-batch m (data-parallel runs give the same
    updates)."""

    def __post_init__(self) -> None:
        check_int("model.updates.epochs", self.epochs, minimum=1)
        check_int("model.updates.mini_batches", self.mini_batches, minimum=1)

    @property
    def count(self) -> int:
        """U, the optimizer updates per rollout batch."""
        return self.epochs * self.mini_batches


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with gradient clipping by hand (manual optimization)."""

    lr: float = 3e-4
    """Learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decays, each in [0, 1)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up over this many applied updates (0: constant)."""

    def __post_init__(self) -> None:
        check_float("model.optim.lr", self.lr, gt=0)
        check_float("model.optim.weight_decay", self.weight_decay, ge=0)
        betas = tuple(self.betas)
        try:
            if len(betas) != 2:
                raise ValueError
            for b in betas:
                check_float("model.optim.betas", b, ge=0, lt=1)
        except ValueError:
            raise invalid("model.optim.betas", betas, "two finite numbers in [0, 1)") from None
        check_float("model.optim.grad_clip", self.grad_clip, ge=0, accepted="grad_clip >= 0 (0 disables)")
        check_int("model.optim.lr_warmup_steps", self.lr_warmup_steps, minimum=0)


@dataclass(frozen=True)
class GuardsConfig:
    """When bad rewards or numerics stop the run (``docs/reliability.md``)."""

    max_failed_reward_frac: float = 0.5
    """Stop when a step has more than this fraction of samples whose reward function raised or
    returned NaN/inf (they get no gradient and are counted in ``reward/failed``); 1.0 never stops."""
    max_consecutive_skips: int = 3
    """A step whose loss or gradient is not finite is skipped (weights and optimizer state
    untouched, counted in ``train/skipped_steps``); stop after this many in a row."""
    max_abs_reward: float = DEFAULT_MAX_ABS_REWARD
    """A reward of larger magnitude fails its sample like a NaN one (no gradient, counted in
    ``reward/failed``): 1e38 is finite but overflows the loss; raise this for rewards on a
    large scale."""
    max_step_tokens: int = 2_000_000
    """The most response tokens one training step may generate on one rank: prompts per rank
    (``data.prompts_per_step`` / ranks, times ``data.oversample``) x ``model.sampling.num_samples``
    x ``model.sampling.max_new_tokens``, checked when the config is built, before any model
    loads (``num_samples: 200000`` ran step 0 for minutes). The default passes the paper's GPU
    shape (96 x 8 x 1024 = 786,432 on one GPU, ``configs/gsm8k_qwen.yaml``) and twice its
    samples per prompt (K = 16: 1,572,864), and refuses a slip of a digit or more beyond that;
    raise it for a larger step on a machine that can generate it."""

    def __post_init__(self) -> None:
        check_float("model.guards.max_failed_reward_frac", self.max_failed_reward_frac, ge=0, le=1,
                    accepted="a number in [0, 1]")
        check_int("model.guards.max_consecutive_skips", self.max_consecutive_skips, minimum=1)
        check_float("model.guards.max_abs_reward", self.max_abs_reward, gt=0)
        check_int("model.guards.max_step_tokens", self.max_step_tokens, minimum=1)

    def check_step_tokens(self, prompts_per_rank: int, num_samples: int, max_new_tokens: int, prompts: str) -> int:
        """Refuse a step that may generate more than ``max_step_tokens`` response tokens on one
        rank; returns the bound on them. ``prompts`` says where ``prompts_per_rank`` comes from
        (``data.prompts_per_step=96 over 1 rank``)."""
        tokens = prompts_per_rank * num_samples * max_new_tokens
        if tokens > self.max_step_tokens:
            raise ValueError(
                f"one training step would generate up to {tokens:,} response tokens per rank: {prompts_per_rank} "
                f"prompts ({prompts}) x model.sampling.num_samples={num_samples} x model.sampling.max_new_tokens="
                f"{max_new_tokens}, more than model.guards.max_step_tokens={self.max_step_tokens:,}; accepted: at "
                f"most {self.max_step_tokens:,} (lower one of those settings), or raise the bound on a machine that "
                f"can generate that much in one step: --model.guards.max_step_tokens {tokens}")
        return tokens


@dataclass(frozen=True)
class MonitorConfig:
    """What is measured besides the loss."""

    log_kl_init: bool = True
    """Keep a frozen copy of the RL-start policy and log ``kl/init`` (its memory: one more copy
    of the weights)."""
    kl_init_every: int = 10
    """Measure ``kl/init`` (and ``kl/ref``) every this many steps: it costs a no-grad forward of
    the reference copy, ~15% of a step of the main job (docs/benchmarks.md). Only at steps the
    loggers write (``trainer.log_every_n_steps``): with 1, steps 0, 10, 20, ...; with 50, every
    logged step. 1: every logged step. A preset whose loss or advantages use the reference
    (``needs_reference``) runs that forward every step anyway and logs ``kl/init`` with it."""
    eval_max_new_tokens: int | None = None
    """Response cap of the greedy evaluation (null: ``sampling.max_new_tokens``)."""
    log_mismatch: bool = False
    """Log ``mismatch/*`` (|logp_behav - logp_prox|, the behaviour weight) even when the loss does
    not need ``logp_prox`` (one extra no-grad forward per step; the proximal anchor computes it anyway)."""
    samples_every: int = 50
    """Every this many steps, from step 0, write a few of the step's samples (prompt, response,
    reward, advantage, the fraction of its tokens the loss's mask clipped, the policy version(s)
    that sampled it) to ``samples.jsonl`` in the run folder and to the logger's text view
    (TensorBoard, W&B); 0: never. From the step's own tensors: no generation or forward is added
    (docs/llm.md, "Samples in the logs")."""
    samples_per_step: int = 4
    """Samples written at such a step: the first ones of the batch in order (group 0's K samples,
    then group 1's, ...; rank 0's share under data parallel)."""
    samples_max_mb: float = 5.0
    """Cap on ``samples.jsonl``, in MB (10^6 bytes): a line that would pass it is not written, one
    printed line says so, and no more samples are written in the run."""

    def __post_init__(self) -> None:
        check_bool("model.monitor.log_kl_init", self.log_kl_init)
        check_int("model.monitor.kl_init_every", self.kl_init_every, minimum=1,
                  accepted="an integer >= 1 (1: every step)")
        check_bool("model.monitor.log_mismatch", self.log_mismatch)
        check_int("model.monitor.eval_max_new_tokens", self.eval_max_new_tokens, minimum=1, allow_none=True)
        check_int("model.monitor.samples_every", self.samples_every, minimum=0,
                  accepted="an integer >= 0 (0: no samples are written)")
        check_int("model.monitor.samples_per_step", self.samples_per_step, minimum=1)
        check_float("model.monitor.samples_max_mb", self.samples_max_mb, gt=0)


def _attribute_docs(cls: type) -> dict[str, str]:
    """``field -> docstring`` of a dataclass whose fields are documented by the string literal
    that follows each one (this project's style), read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for field_node, doc in zip(body, body[1:]):
        if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            docs[field_node.target.id] = " ".join(doc.value.value.split())
    return docs


def _algorithm_group() -> type:
    """``model.algorithm``: a preset name plus every :class:`~reclight.algorithms.AlgorithmConfig`
    field, each null by default (= the preset's value). Generated from ``AlgorithmConfig`` so the
    two cannot drift: same names, same types (``Literal`` choices), the same docstrings (shown by
    ``reclight fit --help``)."""
    hints = typing.get_type_hints(AlgorithmConfig)
    docs = _attribute_docs(AlgorithmConfig)
    fields: list[tuple[str, Any, Any]] = [("preset", Literal[tuple(PRESETS)], dataclasses.field(default=DEFAULT_PRESET))]
    args = [f"    preset: the preset the other fields start from ({', '.join(PRESETS)}; docs/algorithms.md section 3)."]
    for f in dataclasses.fields(AlgorithmConfig):
        fields.append((f.name, Optional[hints[f.name]], dataclasses.field(default=None)))
        args.append(f"    {f.name}: {docs.get(f.name, '')} (null: the preset's value)")

    def resolve(self: Any) -> AlgorithmConfig:
        """The algorithm this group describes: the preset with every non-null field applied (validated)."""
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(AlgorithmConfig)
                     if getattr(self, f.name) is not None}
        return get_algorithm(self.preset, **overrides)

    def post_init(self: Any) -> None:
        check_choice(FIELD_PREFIX + "preset", self.preset, tuple(PRESETS))
        self.resolve()  # every field checked now, when the config is parsed

    group = dataclasses.make_dataclass("AlgorithmGroup", fields, frozen=True,
                                       namespace={"resolve": resolve, "__post_init__": post_init})
    group.__module__ = __name__
    group.__doc__ = ("The algorithm (docs/algorithms.md): a preset and any of its fields changed, e.g.\n"
                     "``{preset: dapo, eps_high: 0.3}``. A null field keeps the preset's value (so a knob a preset\n"
                     "sets, such as cispo's is_clip, is turned off by choosing another preset).\n\nArgs:\n"
                     + "\n".join(args) + "\n")
    return group


DEFAULT_PRESET = "rec_oneside_nois"
AlgorithmGroup = _algorithm_group()


def check_settings(policy: PolicyConfig, algo: AlgorithmConfig, sampling: SamplingConfig, sync: SyncConfig,
                   clock: ClockConfig, engine: EngineConfig, monitor: MonitorConfig) -> None:
    """The checks that relate several groups, run when the module is built (before any model
    loads): DAPO's overlong cache fits ``max_new_tokens``; the fast engine samples with top_p 1;
    the embedded tiny model's positions hold the responses; the asynchronous schedule's needs."""
    if algo.overlong_penalty:
        algo.overlong_bounds(sampling.max_new_tokens)
    algo.check_sampling(engine.name, sampling.top_p)  # the truncated-sampling correction needs HF and top_p < 1
    if policy.lora.enabled and engine.name == "vllm":
        raise invalid("model.engine.name", engine.name, "hf, fast or auto with model.policy.lora.enabled true (the "
                      "vLLM engine would hold and checkpoint a full merged copy of the weights; not supported)")
    if engine.name == "fast" and sampling.top_p != 1.0:
        raise invalid("model.sampling.top_p", sampling.top_p, "1.0 with model.engine.name: fast (use engine hf)")
    if clock.enabled:
        check_async_settings(clock, sync, engine, sampling)
    if policy.name_or_path is None:  # the embedded tiny model: its positions are known now
        eval_cap = sampling.max_new_tokens if monitor.eval_max_new_tokens is None else monitor.eval_max_new_tokens
        check_response_budget(policy.tiny.max_positions, sampling.max_new_tokens, eval_cap,
                              "the embedded tiny model (model.policy.tiny.max_positions)")


def check_async_settings(clock: ClockConfig, sync: SyncConfig, engine: EngineConfig, sampling: SamplingConfig) -> None:
    """``model.clock.enabled`` needs the fast engine's step-wise generator (weights swapped between
    decoding steps, groups joining and leaving), full-distribution sampling, and no section-4
    schedule beside it: refused at config time, naming the field, before any model loads."""
    if engine.name in ("hf", "vllm"):
        raise invalid("model.engine.name", engine.name, "fast or auto with model.clock.enabled true: the asynchronous "
                      "schedule swaps weights between decoding steps, which HF generate and vLLM cannot")
    if engine.compiles:
        raise invalid("model.engine.fast.compile_decode", True, "false with model.clock.enabled true (the "
                      "continuous-batching generator runs eagerly)")
    if sampling.top_p != 1.0:
        raise invalid("model.sampling.top_p", sampling.top_p, "1.0 with model.clock.enabled true (the fast engine "
                      "samples the full distribution)")
    if sync != SyncConfig():
        raise invalid("model.sync", dataclasses.asdict(sync), "the defaults {sync_interval: 1, sync_offset: 0, "
                      "offline: false} with model.clock.enabled true: the clock's staleness rule decides which "
                      "versions are trained on (docs/algorithms.md section 7), the section 4 schedule does not apply")


def check_async_data(clock: ClockConfig, prompts: Any, group_size: int) -> None:
    """The asynchronous schedule against the data: no DAPO oversampling (a step trains on the first
    B complete groups; dropping uniform groups there is ``filter_uniform_groups``' job), and the
    clock's own check of B and K."""
    if prompts.oversampled:
        raise invalid("data.oversample", prompts.sampled_per_rank / prompts.groups_per_rank,
                      "1.0 with model.clock.enabled true: the trainer takes the first B completed groups; use "
                      "model.algorithm.filter_uniform_groups to leave uniform groups out of the loss")
    clock.check_against(prompts.groups_per_rank, group_size)


MODEL_GROUPS: dict[str, type] = {
    "policy": PolicyConfig,
    "algorithm": AlgorithmGroup,
    "sampling": SamplingConfig,
    "sync": SyncConfig,
    "clock": ClockConfig,
    "rollout": WorkersConfig,
    "updates": UpdatesConfig,
    "engine": EngineConfig,
    "train_forward": TrainForwardConfig,
    "optim": OptimConfig,
    "warmup": WarmupConfig,
    "guards": GuardsConfig,
    "monitor": MonitorConfig,
}
"""``RLModule``'s typed groups, ``model.<name>`` on the command line (a test checks this table against
``RLModule.__init__``'s signature; the CLI's key checks read it instead of importing the module)."""
