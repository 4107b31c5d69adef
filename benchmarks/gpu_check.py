"""The GPU check: reclight's CUDA paths checked, and its throughput against the chip's limits.

One run, one table printed last (and written, with every raw figure, to ``--out``)::

    bash benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine: wheels from .whl/, then this
    python benchmarks/gpu_check.py --out OUT_DIR     # the same without the wheel step
    python benchmarks/gpu_check.py --smoke           # tiny shapes, any machine (a CPU: about a minute)

Sections, in order (each has a time budget and runs under an alarm: one that fails or overruns
is recorded as FAIL with its error, and the run goes on; ``--sections`` runs a subset):

- ``env``: versions, the device, the float32 matmul settings.
- ``ceilings``: the chip's two limits, measured here: a bf16 8192^3 matmul (random data, median
  of 10 after 3 warm-ups) and a 2 GiB device-to-device copy (bytes read + written).
- ``chunked``: ``token_logprobs``' logp, entropy and the gradients of hidden, weight and bias, in
  fp32 to rtol = atol = 1e-5: against ``token_logprobs_naive`` at the CPU suite's shape (V = 211)
  and, at Qwen2.5-0.5B's LM-head shape (V = 151,936, where the fp32 naive path is itself off by
  more than that), against float64 on the same inputs; bf16 inputs against float64 on the same
  bf16 values by relative error ``||out - ref|| / ||ref||`` (fp32-computed outputs <= 1e-5,
  bf16 gradients <= 1e-2).
- ``fused``: ``response_logprobs(impl="fused")`` vs HF's forward: fp32 log-probs and entropies to
  1e-5 and every gradient to rtol 1e-4 / atol 1e-5; under bf16 autocast log-probs within 3e-2 of
  HF eager's and a gradient error no larger than 1.5x HF eager's own.
- ``engines``: the fast engine's and the HF engine's ``logp_behav`` vs the trainer's fp32 logp
  of the same tokens (fp32; fast 1e-5 with batch compaction, HF 1e-4).
- ``qwen2``: what the Llama-only paths say about a Qwen2 model (the paper's) and, for the
  record, how far the fused forward is from HF's on a tiny Qwen2 it is not allowed to run.
- ``fit``: ``reclight fit`` (the embedded default) through ``reclight.trainer.cli.main`` with
  ``--trainer.accelerator gpu --trainer.precision bf16-mixed --trainer.max_steps 20`` (and
  validation every 10 steps): the run ends at step 20, no step skipped, and every parameter
  moved, both from its initial value and during RL.
- ``mismatch``: |logp_behav - logp_trainer| of a bf16 engine (HF and fast) against the fp32
  trainer, on the model the ``fit`` section trained.
- ``workers``: a rollout worker process on the same GPU (paced, in-flight updates, the micro
  model): batches and final weights bitwise those of the in-process run; a free worker's run
  keeps the version rules; the three step times (one chip shared by trainer and worker: peers'
  two-pool speedups do not transfer).
- ``compiled`` (CUDA only: Triton): the compiled training forward (``compile_pointwise``) vs HF's
  (as ``fused`` fp32) and the compiled decoding step's ``logp_behav`` (as ``engines``).
- ``rollout_hf`` / ``rollout_fast``: rollout tokens/s at the paper's GSM8K shapes (96 prompts x
  8 samples, up to 1024 new tokens, bf16 engine) on a randomly initialised Qwen2.5-1.5B-shaped
  model (the HF engine) and, as the fast engine refuses Qwen2, on a Llama-shaped model of the
  same sizes. A short probe sizes the run to the section's budget (the largest ``max_new_tokens``
  that fits). Bandwidth fraction: the bytes a decoding step must read (bf16 weights + the KV
  cache written so far, for the sequences still running) over the decode time, over the
  measured copy bandwidth.
- ``train_hf`` / ``train_fused``: one optimizer step (bf16 autocast, fp32 master weights, fused
  AdamW, chunked log-probs, the REC loss, micro-batches of one prompt's 8 samples) on the same
  two models, ``impl="hf"`` and ``impl="fused"``: response tokens/s, peak memory, and model
  FLOP/s over the measured matmul rate (model FLOPs: 3x the forward's matmuls over every
  sequence's prompt + response, attention's two products causal, the LM head at response
  tokens; the fused forward's saved work, one prompt per group, is not subtracted).

Departures to know when reading the figures: the models are random (no download on the GPU
machine), so a sampled response almost never ends before ``max_new_tokens`` (the worst case);
prompts are random token ids of GSM8K-like lengths (96-192 tokens, left-padded).
``--smoke`` runs every section with tiny shapes; on a machine without CUDA the Triton section
reports "skipped: no CUDA", the fit runs ``configs/smoke_test.yaml`` on the CPU with the test
suite's dense-reward ``DigitTask`` (so a random model gets gradient), and the limits are the CPU's.
The checks themselves live beside this file: ``gpu_check_exact.py`` (the exactness
comparisons, also asserted on CUDA by ``tests/gpu/test_gpu_exactness.py``) and
``gpu_check_speed.py`` (the ceilings and the throughput runs); this file runs them as sections and
prints the table. Exit status: 0 when no row is FAIL, 1 otherwise, 2 without CUDA and --smoke.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):  # reclight, and the two modules beside this file (also when imported by path)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import gpu_check_exact as exact  # noqa: E402
import gpu_check_speed as speed  # noqa: E402

PASS, FAIL, INFO = "pass", "FAIL", "info"
NO_CUDA = "skipped: no CUDA"


# -- the table ------------------------------------------------------------------------------------
@dataclass
class Row:
    section: str
    check: str
    result: str
    criterion: str = ""
    status: str = INFO
    value: float | None = None  # the figure itself (JSON; the tests read it)


SectionTimeout = speed.OutOfTime  # raised by the alarm when a section runs past its budget


class Terminated(Exception):
    """Raised on SIGTERM (an outer ``timeout``): the table is still printed."""


@dataclass
class Context:
    device: torch.device
    smoke: bool
    tmp: Path
    rows: list[Row] = field(default_factory=list)
    section: str = ""
    section_end: float = math.inf  # monotonic time of this section's alarm
    shared: dict[str, Any] = field(default_factory=dict)  # figures and objects later sections use
    details: dict[str, Any] = field(default_factory=dict)  # raw figures, for the JSON

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def shapes(self) -> speed.Shapes:
        return speed.SMOKE_SHAPES if self.smoke else speed.Shapes()

    def time_left(self) -> float:
        return self.section_end - time.monotonic()

    def add(self, check: str, result: str, criterion: str = "", status: str = INFO, value: float | None = None) -> None:
        self.rows.append(Row(self.section, check, result, criterion, status, value))

    def bound(self, check: str, value: float, limit: float, criterion: str | None = None, fmt: str = "{:.2e}") -> None:
        """A figure that must be finite and at most ``limit``."""
        ok = math.isfinite(value) and value <= limit
        self.add(check, fmt.format(value), criterion or f"<= {limit:g}", PASS if ok else FAIL, value)

    def detail(self, key: str, value: Any) -> None:
        self.details.setdefault(self.section, {})[key] = value


# -- sections: each adds its rows to the table ---------------------------------------------------
def _tests_importable() -> None:
    """The test suite's helpers (``conftest.DigitTask``: a tiny task with a dense reward) importable."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))


