"""A decoding step's attention products on the CPU, by number of cache slots (issue #26).

At one query token per row, the fast engine's attention is two batched products per row and
head: ``q [1, D] @ k^T [D, S]`` and ``p [1, S] @ v [S, D]``. torch's CPU ``bmm`` sends a product
of fewer than 400 multiply-adds per batch item (``S * D`` here) to a plain element loop instead of
the BLAS (ATen, ``LinearAlgebra.cpp``, ``bmm_out_or_baddbmm_``). At the main job's shapes (1024
rows x heads, head size 32, a 6-token prompt plus 5 new tokens: S = 11) that loop is the slow side.
This script times both products for a range of S at one intra-op thread, so the threshold and the
gain of padding the cache past it (:func:`reclight.engines.fast.min_cache_slots`) can be read on
any CPU.

``--rollout`` times whole rollouts of the main job instead (the embedded model, 32 prompts x 8
samples, 5 new tokens, one thread): the fast engine with its padded cache against the same engine
with ``min_slots = 0`` (interleaved), the scoring of a rollout, and ``torch.profiler``'s top ops
of the unpadded engine (where the time went before).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/decode_attention.py
    OMP_NUM_THREADS=1 python benchmarks/decode_attention.py --rows 512 --head-dim 64 --slots 4 6 7 8 16
    OMP_NUM_THREADS=1 python benchmarks/decode_attention.py --rollout
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def rollouts(repeats: int) -> None:
    import tempfile

    from reclight.engines.base import SamplingConfig
    from reclight.engines.fast import FastLlamaEngine
    from reclight.models.loading import load_causal_lm
    from reclight.models.tiny import TinyModelConfig, build_tiny
    from reclight.models.tokens import encode_prompts
    from reclight.rollout.scoring import score
    from reclight.tasks.arithmetic import Arithmetic

    # the embedded model (TinyModelConfig's defaults are configs/arithmetic.yaml's shape)
    folder = build_tiny(tempfile.mkdtemp(prefix="decode_attention-"), TinyModelConfig(), seed=0)
    model, tok = load_causal_lm(str(folder))
    task = Arithmetic(digits=2)
    examples = list(task.examples("train"))[:32]
    ids, mask = encode_prompts(tok, [e.prompt for e in examples])
    sampling = SamplingConfig(num_samples=8, temperature=1.0, top_p=1.0, max_new_tokens=5)
    engines = {"padded": FastLlamaEngine(model, tok, sampling), "unpadded": FastLlamaEngine(model, tok, sampling)}
    engines["unpadded"].min_slots = 0
    times: dict[str, list[float]] = {name: [] for name in engines}
    for seed in range(repeats):  # interleaved
        for name, engine in engines.items():
            start = time.perf_counter()
            gen = engine.generate(ids, mask, seed=seed)
            times[name].append(time.perf_counter() - start)
    scoring = median_us(lambda: score(task, tok, gen.response_ids, gen.response_mask, examples), repeats)
    print(f"# the main job's rollout: 32 prompts x 8 samples, a {ids.shape[1]}-token prompt, 5 new tokens; "
          f"{torch.get_num_threads()} intra-op thread(s)\n")
    for name, ts in times.items():
        slots = max(ids.shape[1] + 5, engines[name].min_slots)
        print(f"- {name} cache ({slots} slots): {1000 * statistics.median(ts):.1f} ms a rollout (median of {repeats})")
    print(f"- scoring a rollout (decode 256 responses, reward): {scoring / 1000:.1f} ms\n")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for seed in range(5):
            engines["unpadded"].generate(ids, mask, seed=seed)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print("| op (unpadded engine, 5 rollouts) | share of self CPU time |\n|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"| `{e.key}` | {100 * e.self_cpu_time_total / total:.1f}% |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="rows x heads of a decoding step (main job: 256 x 4)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--slots", type=int, nargs="+", default=[8, 11, 12, 13, 14, 16, 24, 32])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--rollout", action="store_true", help="time whole rollouts of the main job instead")
    args = p.parse_args(argv)
    if args.rollout:
        rollouts(min(args.repeats, 40))
        return
    from reclight.engines.fast import min_cache_slots

    n, d = args.rows, args.head_dim
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s); {n} rows x heads, "
          f"head size {d}; the engine pads the cache to >= {min_cache_slots(d)} slots")
    print("\n| slots S | S x D | q @ k^T, us | p @ v, us | both, us |\n|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for s in args.slots:
        q, k, v = (torch.randn(n, rows, d, generator=g) for rows in (1, s, s))
        probs = torch.softmax(torch.randn(n, 1, s, generator=g), dim=-1)
        kt = k.transpose(1, 2)
        qk = median_us(lambda: torch.bmm(q, kt), args.repeats)
        pv = median_us(lambda: torch.bmm(probs, v), args.repeats)
        print(f"| {s} | {s * d} | {qk:.0f} | {pv:.0f} | {qk + pv:.0f} |")


if __name__ == "__main__":
    main()
