"""The CUDA variants of the exactness tests (marker ``gpu``; each is skipped without CUDA).

The comparisons are those of the CPU suite (``tests/kernels/test_logprobs.py``,
``tests/kernels/test_fused_forward.py``, ``tests/rollout/test_engine_fast.py``) run on a CUDA
device through ``benchmarks/gpu_check_exact.py``, the same functions the GPU check reports from,
so the table and these assertions cannot drift apart. Tolerances:

- fp32 results: rtol = atol = 1e-5 (log-probs, entropies, LM-head gradients), and for parameter
  gradients through a whole forward rtol 1e-4 / atol 1e-5, as on the CPU. TF32 must be off (the
  torch default): a TF32 matmul lands near 3e-4 relative and fails these bounds, as it should.
- bf16 inputs: against float64 arithmetic on the same bf16 values by relative error,
  ``||out - ref|| / ||ref||``: outputs computed in fp32 (logp, entropy) <= 1e-5, gradients
  returned in bf16 (one rounding: ~2e-3) <= 1e-2.
- engines: ``logp_behav`` vs the trainer's logp of the same tokens: fp32 fast engine 1e-5
  (its own decoder), fp32 HF engine 1e-4 (HF's attention kernel on B * K rows); a bf16 engine
  (bf16 weights AND, on CUDA, a bf16 KV cache) within bf16 rounding of the fp32 policy: mean
  |diff| < 0.02 nats, max < 0.1 (the CPU bf16 test's bounds).
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check_exact as exact  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU suite runs the same comparisons on the CPU)")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("chunk", [1, 5, 16, 0])
def test_chunked_logprobs_match_naive_fp32_cuda(chunk):
    """The CPU suite's shape (N = 37, V = 211; chunks of 1, 5, 16 or one chunk), temperature 0.7:
    logp, entropy and dL/d(hidden, weight, bias) of L = sum g_i logp_i + e_i ent_i agree with the
    full-logits path to rtol = atol = 1e-5."""
    ratios = exact.chunked_logprobs_fp32(CUDA, n=37, h=24, v=211, chunk=chunk)["chunked_vs_naive"]
    assert set(ratios) == set(exact.LM_HEAD_NAMES)
    for name, r in ratios.items():
        assert r <= 1.0, (name, ratios)


@pytest.mark.parametrize("seed", [0, 3])
def test_chunked_logprobs_match_float64_at_a_real_vocabulary_cuda(seed):
    """Qwen2.5-0.5B's LM head (V = 151,936, H = 896), N = 1500 tokens in chunks of 512 (not a
    divisor): the fp32 chunked values and gradients are within rtol = atol = 1e-5 of float64
    arithmetic on the same inputs (the reference here is float64: the fp32 naive path is itself
    off by more than 1e-5 at this vocabulary on a CPU, see gpu_check_exact)."""
    ratios = exact.chunked_logprobs_fp32(CUDA, seed=seed)["chunked_vs_float64"]
    for name, r in ratios.items():
        assert r <= 1.0, (name, ratios)


def test_chunked_logprobs_bf16_against_float64_cuda():
    """bf16 hidden/weight/bias: logp and entropy (fp32 arithmetic on the upcast values) within
    1e-5 relative of float64 on the same values; the gradients, returned in bf16, within 1e-2
    and above 1e-4 (the bf16 rounding is really there, so the check sees real bf16 outputs)."""
    err = exact.chunked_logprobs_bf16(CUDA)
    assert err["logp"] <= 1e-5 and err["entropy"] <= 1e-5, err
    assert err["grad_dtype_bf16"] == 1.0
    for name in exact.LM_HEAD_NAMES[2:]:
        assert 1e-4 < err[name] <= 1e-2, (name, err)


@pytest.mark.parametrize("overrides", [
    {},  # GQA + attention and MLP biases (the function's default)
    {"tie_word_embeddings": True},
    {"num_key_value_heads": 4},
], ids=["gqa_biases", "tied", "plain"])
def test_fused_forward_matches_hf_fp32_cuda(overrides):
    """The fused training forward vs HF's on CUDA in fp32: log-probs and entropies to 1e-5, every
    parameter's gradient to rtol 1e-4 / atol 1e-5, and every gradient non-zero (so each
    parameter's comparison means something)."""
    r = exact.fused_forward_fp32(CUDA, **overrides)
    assert r["logp_max_abs"] <= 1e-5 and r["entropy_max_abs"] <= 1e-5, r
    assert r["grad_tol_ratio"] <= 1.0 and r["grad_min_max_abs"] > 0, r