def section_env(ctx: Context) -> None:
    import lightning
    import transformers

    ctx.add("torch / transformers / lightning", f"{torch.__version__} / {transformers.__version__} / "
            f"{lightning.__version__}")
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        ctx.add("device", f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
                f"CUDA {torch.version.cuda}")
        try:
            import triton

            ctx.add("triton", triton.__version__)
        except ImportError as e:
            ctx.add("triton", f"not importable: {e}", status=FAIL)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        ctx.add("fp32 matmul: TF32 allowed", str(tf32), "False (exact fp32 checks)", FAIL if tf32 else PASS)
    else:
        ctx.add("device", f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    try:
        import jsonargparse

        ctx.add("jsonargparse (the CLI)", jsonargparse.__version__)
    except ImportError:
        ctx.add("jsonargparse (the CLI)", "missing: the fit section will fail", "its wheels: benchmarks/gpu_check.sh",
                FAIL)


def section_ceilings(ctx: Context) -> None:
    r = speed.measure_ceilings(ctx.device, **(dict(n=256, copy_bytes=64 * 2**20) if ctx.smoke else {}))
    ctx.shared.update(matmul_flops=r["matmul_flops"], bandwidth=r["bandwidth"])
    ctx.detail("ceilings", r)
    ctx.add(f"bf16 matmul {r['n']}^3 (random, median of 10)", f"{r['matmul_flops'] / 1e12:.1f} TFLOP/s",
            "the training limit", value=r["matmul_flops"])
    ctx.add(f"copy {r['copy_bytes'] / 2**30:.2f} GiB (read + write)", f"{r['bandwidth'] / 1e12:.2f} TB/s",
            "the decoding limit", value=r["bandwidth"])


def section_chunked(ctx: Context) -> None:
    small = dict(n=37, h=24, v=211, chunk=5)  # the CPU suite's shape
    shape = small if ctx.smoke else {}
    for label, r, key in (("V=211", exact.chunked_logprobs_fp32(ctx.device, **small), "chunked_vs_naive"),
                          (f"V={shape.get('v', 151936)}", exact.chunked_logprobs_fp32(ctx.device, **shape),
                           "chunked_vs_float64")):
        ctx.detail(f"fp32 {label}", r)
        worst = max(r[key], key=r[key].get)
        ctx.bound(f"fp32 {key.replace('_', ' ')}, {label}: logp, entropy, 3 grads", r[key][worst], 1.0,
                  "tol ratio <= 1 (rtol=atol=1e-5)", fmt=f"{{:.3f}} (worst: {worst})")
    naive = max(r["naive_vs_float64"].values())
    ctx.add(f"fp32 naive vs float64, {label} (the reference's own error)", f"{naive:.3f}", "tol ratio, for the record",
            INFO, naive)
    bf16 = exact.chunked_logprobs_bf16(ctx.device, **shape)
    ctx.detail("bf16_rel_err", bf16)
    ctx.bound("bf16 inputs vs float64: logp, entropy (fp32 out)", max(bf16["logp"], bf16["entropy"]), 1e-5,
              "rel err <= 1e-5")
    grads = max(bf16[n] for n in exact.LM_HEAD_NAMES[2:])
    ok = bf16["grad_dtype_bf16"] == 1.0 and math.isfinite(grads) and grads <= 1e-2
    ctx.add("bf16 inputs vs float64: 3 grads (bf16 out)", f"{grads:.2e}", "rel err <= 1e-2, dtype bf16",
            PASS if ok else FAIL, grads)


def _fused_rows(ctx: Context, r: dict[str, float], label: str) -> None:
    ctx.bound(f"{label}: max abs dlogp, dentropy", max(r["logp_max_abs"], r["entropy_max_abs"]), 1e-5)
    ok = r["grad_tol_ratio"] <= 1.0 and r["grad_min_max_abs"] > 0
    ctx.add(f"{label}: every parameter's gradient", f"tol ratio {r['grad_tol_ratio']:.3f}",
            "<= 1 (rtol 1e-4, atol 1e-5), all grads non-zero", PASS if ok else FAIL, r["grad_tol_ratio"])


def section_fused(ctx: Context) -> None:
    for name, overrides in (("GQA + biases", {}), ("tied", {"tie_word_embeddings": True})):
        r = exact.fused_forward_fp32(ctx.device, **overrides)
        ctx.detail(f"fp32 {name}", r)
        _fused_rows(ctx, r, f"fp32 fused vs HF ({name})")
    r = exact.fused_forward_bf16(ctx.device)
    ctx.detail("bf16", r)
    ctx.bound("bf16 autocast: max abs(logp fused - logp HF eager)", r["logp_max_abs"], 3e-2)
    hf, fused = r["grad_rel_err_hf"], r["grad_rel_err_fused"]
    ok = 1e-4 < hf < 0.05 and fused <= 1.5 * hf
    ctx.add("bf16 autocast: gradient rel err vs fp32", f"fused {fused:.2e}, HF {hf:.2e}",
            "fused <= 1.5x HF, 1e-4 < HF < 0.05", PASS if ok else FAIL, fused / hf if hf > 0 else math.inf)


def section_engines(ctx: Context) -> None:
    for engine, limit in (("fast", 1e-5), ("hf", 1e-4)):
        r = exact.engine_logp_error(ctx.device, engine)
        ctx.detail(engine, r)
        ctx.bound(f"fp32 {engine} engine logp_behav vs trainer logp", r["max_abs"], limit,
                  f"max <= {limit:g} over {int(r['tokens'])} tokens")


def section_compiled(ctx: Context) -> None:
    if not ctx.cuda:
        ctx.add("compiled training forward (Triton)", "-", "", NO_CUDA)
        ctx.add("compiled decoding step (Triton)", "-", "", NO_CUDA)
        return
    r, t = speed.timed(lambda: exact.fused_forward_fp32(ctx.device, compile_pointwise=True), ctx.device)
    ctx.detail("train_forward", {**r, "seconds_incl_compile": t})
    _fused_rows(ctx, r, f"compiled fused vs HF, fp32 ({t:.0f} s incl. compile)")
    r, t = speed.timed(lambda: exact.engine_logp_error(ctx.device, "fast", compile_decode=True), ctx.device)
    ctx.detail("decode", {**r, "seconds_incl_compile": t})
    ctx.bound(f"compiled decoding step: logp_behav vs trainer ({t:.0f} s)", r["max_abs"], 1e-5,
              f"max <= 1e-05 over {int(r['tokens'])} tokens")


def section_qwen2(ctx: Context) -> None:
    """The Llama-only paths on a tiny Qwen2 model (the paper's architecture)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from reclight.engines.base import SamplingConfig
    from reclight.engines.fast import FastLlamaEngine
    from reclight.kernels.llama import llama_problems
    from reclight.models.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(**{**speed.SMOKE_MODEL, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                         "pad_token_id": tok.pad_token_id, "tie_word_embeddings": False})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(ctx.device)
    try:
        FastLlamaEngine(model, tok, SamplingConfig(num_samples=2))
        ctx.add("fast engine on Qwen2", "accepted", "refused (Llama only)", FAIL)
    except ValueError as e:
        ctx.add("fast engine on Qwen2", "refused", str(e)[:90])
    problems = llama_problems(cfg)
    ctx.add("fused forward on Qwen2 (trainer's check)", "refused" if problems else "accepted", "; ".join(problems),
            INFO if problems else FAIL)
    # Not a supported path: how far the fused forward is from HF's on Qwen2 (q/k/v biases, no o bias).
    batch = exact.prompt_batch(tok, ctx.device)
    hf = exact.forward_logp_and_grads(model, batch, "hf", False, 1.0)
    fused = exact.forward_logp_and_grads(model, batch, "fused", False, 1.0)
    diff = float((fused[0] - hf[0]).abs().max())
    ctx.add("fused forward run on Qwen2 anyway: max abs dlogp", f"{diff:.2e}", "for the record (fp32)", INFO, diff)


def fit_args(ctx: Context) -> list[str]:
    """Arguments of ``reclight fit`` for the ``fit`` section (no subcommand: the CLI is built
    with ``run=False`` and fitted by hand)."""
    common = ["--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(ctx.tmp / "logs"),
              "--model.policy.tiny_dir", str(ctx.tmp / "tiny"), "--trainer.precision", "bf16-mixed",
              "--trainer.accelerator", "gpu" if ctx.cuda else "cpu"]
    if not ctx.smoke:  # the embedded default (warm-up to 40% accuracy, then RL); validation at 10 and 20
        return [*common, "--trainer.max_steps", "20", "--trainer.val_check_interval", "10"]
    # A random tiny model with a dense reward, so the RL steps have gradient (tests/conftest.py).
    _tests_importable()
    return ["--config", str(ROOT / "configs/smoke_test.yaml"), *common, "--trainer.max_steps", "3",
            "--data.task", "conftest.DigitTask"]


def section_fit(ctx: Context) -> None:
    import lightning.pytorch as pl
    from transformers import AutoModelForCausalLM

    from reclight.trainer.cli import main

    class Snapshot(pl.Callback):
        """The policy's parameters when RL starts (after the supervised warm-up)."""

        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.params = {n: p.detach().float().cpu().clone() for n, p in module.policy.named_parameters()}

    args = fit_args(ctx)
    ctx.detail("args", args)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both args and sys.argv are given
    try:
        cli = main(args, run=False)  # the real entry point: parsed, checked and built
    finally:
        sys.argv = argv
    snap = Snapshot()
    cli.trainer.callbacks.append(snap)
    _, seconds = speed.timed(lambda: cli.trainer.fit(cli.model, datamodule=cli.datamodule), ctx.device)
    module, trainer = cli.model, cli.trainer
    got = (trainer.global_step, trainer.precision, next(module.policy.parameters()).device.type)
    want = (int(trainer.max_steps), "bf16-mixed", ctx.device.type)
    ctx.add("steps, precision, policy device", f"{', '.join(map(str, got))} ({seconds:.0f} s)",
            ", ".join(map(str, want)), PASS if got == want else FAIL)
    init = dict(AutoModelForCausalLM.from_pretrained(module._model_path).named_parameters())
    final = {n: p.detach().float().cpu() for n, p in module.policy.named_parameters()}
    dtypes = {p.dtype for p in module.policy.parameters()}
    moved_init = sum(not torch.equal(final[n], init[n].detach().float()) for n in final)
    moved_rl = sum(not torch.equal(final[n], snap.params[n]) for n in final)
    finite = all(bool(torch.isfinite(p).all()) for p in final.values())
    ok = moved_init == moved_rl == len(final) and finite and dtypes == {torch.float32}
    ctx.add("parameters changed: from init / during RL", f"{moved_init} / {moved_rl} of {len(final)}",
            "all, finite, fp32 master weights", PASS if ok else FAIL, min(moved_init, moved_rl) / len(final))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    ctx.detail("last_metrics", metrics)
    skipped = metrics.get("train/skipped_steps", math.nan)
    ctx.add("last step: reward/acc, val/acc, skipped steps", f"{metrics.get('reward/acc', math.nan):.3f}, "
            f"{metrics.get('val/acc', math.nan):.3f}, {skipped:.0f}", "skipped = 0", PASS if skipped == 0 else FAIL)
    ctx.shared["fit"] = SimpleNamespace(policy=module.policy, tokenizer=module.tokenizer, task=cli.datamodule.task,
                                        sampling=module.sampling)


def section_mismatch(ctx: Context) -> None:
    from reclight.engines import build_engine
    from reclight.engines.config import EngineConfig
    from reclight.models.forward import response_logprobs
    from reclight.models.tokens import encode_prompts

    fit = ctx.shared.pop("fit", None)
    if fit is None:
        ctx.add("the fit section's trained model", "missing (the fit section failed or did not run)", "", FAIL)
        return
    policy, tok = fit.policy, fit.tokenizer
    examples = fit.task.load("val")[:64]
    ids, mask = (t.to(ctx.device) for t in encode_prompts(tok, [e.prompt for e in examples], use_chat_template=False))
    for name in ("hf", "fast"):
        eng = build_engine(EngineConfig(name=name, dtype="bfloat16"), policy, tok, fit.sampling)
        gen = eng.generate(ids, mask, seed=0)
        with torch.no_grad():
            logp, _ = response_logprobs(policy, ids, mask, gen.response_ids.to(ctx.device),
                                        gen.response_mask.to(ctx.device), temperature=fit.sampling.temperature)
        d = (logp.cpu() - gen.logp_behav.cpu())[gen.response_mask.cpu()].abs()
        ctx.detail(name, {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "tokens": d.numel()})
        ctx.add(f"bf16 {name} engine vs fp32 trainer: mean / max abs dlogp",
                f"{float(d.mean()):.2e} / {float(d.max()):.2e}", f"measured over {d.numel()} tokens", INFO,
                float(d.mean()))
        del eng


def section_async(ctx: Context) -> None:
    """The asynchronous schedule on the device (docs/async.md): a short fit of the micro model with
    in-flight weight updates and re-prefill, fp32 (trainer and engine), and every trained token's
    ``logp_behav`` against the trainer's log-prob under the snapshot of the version that sampled it;
    then the same fit with a bf16 engine (on a GPU its KV cache is bf16 too), which must finish."""
    import lightning.pytorch as pl

    from reclight.clock import ClockConfig, ClockCosts
    from reclight.engines.base import SamplingConfig
    from reclight.engines.config import EngineConfig
    from reclight.models.forward import response_logprobs
    from reclight.models.tiny import TinyModelConfig
    from reclight.trainer.config import AlgorithmGroup, MonitorConfig, OptimConfig, PolicyConfig, TrainForwardConfig
    from reclight.trainer.data import RLDataModule
    from reclight.trainer.module import RLModule

    _tests_importable()
    from conftest import DigitTask

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.batches, self.weights = {}, {}

        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            self.batches[trainer.global_step] = batch
            self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}

    def fit(dtype: str | None, steps: int) -> tuple[Any, Record]:
        rec = Record()
        module = RLModule(
            policy=PolicyConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                                     max_positions=32), tiny_dir=str(ctx.tmp / "async-tiny")),
            algorithm=AlgorithmGroup(preset="rec_oneside_nois"), sampling=SamplingConfig(num_samples=4, max_new_tokens=6),
            clock=ClockConfig(enabled=True, max_inflight=4, weight_update="inflight", staleness="none",
                              recompute_kv_on_update=True, costs=ClockCosts(decode_a=1.0, decode_b=0.05, train_c=2.0,
                                                                           train_e=0.01)),
            engine=EngineConfig(name="fast", dtype=dtype), train_forward=TrainForwardConfig(impl="hf"),
            optim=OptimConfig(lr=3e-2), monitor=MonitorConfig(log_kl_init=False), warmup=None, seed=0)
        trainer = pl.Trainer(max_steps=steps, callbacks=[rec], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0, default_root_dir=str(ctx.tmp),
                             accelerator="gpu" if ctx.cuda else "cpu", devices=1, precision="32-true")
        trainer.fit(module, datamodule=RLDataModule(task=DigitTask(), prompts_per_step=2, eval_size=4, seed=0))
        return module, rec

    module, rec = fit(None, 5)
    worst, tokens, spanning = 0.0, 0, 0
    for batch in rec.batches.values():
        spanning += int((batch.token_version.amax(-1) > batch.token_version.amin(-1)).sum())
        for v in batch.token_version[batch.response_mask].unique().tolist():
            module.policy.load_state_dict(rec.weights[v])
            with torch.no_grad():
                logp, _ = response_logprobs(module.policy, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                            batch.response_mask, temperature=1.0)
            sel = batch.response_mask & (batch.token_version == v)
            worst = max(worst, float((batch.logp_behav[sel] - logp[sel]).abs().max()))
            tokens += int(sel.sum())
    ctx.detail("fp32", {"tokens": tokens, "samples_spanning_versions": spanning, "max_abs": worst})
    ctx.bound(f"fp32 logp_behav vs the trainer under each token's version ({tokens} tokens, "
              f"{spanning} samples span versions)", worst, 1e-4)
    module, _ = fit("bfloat16", 3)
    ok = module.global_step == 3
    ctx.add("bf16 engine (bf16 KV cache on a GPU): steps done", str(module.global_step), "3", PASS if ok else FAIL,
            float(module.global_step))


