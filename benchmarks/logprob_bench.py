"""Log-prob + backward, naive vs chunked: peak memory and time on CPU (issue #6, part 2).

Workload: ``N`` response tokens, Qwen2.5-0.5B's LM-head shape (vocab 151,936, hidden 896),
``hidden [N, H]`` and ``weight [V, H]`` both requiring grad, loss ``sum_i a_i logp_i`` with
random ``a_i`` (a policy-gradient loss), then ``backward()``.

Method:

- Each (implementation, N) case runs in its own fresh Python subprocess, one at a time, so the
  cases cannot share allocator state or inflate each other's peak.
- Peak memory = ``ru_maxrss`` of the worker after its runs minus ``ru_maxrss`` right after it
  allocated the inputs (hidden, weight, targets, loss weights). Linux ``ru_maxrss`` is the
  high-water mark of resident memory, in KiB, which counts every page the op touched: torch's
  CPU allocator does not cache blocks, so this is the op's real extra footprint, including the
  gradients it returns (``dL/dW`` is ``[V, H]`` fp32 = 545 MB in both paths).
- Time = median over ``--repeats`` runs of forward + backward in the same process, after a
  warm-up on tiny tensors (library and thread-pool initialisation). On a shared machine the
  load from other users changes between cases; the 1-min load average before and after each
  case goes to stderr so that a noisy ratio can be recognised.
- Before each case the parent reads ``MemAvailable`` from /proc/meminfo and skips the case
  (printing why) if the estimated peak would not fit with a 2 GiB margin: the machine's RAM is
  shared.

Usage::

    .venv/bin/python benchmarks/logprob_bench.py                       # 1024 2048 4096 8192
    .venv/bin/python benchmarks/logprob_bench.py --tokens 8192 --chunk-size 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 151_936
HIDDEN = 896
MARGIN_BYTES = 2 << 30


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def _estimate_peak_bytes(impl: str, tokens: int, chunk_size: int) -> int:
    """Rough upper bound used only to refuse cases that cannot fit in free RAM."""
    weight_grad = VOCAB * HIDDEN * 4 * 2  # fp32 dL/dW plus a transient upcast/cast copy
    if impl == "naive":
        # measured ~2.5 [N, V] fp32 tensors at 2048 tokens (log-softmax output and its grad,
        # plus the gather's grad); 3 leaves room for temporaries
        return 3 * tokens * VOCAB * 4 + weight_grad
    rows = tokens if chunk_size <= 0 or chunk_size >= tokens else chunk_size
    return 3 * rows * VOCAB * 4 + weight_grad


def _make_inputs(tokens: int, dtype_name: str):  # -> (hidden, weight, targets, adv)
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    # Filled in place: a temporary [V, H] copy would raise the baseline high-water mark and
    # hide up to 545 MB of the op's own peak.
    hidden = torch.empty(tokens, HIDDEN, dtype=dtype).normal_(generator=gen).requires_grad_()
    weight = torch.empty(VOCAB, HIDDEN, dtype=dtype).normal_(std=HIDDEN**-0.5, generator=gen)
    weight.requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,), generator=gen)
    adv = torch.randn(tokens, generator=gen)
    return hidden, weight, targets, adv


def _step(impl: str, inputs, chunk_size: int) -> float:  # seconds for forward + backward
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from reclight.kernels.logprobs import token_logprobs, token_logprobs_naive

    fn = {"naive": token_logprobs_naive, "chunked": token_logprobs}[impl]
    hidden, weight, targets, adv = inputs
    hidden.grad = None
    weight.grad = None
    start = time.perf_counter()
    logp = fn(hidden, weight, targets, chunk_size=chunk_size)
    (logp * adv).sum().backward()
    return time.perf_counter() - start


def _worker(impl: str, tokens: int, chunk_size: int, dtype_name: str, repeats: int) -> dict:
    """Peak RSS above the inputs' baseline and median time of ``repeats`` forward + backward
    runs, in this fresh process. Warm-up (library and thread-pool initialisation) runs on tiny
    separate tensors before the baseline is read, so it does not hide any of the op's peak."""
    import torch

    tiny = _make_inputs(64, dtype_name)
    tiny = (tiny[0], tiny[1][:1000].detach().requires_grad_(), tiny[2] % 1000, tiny[3])
    _step(impl, tiny, chunk_size)
    del tiny
    inputs = _make_inputs(tokens, dtype_name)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = [_step(impl, inputs, chunk_size) for _ in range(repeats)]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_mb": (peak_kib - base_kib) / 1024,
        "median_s": statistics.median(times),
        "times_s": times,
        "threads": torch.get_num_threads(),
    }


def _spawn(args: list[str]) -> dict | str:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        return f"failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fits(impl: str, tokens: int, chunk_size: int) -> str | None:
    need = _estimate_peak_bytes(impl, tokens, chunk_size)
    avail = _mem_available_bytes()
    if need + MARGIN_BYTES > avail:
        return f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="response-token counts N to measure")
    parser.add_argument("--chunk-size", type=int, default=1024,
                        help="tokens per chunk for the chunked path (<= 0: one chunk)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of hidden and weight (logits are fp32 in both paths)")
    parser.add_argument("--impl", choices=["naive", "chunked"], nargs="+",
                        default=["naive", "chunked"], help="which paths to run")
    parser.add_argument("--_worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        (tokens,) = args.tokens
        result = _worker(args._worker, tokens, args.chunk_size, args.dtype, args.repeats)
        print(json.dumps(result))
        return

    print(f"vocab {VOCAB}, hidden {HIDDEN}, dtype {args.dtype}, chunk_size {args.chunk_size}, "
          f"time = median of {args.repeats} run(s), forward + backward wrt hidden and weight\n")
    print("| tokens | naive peak MB | chunked peak MB | memory naive/chunked | naive s | chunked s "
          "| time chunked/naive |")
    print("|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    common = ["--chunk-size", str(args.chunk_size), "--dtype", args.dtype,
              "--repeats", str(args.repeats)]
    for tokens in args.tokens:
        res: dict[str, dict] = {}
        for impl in args.impl:  # one process at a time: never two big cases at once
            load = os.getloadavg()[0]
            r = _fits(impl, tokens, args.chunk_size) or _spawn(
                ["--_worker", impl, "--tokens", str(tokens), *common])
            if isinstance(r, str):
                print(f"<!-- {impl} N={tokens}: {r} -->", file=sys.stderr, flush=True)
                continue
            res[impl] = r
            print(f"<!-- {impl} N={tokens}: runs {[round(t, 2) for t in r['times_s']]} s, "
                  f"{r['threads']} threads, 1-min load average {load:.1f} -> "
                  f"{os.getloadavg()[0]:.1f} -->", file=sys.stderr, flush=True)

        def cell(impl: str, key: str, fmt: str) -> str:
            return fmt.format(res[impl][key]) if impl in res else "-"

        both = "naive" in res and "chunked" in res
        mem_ratio = f"{res['naive']['peak_mb'] / res['chunked']['peak_mb']:.1f}x" if both else "-"
        time_ratio = f"{res['chunked']['median_s'] / res['naive']['median_s']:.2f}x" if both else "-"
        print(f"| {tokens} | {cell('naive', 'peak_mb', '{:.0f}')} "
              f"| {cell('chunked', 'peak_mb', '{:.0f}')} | {mem_ratio} "
              f"| {cell('naive', 'median_s', '{:.2f}')} | {cell('chunked', 'median_s', '{:.2f}')} "
              f"| {time_ratio} |", flush=True)


if __name__ == "__main__":
    main()
