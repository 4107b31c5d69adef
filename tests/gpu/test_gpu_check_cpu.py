"""The GPU check on the CPU: its ``--smoke`` run end to end (so the script cannot rot before a GPU
session spends its one device call on it), its runner's failure handling, its counting formulas,
and the CPU-side regression of the GPU bug it was written to catch."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_exact as exact  # noqa: E402
import gpu_check_speed as speed  # noqa: E402


@pytest.mark.slow
def test_smoke_run_covers_every_section_and_prints_the_table_last(tmp_path):
    """``gpu_check.py --smoke`` with CUDA hidden: exit status 0, the table is the last thing
    printed, every section ran, the Triton section says "skipped: no CUDA", nothing FAILed, and
    the figures are real: exactness within its bounds, every parameter moved in the fit, positive
    throughput and finite limit fractions."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.rstrip().splitlines()
    assert last[-1].startswith("| ") and any(line.startswith("| section ") for line in last[-60:])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in report["sections"]] == [s.name for s in gpu_check.SECTIONS]
    assert {s["outcome"] for s in report["sections"]} == {"ok"}
    rows = report["rows"]
    assert not [r for r in rows if r["status"] == gpu_check.FAIL]
    assert {r["status"] for r in rows if r["section"] == "compiled"} == {gpu_check.NO_CUDA}
    by_check = {(r["section"], r["check"]): r for r in rows}
    assert sum(r["status"] == gpu_check.PASS for r in rows) >= 14
    exactness = [r for r in rows if r["section"] in ("chunked", "fused", "engines") and r["status"] != gpu_check.INFO]
    assert len(exactness) == 12
    for r in exactness:  # inside its bound (pass), and a real comparison: float rounding is visible
        assert r["status"] == gpu_check.PASS and 0 < r["value"] < math.inf, r
    moved = by_check[("fit", "parameters changed: from init / during RL")]
    assert moved["value"] == 1.0 and moved["status"] == gpu_check.PASS
    for section in ("rollout_hf", "rollout_fast", "train_hf", "train_fused"):
        figures = [r for r in rows if r["section"] == section and r["check"].endswith(("tokens/s", "fraction"))]
        assert len(figures) == 2, section
        for r in figures:
            assert r["value"] > 0 and math.isfinite(r["value"]), (section, r)
    assert (tmp_path / "gpu_check.md").read_text().startswith(report["summary"])


def test_a_failing_or_overrunning_section_is_recorded_and_the_run_goes_on(tmp_path):
    """A section that raises (even SystemExit, as jsonargparse does) or overruns its budget gets a
    FAIL row naming the error; the sections after it still run."""
    def boom(ctx):
        ctx.add("partial", "1", status=gpu_check.PASS)
        raise ValueError("boom")

    def exits(ctx):
        raise SystemExit(2)

    def sleeper(ctx):
        while True:
            time.sleep(0.01)

    def fine(ctx):
        ctx.bound("figure", 0.5, 1.0)

    sections = [gpu_check.Section("a", boom, 10), gpu_check.Section("b", exits, 10),
                gpu_check.Section("c", sleeper, 10, smoke_budget=1.2), gpu_check.Section("d", fine, 10)]
    ctx = gpu_check.Context(device=torch.device("cpu"), smoke=True, tmp=tmp_path)
    log = gpu_check.run_sections(ctx, sections, total_budget=60)
    assert [outcome for _, _, outcome in log] == ["error", "error", "timeout", "ok"]
    rows = [(r.section, r.result, r.status) for r in ctx.rows]
    assert rows == [("a", "1", "pass"), ("a", "ValueError: boom", "FAIL"), ("b", "SystemExit: 2", "FAIL"),
                    ("c", "over its budget of 1 s", "FAIL"), ("d", "5.00e-01", "pass")]
    assert log[2][1] < 5  # the alarm stopped the endless section near its 1.2 s budget