def section_workers(ctx: Context) -> None:
    """A rollout worker on the device (docs/async.md "Rollout workers"): the micro model's fit with
    in-flight updates, in-process and with ``model.rollout.workers: 1`` (paced): the batches and
    final weights must be bitwise equal, and the median step time of each is reported. Trainer and
    worker share the one GPU here, so the overlap that peers measure with separate generation and
    training GPUs (their 1.3-2.7x) does not transfer to this figure."""
    import statistics

    import lightning.pytorch as pl

    from reclight.clock import ClockConfig, ClockCosts
    from reclight.engines.base import SamplingConfig
    from reclight.engines.config import EngineConfig
    from reclight.models.tiny import TinyModelConfig
    from reclight.rollout.workers import WorkersConfig
    from reclight.trainer.config import AlgorithmGroup, MonitorConfig, OptimConfig, PolicyConfig, TrainForwardConfig
    from reclight.trainer.data import RLDataModule
    from reclight.trainer.module import RLModule

    _tests_importable()
    from conftest import DigitTask

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.batches, self.starts = {}, {}

        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            self.batches[trainer.global_step] = batch
            self.starts[trainer.global_step] = time.perf_counter()

    def fit(workers: int, steps: int, mode: str = "paced") -> tuple[Any, Record]:
        rec = Record()
        module = RLModule(
            policy=PolicyConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                                     max_positions=32), tiny_dir=str(ctx.tmp / "workers-tiny")),
            algorithm=AlgorithmGroup(preset="rec_oneside_nois"), sampling=SamplingConfig(num_samples=4, max_new_tokens=6),
            clock=ClockConfig(enabled=True, max_inflight=8, weight_update="inflight", staleness="pace", max_staleness=1,
                              recompute_kv_on_update=True, costs=ClockCosts(decode_a=1.0, decode_b=0.05, train_c=8.0,
                                                                           train_e=0.01)),
            rollout=WorkersConfig(workers=workers, mode=mode), engine=EngineConfig(name="fast"),
            train_forward=TrainForwardConfig(impl="hf"), optim=OptimConfig(lr=3e-2),
            monitor=MonitorConfig(log_kl_init=False), warmup=None, seed=0)
        trainer = pl.Trainer(max_steps=steps, callbacks=[rec], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0, default_root_dir=str(ctx.tmp / f"workers{workers}{mode}"),
                             accelerator="gpu" if ctx.cuda else "cpu", devices=1, precision="32-true")
        trainer.fit(module, datamodule=RLDataModule(task=DigitTask(), prompts_per_step=4, eval_size=4, seed=0))
        return module, rec

    steps = 4 if ctx.smoke else 12
    ref, rec_ref = fit(0, steps)
    run, rec = fit(1, steps)
    same = all(torch.equal(getattr(rec_ref.batches[s], f).cpu(), getattr(rec.batches[s], f).cpu())
               for s in rec_ref.batches for f in ("response_ids", "logp_behav", "token_version", "rewards"))
    same = same and all(torch.equal(p, q) for p, q in zip(ref.policy.parameters(), run.policy.parameters()))
    ctx.add("paced worker: batches and final weights bitwise the in-process run's", str(same), "True",
            PASS if same else FAIL, float(same))

    def median_step(r: Record) -> float:
        t = [r.starts[s + 1] - r.starts[s] for s in sorted(r.starts)[2:-1]]
        return statistics.median(t)

    free, rec_free = fit(1, steps, mode="free")  # the real clock decides: no reference, the rules must hold
    ok = sorted(rec_free.batches) == list(range(steps)) and all(
        int(b.token_version.max()) <= s and bool((b.token_version[..., 1:] >= b.token_version[..., :-1]).all())
        for s, b in rec_free.batches.items())
    ctx.add("free worker: every step trained, token versions <= the step and never decreasing", str(ok), "True",
            PASS if ok else FAIL, float(ok))
    a, b, c = median_step(rec_ref), median_step(rec), median_step(rec_free)
    ctx.detail("step_s", {"in_process": a, "worker": b, "free": c})
    ctx.add("median step time, in-process / one paced worker / one free worker (same GPU: no two-pool speedup "
            "expected)", f"{a * 1e3:.1f} ms / {b * 1e3:.1f} ms ({a / b:.2f}x) / {c * 1e3:.1f} ms ({a / c:.2f}x)")


