"""The matrix-product floor of one RL step at the RL-step benchmark's shapes, on this CPU (issue #26).

How fast can one step of ``benchmarks/rl_step_bench.py`` get on this machine? Nearly all of its
arithmetic is matrix products, so this script records every matrix product one step makes (each
``mm``/``addmm``/``bmm``/``baddbmm`` call that reaches torch's dispatcher, and ``linear``/``matmul``
whole where inference mode hands them over undivided, with shapes and memory layouts), times each
distinct call alone on this CPU at ``--threads`` intra-op threads (median of ``--repeats``, after a
warm-up, operands hot in cache) and sums count x time. That sum is what the step would take if
every product ran as fast as it does alone and everything else (element-wise ops, sampling,
Python, autograd's bookkeeping) were free: a floor, not a forecast.

Two steps are recorded, generation and training pass apart, each doing the same work:

- ``reclight``: the fast engine's rollout (prompt prefilled once per group, finished rows dropped
  from the batch, eager) and the fused training pass (each prompt once for its K samples, padding
  skipped) with a policy-gradient loss and its backward;
- ``hf``: the work a step of TRL's ``GRPOTrainer`` does on a CPU: HF ``generate`` with
  ``num_return_sequences=K`` and the model's own forward over the ``B * K`` padded sequences,
  then its backward.

Each is also timed whole (median of ``--repeats``, the two interleaved), so the printout says
how much of each part's time its matrix products account for. The optimizer step and the rest of
a trainer's loop are left out (a few ms at these shapes: the benchmark's per-part table).

Last, what 2x a step leaves to everything that is not a matrix product: 2x the ``hf`` step timed
in the same run (same machine conditions, so the figure holds on a noisy machine), and with
``--vs-json`` (a results file of ``rl_step_bench.py``) 2x its first arm's step, the issue's target.

Usage::

    python benchmarks/step_floor.py --threads 2 \
        --vs-json benchmarks/results/rl_step_3m_avx2_fp32_interleaved.json
    python benchmarks/step_floor.py --threads 2 --max-new-tokens 128 \
        --vs-json benchmarks/results/rl_step_3m_t128_avx2_fp32_interleaved.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# In inference mode (the engines' decoding) ``linear`` and ``matmul`` reach the dispatcher whole;
# with autograd they arrive as the products below.
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul"}


def _describe(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), tuple(a.stride()), a.dtype)
    return a


def _is_tensor(d: Any) -> bool:  # a _describe'd tensor
    return isinstance(d, tuple) and bool(d) and d[0] == "tensor"


class MatmulRecorder(TorchDispatchMode):
    """Counts each distinct matrix-product call (op, operand shapes, strides, dtypes, scalars)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in _MATMULS:
            self.calls[(func, tuple(_describe(a) for a in args), tuple(sorted(kwargs.items())))] += 1
        return func(*args, **kwargs)


def _flops(func: Any, ops: list, out: torch.Tensor) -> int:
    """2 x output elements x the contracted size."""
    a = ops[1] if func.overloadpacket.__name__ in ("addmm", "baddbmm") else ops[0]
    return 2 * out.numel() * a.shape[-1]


def _operand(d: Any) -> Any:
    if not _is_tensor(d):
        return d
    _, shape, stride, dtype = d
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    return torch.randn(size, dtype=dtype).as_strided(shape, stride)  # the recorded layout (transposed views)


