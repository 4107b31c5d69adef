"""A decoding step's attention products on the CPU, by number of cache slots (issue #26).

At one query token per row, the fast engine's attention is two batched products per row and
head: ``q [1, D] @ k^T [D, S]`` and ``p [1, S] @ v [S, D]``. torch's CPU ``bmm`` sends a product
of fewer than 400 multiply-adds per batch item (``S * D`` here) to a plain element loop instead of
the BLAS (ATen, ``LinearAlgebra.cpp``, ``bmm_out_or_baddbmm_``). At the main job's shapes (1024
rows x heads, head size 32, a 6-token prompt plus 5 new tokens: S = 11) that loop is the slow side.
This script times both products for a range of S at one intra-op thread, so the threshold and the
gain of padding the cache past it (:func:`reclight.engines.fast.min_cache_slots`) can be read on
any CPU.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/decode_attention.py
    OMP_NUM_THREADS=1 python benchmarks/decode_attention.py --rows 512 --head-dim 64 --slots 4 6 7 8 16
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="rows x heads of a decoding step (main job: 256 x 4)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--slots", type=int, nargs="+", default=[8, 11, 12, 13, 14, 16, 24, 32])
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args(argv)
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