def _model(ctx: Context, kind: str) -> torch.nn.Module:
    """The big model ``kind`` (built once, dropped by the section that names it in ``after``)."""
    models = ctx.shared.setdefault("models", {})
    if kind not in models:
        model, seconds = speed.timed(lambda: speed.build_model(kind, speed.SMOKE_MODEL if ctx.smoke else
                                                               speed.QWEN25_1P5B, ctx.device), ctx.device)
        models[kind] = model
        n = sum(p.numel() for p in model.parameters())
        sizes = "tiny sizes (smoke)" if ctx.smoke else "Qwen2.5-1.5B's sizes"
        why = "" if kind == "qwen2" else " (the fast engine and fused forward refuse Qwen2)"
        ctx.add(f"model: {type(model).__name__} of {sizes}", f"{n / 1e6:.1f} M parameters",
                f"random init, fp32, built in {seconds:.1f} s{why}", INFO, n)
    return models[kind]


def section_rollout(ctx: Context, kind: str, engine: str) -> None:
    r = speed.rollout_throughput(_model(ctx, kind), engine, ctx.shapes, ctx.device, ctx.time_left,
                                 ctx.shared.get("bandwidth"))
    ctx.detail(f"{engine}_{kind}", r)
    label = f"{engine} engine, {kind}, {r['prompts']}x{r['samples']}, {r['max_new_tokens']} new tokens"
    ctx.add(f"{label}: tokens/s", f"{r['tokens_per_s']:,.0f}", f"{r['tokens']} tokens in {r['seconds']:.1f} s "
            f"(prefill {r['prefill_seconds']:.2f} s)", INFO, r["tokens_per_s"])
    frac = r["bandwidth_frac"]
    ctx.add(f"{label}: bandwidth fraction", f"{frac:.1%}" if math.isfinite(frac) else "n/a",
            f"{r['decode_bytes_per_s'] / 1e9:,.0f} GB/s of needed reads / the copy rate", INFO, frac)
    if r["max_new_tokens"] < r["full_max_new_tokens"]:
        ctx.add(f"{engine} engine: full {r['full_max_new_tokens']}-token rollout",
                f"~{r['full_rollout_estimate_s']:.0f} s",
                f"estimate from the runs (T, decode s) {[(t, round(y, 1)) for t, y in r['runs']]}", INFO,
                r["full_rollout_estimate_s"])
    if r["note"]:
        ctx.add(f"{engine} engine: note", r["note"])