def time_calls(calls: Counter, repeats: int) -> tuple[float, int, list[tuple[float, int, str]]]:
    """(seconds of all recorded calls at their lone speed, FLOPs, the costliest call kinds)."""
    total, flops, rows = 0.0, 0, []
    for (func, args, kwargs), count in calls.items():
        ops = [_operand(a) for a in args]
        kw = dict(kwargs)
        for _ in range(3):
            out = func(*ops, **kw)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            func(*ops, **kw)
            times.append(time.perf_counter() - start)
        t = statistics.median(times)
        f = _flops(func, ops, out)
        total += count * t
        flops += count * f
        shapes = " x ".join(str(list(a[1])) for a in args if _is_tensor(a))
        rows.append((count * t, count, f"{func.overloadpacket.__name__} {shapes}: {f / t / 1e9:.0f} GFLOP/s alone"))
    rows.sort(reverse=True)
    return total, flops, rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=8, help="B")
    p.add_argument("--num-samples", type=int, default=8, help="K")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (the benchmark's --threads)")
    p.add_argument("--repeats", type=int, default=9, help="timings of each call and of each whole step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=6, help="costliest call kinds listed per step")
    p.add_argument("--vs-json", default=None, help="an rl_step_bench.py results file: 2x its first arm is the target")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import GenerationConfig

    from reclight.engines.base import SamplingConfig
    from reclight.engines.fast import FastLlamaEngine
    from reclight.models.forward import response_logprobs
    from reclight.models.loading import load_causal_lm
    from reclight.models.tiny import TinyModelConfig, build_tiny
    from reclight.models.tokens import encode_prompts

    # the benchmark's model and its step-0 prompts (rl_step_bench.py's own construction)
    cfg = TinyModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=max(1, args.hidden // 32),
                          intermediate_size=args.intermediate, max_positions=max(64, 8 + args.max_new_tokens))
    folder = build_tiny(tempfile.mkdtemp(prefix="step_floor-"), cfg, seed=args.seed)
    model, tok = load_causal_lm(str(folder))
    from rl_step_bench import make_prompts  # a sibling script: this folder is on sys.path

    prompts, _ = make_prompts(1, args.prompts_per_step, args.seed)
    ids, mask = encode_prompts(tok, prompts[0])
    B, K, T = args.prompts_per_step, args.num_samples, args.max_new_tokens
    sampling = SamplingConfig(num_samples=K, temperature=1.0, top_p=1.0, max_new_tokens=T)
    engine = FastLlamaEngine(model, tok, sampling)
    gen_cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=T,
                               num_return_sequences=K, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    def train(response_ids: torch.Tensor, response_mask: torch.Tensor, impl: str) -> None:
        model.zero_grad(set_to_none=True)
        logp, _ = response_logprobs(model, ids, mask, response_ids, response_mask, impl=impl)
        adv = torch.linspace(-1, 1, B * K).view(B, K, 1)  # any non-zero advantages: the work is the same
        (-(logp * adv * response_mask).sum() / response_mask.sum().clamp(min=1)).backward()

    def generate_reclight(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = engine.generate(ids, mask, seed=seed)
        return g.response_ids, g.response_mask

    def generate_hf(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        resp = out[:, ids.shape[1]:]
        eos = resp == tok.eos_token_id
        real = (eos.long().cumsum(-1) - eos.long()) == 0  # up to and including the first EOS
        return resp.reshape(B, K, -1), real.reshape(B, K, -1)

    steps = {"reclight": (generate_reclight, "fused"), "hf": (generate_hf, "hf")}
    phases = ("generate", "train")
    for gen_fn, impl in steps.values():  # warm-up (allocator, thread pool)
        train(*gen_fn(10_000), impl)
    walls = {(name, ph): [] for name in steps for ph in phases}
    tokens: dict[str, list[int]] = {name: [] for name in steps}
    for r in range(args.repeats):  # whole steps, interleaved
        for name, (gen_fn, impl) in steps.items():
            start = time.perf_counter()
            resp, real = gen_fn(r)
            mid = time.perf_counter()
            train(resp, real, impl)
            walls[name, "generate"].append(mid - start)
            walls[name, "train"].append(time.perf_counter() - mid)
            tokens[name].append(int(real.sum()))
    floors = {}
    for name, (gen_fn, impl) in steps.items():
        recs = {ph: MatmulRecorder() for ph in phases}
        with recs["generate"]:
            resp, real = gen_fn(0)
        with recs["train"]:
            train(resp, real, impl)
        for ph in phases:
            floors[name, ph] = time_calls(recs[ph].calls, args.repeats)

    print(f"# one RL step's matrix products, each timed alone: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-"
          f"parameter Llama (h{args.hidden} l{args.layers} i{args.intermediate}), B={B} x K={K}, "
          f"max_new_tokens={T}, {args.threads} intra-op thread(s), fp32, eager\n")
    print("| step | part | matmul GFLOP | matmul floor, s | measured, s (median) | floor / measured |")
    print("|---|---|---|---|---|---|")
    for name in steps:
        for ph in (*phases, "step"):
            parts = phases if ph == "step" else (ph,)
            floor = sum(floors[name, q][0] for q in parts)
            flops = sum(floors[name, q][1] for q in parts)
            wall = sum(statistics.median(walls[name, q]) for q in parts)
            bold = "**" if ph == "step" else ""
            print(f"| {name} | {bold}{ph}{bold} | {flops / 1e9:.1f} | {floor:.3f} | {wall:.3f} | {floor / wall:.0%} |")
    print("\nresponse tokens a step (median): " + ", ".join(f"{n} {statistics.median(t):.0f}" for n, t in tokens.items()))
    for name in steps:
        for ph in phases:
            print(f"\n{name}, {ph}: the costliest call kinds (count x lone time)")
            for seconds, count, label in floors[name, ph][2][: args.top]:
                print(f"- {seconds:.3f} s, {count} calls, {label}")
    floor = floors["reclight", "generate"][0] + floors["reclight", "train"][0]
    hf_step = sum(statistics.median(walls["hf", ph]) for ph in phases)
    targets = [(f"the hf step measured above ({hf_step:.3f} s)", hf_step / 2)]
    if args.vs_json:
        with open(args.vs_json) as f:
            first = json.load(f)["summary"][0]
        targets.append((f"`{first['arm']}` ({first['median_s']:.3f} s/step in {args.vs_json})", first["median_s"] / 2))
    print()
    for label, target in targets:
        print(f"- 2x {label} is {target:.3f} s/step: reclight's matrix products alone take {floor:.3f} s of it, "
              f"{floor / target:.0%}; the rest of the step (element-wise ops, sampling, autograd, optimizer, the "
              f"loop) would have to fit in {target - floor:.3f} s.")


if __name__ == "__main__":
    main()
