"""The ``model.engine`` config group: which rollout engine, its dtype, and each engine's options.

Each engine's options are a typed dataclass of their own, so a misspelt option
(``model.engine.vllm.gpu_memory_utilisation``) or a wrong type is refused when the command line
and YAML are parsed, before any model is loaded; values are checked here in ``__post_init__``,
and an option of an engine that is not selected is an error, not silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from reclight.checks import check_bool, check_choice, check_float, check_int, invalid
from reclight.kernels.threads import check_pieces_config

ENGINES = ("auto", "hf", "fast", "vllm")
ENGINE_DTYPES = (None, "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class FastEngineOptions:
    """Options of the lean Llama engine (``name: fast``, :class:`reclight.engines.fast.FastLlamaEngine`)."""

    compile_decode: bool = False
    """Run each decoding step through ``torch.compile`` (automatic dynamic shapes): ~23% faster
    rollouts on a 2-core CPU; the first rollout compiles; needs a C++ compiler (CPU) or Triton (GPU)."""

    micro_batch_size: int | None = None
    """Prompts per decoding piece (null: all of a rollout's prompts in one). Each piece samples
    from its own generator, seeded by the rollout's seed and the piece's index, so the samples
    depend on this setting (a different, equally valid stream than null), never on ``threads``.
    The greedy evaluations (``val``/``test`` and the warm-up's checks) are cut into pieces of as
    many rows, ``micro_batch_size * model.sampling.num_samples`` prompts, and share ``threads``."""
    threads: int = 1
    """Decoding pieces run side by side on this many threads, each torch op on one intra-op
    thread (CPU, eager decoding; needs ``micro_batch_size``; capped at the usable cores): the same
    tokens and log-probs as running them in turn at one intra-op thread
    (:mod:`reclight.kernels.threads`)."""

    def __post_init__(self) -> None:
        check_bool("model.engine.fast.compile_decode", self.compile_decode)
        check_pieces_config("model.engine.fast", self.micro_batch_size, self.threads, "pieces")
        if self.threads > 1 and self.compile_decode:
            raise invalid("model.engine.fast.threads", self.threads,
                          "1 with model.engine.fast.compile_decode: true (torch.compile's tracing is not thread-safe)")


@dataclass(frozen=True)
class VLLMEngineOptions:
    """Options of the vLLM engine (``name: vllm``, GPU, :class:`reclight.engines.vllm.VLLMEngine`)."""

    gpu_memory_utilization: float = 0.4
    """Fraction of GPU memory vLLM may take; leave room for the trainer's weights, optimizer
    state and activations on the same GPU."""
    max_model_len: int | None = None
    """Longest prompt + response vLLM must handle (None: the model's)."""
    enforce_eager: bool = False
    """Disable CUDA graphs (slower decoding, faster start, less memory)."""
    recompute_logp_behav: bool = False
    """Replace vLLM's log-probs by the trainer model's own (one extra forward; removes the
    inference/training mismatch; every batch of a version is then generated at its sync)."""

    def __post_init__(self) -> None:
        check_float("model.engine.vllm.gpu_memory_utilization", self.gpu_memory_utilization, gt=0, le=1,
                    accepted="0 < gpu_memory_utilization <= 1")
        check_int("model.engine.vllm.max_model_len", self.max_model_len, minimum=1, allow_none=True)
        check_bool("model.engine.vllm.enforce_eager", self.enforce_eager)
        check_bool("model.engine.vllm.recompute_logp_behav", self.recompute_logp_behav)


@dataclass(frozen=True)
class EngineConfig:
    """The rollout engine: its own copy of the weights is the behaviour policy."""

    name: Literal["auto", "hf", "fast", "vllm"] = "auto"
    """``auto`` (default): ``fast`` where it applies (a Llama model, ``top_p`` 1, a task without
    stop strings), else ``hf``; the run prints which and why. ``hf`` (Hugging Face ``generate``,
    any causal LM), ``fast`` (a lean sampling loop for Llama models: same distribution, far less
    Python per token) or ``vllm`` (GPU, ``pip install 'reclight[vllm]'``)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """dtype of the engine's weight copy. None: ``bfloat16`` when the trainer's precision is a
    bf16 one (``bf16-mixed``, the CLI's default: the master weights stay fp32), else the
    policy's dtype."""
    fast: FastEngineOptions = field(default_factory=FastEngineOptions)
    """Options of ``name: fast`` (an error with another engine)."""
    vllm: VLLMEngineOptions = field(default_factory=VLLMEngineOptions)
    """Options of ``name: vllm`` (an error with another engine)."""

    def __post_init__(self) -> None:
        check_choice("model.engine.name", self.name, ENGINES)
        check_choice("model.engine.dtype", self.dtype, ENGINE_DTYPES)
        for other in ("fast", "vllm"):
            if other == self.name:
                continue
            opts = getattr(self, other)
            default = type(opts)()
            for f in fields(opts):
                if getattr(opts, f.name) != getattr(default, f.name):
                    raise invalid(f"model.engine.{other}.{f.name}", getattr(opts, f.name),
                                  f"only with model.engine.name: {other} (this run's engine is {self.name!r})")

    @property
    def compiles(self) -> bool:
        """Whether this engine runs torch.compile (needs a C++ compiler on CPU)."""
        return self.name == "fast" and self.fast.compile_decode