def section_train(ctx: Context, kind: str, impl: str) -> None:
    r = speed.train_throughput(_model(ctx, kind), impl, ctx.shapes, ctx.device, ctx.time_left,
                               ctx.shared.get("matmul_flops"))
    ctx.detail(f"{impl}_{kind}", r)
    label = f"impl={impl}, {kind}, {r['prompts']}x{r['samples']} seqs of {r['prompt_len']}+{r['resp_len']}"
    ctx.add(f"{label}: response tokens/s", f"{r['tokens_per_s']:,.0f}", f"one step {r['seconds']:.1f} s, "
            f"micro-batches of {r['micro_batch_prompts']} prompt", INFO, r["tokens_per_s"])
    frac = r["flops_frac"]
    ctx.add(f"{label}: model FLOP/s fraction", f"{frac:.1%}" if math.isfinite(frac) else "n/a",
            f"{r['flops_per_s'] / 1e12:.1f} TFLOP/s / the matmul rate", INFO, frac)
    peak = r["peak_gib"]
    ctx.add(f"{label}: peak memory", f"{peak:.1f} GiB" if math.isfinite(peak) else "n/a (CPU)",
            "max allocated in the step", INFO, peak)
    if r["prompts"] < r["full_prompts"]:
        ctx.add(f"impl={impl}: full {r['full_prompts']}-prompt step", f"~{r['full_step_estimate_s']:.0f} s",
                "estimate (scaled by prompts)", INFO, r["full_step_estimate_s"])
    if r["note"]:
        ctx.add(f"impl={impl}: note", r["note"])