def test_fused_forward_bf16_autocast_cuda():
    """Under CUDA bf16 autocast (HF eager attention as the reference): log-probs within 3e-2 of
    HF's, and the gradient error against fp32 no worse than 1.5x HF eager's own, which is visible
    and small (1e-4 < err < 0.05)."""
    r = exact.fused_forward_bf16(CUDA)
    assert r["logp_max_abs"] <= 3e-2, r
    assert 1e-4 < r["grad_rel_err_hf"] < 0.05, r
    assert r["grad_rel_err_fused"] <= 1.5 * r["grad_rel_err_hf"], r


def test_compiled_fused_forward_matches_hf_fp32_cuda():
    """``train_forward: {impl: fused, compile: true}`` through Triton: the same bounds as the
    eager fused forward (GQA + biases)."""
    r = exact.fused_forward_fp32(CUDA, compile_pointwise=True)
    assert r["logp_max_abs"] <= 1e-5 and r["entropy_max_abs"] <= 1e-5, r
    assert r["grad_tol_ratio"] <= 1.0 and r["grad_min_max_abs"] > 0, r


@pytest.mark.parametrize(("engine", "compile_decode", "limit"), [
    ("fast", False, 1e-5), ("fast", True, 1e-5), ("hf", False, 1e-4)], ids=["fast", "fast_compiled", "hf"])
def test_engine_logp_behav_equals_trainer_logp_fp32_cuda(engine, compile_decode, limit):
    """fp32 engine on CUDA (the fast one eager and with its decoding step compiled through
    Triton): ``logp_behav`` equals the trainer's logp of the sampled tokens over two rollouts of
    different prompt lengths, with the fast engine's batch compacted several times."""
    r = exact.engine_logp_error(CUDA, engine, compile_decode=compile_decode)
    assert r["tokens"] > 40, r  # enough sampled tokens for the max to mean something
    assert r["max_abs"] <= limit, r


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_bf16_engine_close_to_fp32_trainer_cuda(engine):
    """A bf16 engine on CUDA (the fast engine then also keeps its KV cache in bf16, which it
    never does on a CPU) against the fp32 trainer: mean |diff| < 0.02 nats, max < 0.1."""
    r = exact.engine_logp_error(CUDA, engine, dtype="bfloat16")
    assert r["mean_abs"] < 0.02 and r["max_abs"] < 0.1, r


@pytest.mark.slow
def test_fit_embedded_default_bf16_mixed_cuda(tmp_path):
    """``reclight fit`` (the embedded default) through the real CLI on CUDA with bf16-mixed for 20
    steps: ends at step 20 on the GPU, no step skipped, and every parameter moved both from its
    initial value and during the RL steps (after the supervised warm-up), staying fp32."""
    import gpu_check

    ctx = gpu_check.Context(device=CUDA, smoke=False, tmp=tmp_path)
    ctx.section = "fit"
    gpu_check.section_fit(ctx)
    statuses = {row.check: row.status for row in ctx.rows}
    assert set(statuses.values()) == {gpu_check.PASS}, [(r.check, r.result, r.status) for r in ctx.rows]
    moved = next(r for r in ctx.rows if r.check.startswith("parameters changed"))
    assert moved.value == 1.0