def test_sections_are_cut_to_the_deadline_keeping_time_for_later_ones(tmp_path):
    """Not smoke: a section's budget is cut so that every later section keeps its ``least``
    seconds, and a section left with less than its own ``least`` is skipped, not started."""
    def fine(ctx):
        ctx.add("budget", f"{ctx.time_left():.1f}")

    sections = [gpu_check.Section("a", fine, 100, least=1), gpu_check.Section("b", fine, 100, least=3)]
    ctx = gpu_check.Context(device=torch.device("cpu"), smoke=False, tmp=tmp_path)
    gpu_check.run_sections(ctx, sections, total_budget=5)
    a, b = (float(r.result) for r in ctx.rows)
    assert 1.5 < a <= 2.0 and 4.0 < b <= 5.0  # a: 5 - 3 kept for b; b: what is left
    ctx = gpu_check.Context(device=torch.device("cpu"), smoke=False, tmp=tmp_path)
    gpu_check.run_sections(ctx, sections, total_budget=2)
    assert [r.status for r in ctx.rows] == ["skipped: out of time"] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_only_smoke_is_accepted(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device here; accepted: a CUDA machine, or --smoke" in capsys.readouterr().err


def test_decode_bytes_hand_count():
    """Two sequences of response lengths 3 and 1 after a prompt of 2 slots, weights 10 bytes, a KV
    slot 1 byte: step 1 reads the weights and 2 + 1 slots of the one running sequence, step 2 the
    weights and 2 + 2 slots of it: 10 + 3 + 10 + 4 = 27 bytes (the finished one reads nothing)."""
    assert speed.decode_bytes(10, 1, 2, torch.tensor([[3, 1]])) == 27


def test_decode_model_recovers_exact_costs_and_sizes_the_rollout():
    """HF engine, P = 10, per-step cost 0.01 s + 0.001 s per cached slot: time(T) = 0.01 (T - 1) +
    0.001 ((T - 1) P + T (T - 1) / 2), so T = 17 takes 0.16 + 0.296 = 0.456 s and T = 65 takes
    0.64 + 2.72 = 3.36 s; two such runs give back (a, b) = (0.01, 0.001). With 3.36 s the largest
    T on the grid 1024 - 16 k is 64 (3.276 s; 80 would take 4.74 s). One run alone puts all its
    time on b (pessimistic), and a noisy fit with b < 0 falls back to that."""
    a, b = speed.decode_model("hf", 10, [(17, 0.456), (65, 3.36)])
    assert a == pytest.approx(0.01, abs=1e-12) and b == pytest.approx(0.001, abs=1e-12)
    assert speed.rollout_tokens((a, b), "hf", 10, 3.36, 1024, 17) == 64
    assert speed.decode_model("hf", 10, [(65, 3.36)]) == (0.0, pytest.approx(3.36 / 2720))
    assert speed.decode_model("hf", 10, [(17, 1.0), (65, 3.36)]) == (0.0, pytest.approx(3.36 / 2720))
    # The fast engine attends over all P + T slots at every step: work (T - 1)(P + T).
    assert speed.decode_model("fast", 10, [(17, 16 * 27 * 1e-3)]) == (0.0, pytest.approx(1e-3))


def test_train_flops_matches_the_matmuls_torch_counts():
    """The decoder part of :func:`train_flops` against torch's FLOP counter on a real forward (one
    sequence of S = 9 tokens, eager attention, GQA): the counter sees every projection and both
    attention products over the full S x S square (eager attention masks after multiplying),
    where the formula counts the causal triangle S (S + 1) / 2; the LM head adds 2 h V per
    response token to the forward, and training is 3x the forward."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    S, L, H, D = 9, 2, 4, 8
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model(input_ids=torch.randint(0, 50, (1, S)))
    counted = counter.get_total_flops()
    square, triangle = 4 * L * H * D * S * S, 4 * L * H * D * S * (S + 1) / 2
    assert speed.train_flops(cfg, 1, S, 0) == 3 * (counted - square + triangle)
    assert speed.train_flops(cfg, 2, 4, 5) - speed.train_flops(cfg, 2, 9, 0) == 3 * 2 * (2 * 32 * 50 * 5)


def test_chunked_logprobs_fp32_within_1e5_of_float64_at_a_real_vocabulary():
    """At V = 151,936 (Qwen2's vocabulary) the fp32 chunked log-probs, entropies and gradients are
    within rtol = atol = 1e-5 of float64 arithmetic on the same inputs: why the GPU check judges
    them against float64 there (the fp32 naive path, its reference at small V, is itself further
    off at this vocabulary on this CPU)."""
    r = exact.chunked_logprobs_fp32(torch.device("cpu"), n=64, h=64, v=151936, chunk=24)
    for name, ratio in r["chunked_vs_float64"].items():
        assert 0 < ratio <= 1.0, (name, r)


def test_fast_engine_with_a_bf16_kv_cache_samples_close_to_the_fp32_policy(tmp_path):
    """Regression of a GPU-only bug, emulated on the CPU: on CUDA a bf16 fast engine keeps its KV
    cache in bf16 (on a CPU it stays fp32), and its attention multiplied fp32 probabilities by
    bf16 values, which torch refuses ("expected m1 and m2 to have the same dtype"). With the cache
    forced to bf16 the engine samples, and logp_behav stays within bf16 rounding of the fp32
    policy's logp (mean |diff| < 0.02 nats, max < 0.1, the CPU bf16 test's bounds)."""
    from reclight.engines.base import SamplingConfig
    from reclight.engines.fast import FastLlamaEngine
    from reclight.models.forward import response_logprobs
    from reclight.models.tokens import encode_prompts

    model, tok = exact.small_llama(torch.device("cpu"), num_key_value_heads=2, attention_bias=True)
    eng = FastLlamaEngine(model, tok, SamplingConfig(num_samples=3, max_new_tokens=6), dtype="bfloat16")
    eng.cache_dtype = torch.bfloat16  # what __init__ picks on a CUDA device
    ids, mask = encode_prompts(tok, exact.PROMPTS)
    gen = eng.generate(ids, mask, seed=0)
    assert eng._local.kv[0][0].dtype == torch.bfloat16 and gen.logp_behav.dtype == torch.float32
    logp, _ = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask)
    diff = (logp - gen.logp_behav)[gen.response_mask].abs()
    assert gen.response_mask.sum() > 20 and 0 < diff.mean() < 0.02 and diff.max() < 0.1
    fp32 = FastLlamaEngine(model, tok, SamplingConfig(num_samples=3, max_new_tokens=6))
    gen32 = fp32.generate(ids, mask, seed=0)
    logp32, _ = response_logprobs(model, ids, mask, gen32.response_ids, gen32.response_mask)
    assert_close(gen32.logp_behav, logp32, rtol=0, atol=1e-5)  # the fp32 cache path is unchanged: exact