@dataclass(frozen=True)
class Section:
    name: str
    fn: Callable[[Context], None]
    budget: float  # seconds at most, on the GPU at the paper's shapes
    least: float = 5.0  # seconds it needs to be worth starting (kept free by the sections before it)
    smoke_budget: float = 60.0
    after: tuple[str, ...] = ()  # the big models to drop once the section is done


SECTIONS = (
    Section("env", section_env, 15),
    Section("ceilings", section_ceilings, 20),
    Section("chunked", section_chunked, 25),
    Section("fused", section_fused, 25),
    Section("engines", section_engines, 20),
    Section("qwen2", section_qwen2, 15),
    Section("fit", section_fit, 80, least=30, smoke_budget=120),
    Section("mismatch", section_mismatch, 20),
    Section("async", section_async, 40),
    Section("workers", section_workers, 45),
    Section("compiled", section_compiled, 120, least=30),
    Section("rollout_hf", lambda ctx: section_rollout(ctx, "qwen2", "hf"), 65, least=20),
    Section("train_hf", lambda ctx: section_train(ctx, "qwen2", "hf"), 55, least=20, after=("qwen2",)),
    Section("rollout_fast", lambda ctx: section_rollout(ctx, "llama", "fast"), 65, least=20),
    Section("train_fused", lambda ctx: section_train(ctx, "llama", "fused"), 55, least=20, after=("llama",)),
)
DEFAULT_BUDGET_S = 400.0  # the whole run; python's start and imports come on top (~10 s)


_SIGNALS = {"in_section": False, "terminated": False}  # the handlers raise only inside a section


def _alarm(signum: int, frame: Any) -> None:
    if _SIGNALS["in_section"]:
        _SIGNALS["in_section"] = False
        raise SectionTimeout()


def _terminate(signum: int, frame: Any) -> None:
    _SIGNALS["terminated"] = True  # outside a section: the loop sees it and skips the rest
    if _SIGNALS["in_section"]:
        _SIGNALS["in_section"] = False
        raise Terminated()


def _stop_requested() -> bool:
    """Whether SIGTERM reached reclight's own handler instead (``reclight fit`` installs one for
    the length of a fit: a stop request that its generation loops honour)."""
    try:
        from reclight.engines.stop import stop_requested
    except ImportError:
        return False
    return stop_requested() is not None


SectionLog = list[tuple[str, float, str]]  # (name, seconds, outcome) per section run so far


def run_sections(ctx: Context, sections: list[Section], total_budget: float,
                 after_each: Callable[[SectionLog], Any] | None = None) -> SectionLog:
    """Run each section under its alarm (its budget, cut so that every later section keeps its
    ``least``; one left with less than its own ``least`` is skipped); a section that raises,
    overruns or is terminated (SIGTERM) gets a FAIL row and the run goes on (after SIGTERM: to the
    table). ``after_each(log)`` runs after every section. Returns (name, seconds, outcome) per
    section."""
    deadline = time.monotonic() + total_budget
    log = []
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, _terminate)
    _SIGNALS.update(in_section=False, terminated=False)
    for i, sec in enumerate(sections):
        ctx.section = sec.name
        reserve = 0.0 if ctx.smoke else sum(later.least for later in sections[i + 1:])
        budget = min(sec.smoke_budget if ctx.smoke else sec.budget, deadline - time.monotonic() - reserve)
        start = time.monotonic()
        if _SIGNALS["terminated"] or budget < (1.0 if ctx.smoke else sec.least):
            why = "skipped: terminated" if _SIGNALS["terminated"] else "skipped: out of time"
            ctx.add("(section)", "not run", "", why)
            log.append((sec.name, 0.0, "skipped"))
            continue
        ctx.section_end = start + budget
        outcome = "ok"
        try:
            _SIGNALS["in_section"] = True
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, budget)
            sec.fn(ctx)
        except SectionTimeout:
            ctx.add("(section)", f"over its budget of {budget:.0f} s", "", FAIL)
            outcome = "timeout"
        except Terminated:
            ctx.add("(section)", "terminated (outer timeout)", "", FAIL)
            outcome = "terminated"
        except (Exception, SystemExit) as e:  # noqa: BLE001 - one failing section must not cost the others
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")
            ctx.add("(section)", msg[:160], "", FAIL)
            ctx.detail("traceback", traceback.format_exc())
            outcome = "error"
        finally:
            _SIGNALS["in_section"] = False
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        for kind in sec.after:
            ctx.shared.get("models", {}).pop(kind, None)
        speed.free_memory()
        if _stop_requested():
            _SIGNALS["terminated"] = True
        seconds = time.monotonic() - start
        log.append((sec.name, seconds, outcome))
        print(f"[gpu_check] {sec.name}: {outcome}, {seconds:.1f} s (budget {budget:.0f} s)", flush=True)
        if after_each is not None:
            after_each(log)
    return log


def format_table(rows: list[Row], times: dict[str, float]) -> str:
    head = ("section", "s", "check", "result", "criterion", "status")
    lines, last = [], None
    for r in rows:
        first = r.section != last
        last = r.section
        lines.append((r.section if first else "", f"{times.get(r.section, 0):.0f}" if first else "", r.check,
                      r.result, r.criterion, r.status))
    widths = [max(len(head[i]), *(len(line[i]) for line in lines)) if lines else len(head[i]) for i in range(6)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    out = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([*out, *(fmt.format(*line) for line in lines)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device (CPU: about a minute)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"total seconds (default {DEFAULT_BUDGET_S:.0f}; --smoke 600)")
    parser.add_argument("--sections", nargs="+", choices=[s.name for s in SECTIONS], default=None,
                        help="run only these sections (in the usual order)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA device here; accepted: a CUDA machine, or --smoke (tiny shapes on the CPU)",
              file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sections = [s for s in SECTIONS if args.sections is None or s.name in args.sections]
    budget = args.budget or (600.0 if args.smoke else DEFAULT_BUDGET_S)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = Context(device=torch.device("cuda" if cuda else "cpu"), smoke=args.smoke, tmp=Path(tmp))

        def write(log: SectionLog, final: bool = False) -> tuple[str, str, int]:
            """The summary line and the table; also written to ``--out`` after every section, so
            a run killed later still leaves what it measured."""
            counts = {k: sum(r.status.startswith(k) for r in ctx.rows) for k in (PASS, FAIL, "skipped")}
            summary = (f"gpu_check{' --smoke' if args.smoke else ''} on {ctx.device.type}: {counts[PASS]} pass, "
                       f"{counts[FAIL]} FAIL, {counts['skipped']} skipped, {time.monotonic() - start:.0f} s"
                       + ("" if final else f" (partial: after section {log[-1][0]})"))
            table = format_table(ctx.rows, {name: seconds for name, seconds, _ in log})
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "gpu_check.json").write_text(json.dumps(
                    {"summary": summary, "smoke": args.smoke, "device": ctx.device.type, "final": final,
                     "seconds": time.monotonic() - start,
                     "sections": [{"name": n, "seconds": t, "outcome": o} for n, t, o in log],
                     "rows": [asdict(r) for r in ctx.rows], "details": ctx.details}, indent=1, default=str))
                (args.out / "gpu_check.md").write_text(f"{summary}\n\n{table}\n")
            return summary, table, counts[FAIL]

        log = run_sections(ctx, sections, budget, after_each=write)
        summary, table, failed = write(log, final=True)
    print(f"\n{summary}\n{table}", flush=True)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
