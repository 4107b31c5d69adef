"""Where one training pass (log-prob forward + backward) spends its time, by op, on this CPU.

The pass is the trainer's: :func:`reclight.models.forward.response_logprobs` (``impl`` ``fused``,
reclight's default for Llama models, or ``hf``, the model's own forward as TRL and the other
peers run it) on one RL batch of the RL-step benchmark's shapes (``benchmarks/rl_step_bench.py``:
a 4-layer Llama of width 256 / MLP 768, B=8 prompts x K=8 samples, up to 48 response tokens,
lengths drawn uniformly in [8, 48] with an EOS), a policy-gradient loss on the log-probs, then
``backward()``. Each case: 3 passes of warm-up, then ``--repeats`` passes under
``torch.profiler``; the table is the self CPU time of each op (forward ops and the backward
nodes that autograd runs, ``XxxBackward0``), grouped into what they compute:

- ``matmul``: every matrix product (q|k|v, output and MLP projections, attention scores and
  values, the LM head, each with its backward products);
- ``log-softmax (chunked)``: :func:`reclight.kernels.logprobs.token_logprobs`'s own ops (logsumexp,
  gathers, its recomputation in backward);
- ``attention softmax + mask``, ``norms``, ``RoPE``, ``SwiGLU``, ``casts`` (``aten::to`` /
  ``_to_copy``: autocast's and the kernels' dtype changes), ``layout`` (copies, cat, index,
  transpose/reshape materialisations), ``other``.

The grouping is by op name, so it is approximate where one op serves two purposes (an ``add`` is
counted under ``other``, a ``mul`` under ``other`` unless it is inside a named kernel's backward).
Wall time per pass (median, no profiler) is printed beside it.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/train_pass_profile.py                 # fp32: fused and hf
    OMP_NUM_THREADS=2 python benchmarks/train_pass_profile.py --precision bf16 --impls fused hf
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import tempfile
import time

import torch

GROUPS = [  # (group, regex on the op name); first match wins
    ("matmul", r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm)$|^(Mm|Addmm|Bmm|Linear)Backward"),
    ("log-softmax (chunked)", r"logsumexp|LogsumexpBackward|log_softmax|LogSoftmaxBackward|TokenLogprob|_chunk"),
    ("attention softmax + mask", r"softmax|SoftmaxBackward|masked_fill|scaled_dot_product|Sdpa|MaskedFill"),
    ("norms", r"rsqrt|RsqrtBackward|aten::pow$|PowBackward|aten::mean$|MeanBackward|rms_norm|RmsNorm"),
    ("SwiGLU", r"silu|SiluBackward"),
    ("RoPE", r"rope|Rope|aten::neg$|NegBackward"),
    ("casts", r"^aten::(to|_to_copy|copy_)$|ToCopyBackward"),
    ("layout", r"cat|CatBackward|index|Index|transpose|Transpose|reshape|Reshape|view|View|permute|Permute|"
               r"expand|Expand|clone|Clone|contiguous|split|Split|select|Select|slice|Slice|scatter|Scatter|"
               r"gather|Gather|repeat|Repeat|HeadMajor|unsqueeze|squeeze|Unsqueeze|Squeeze|empty|zeros|fill_"),
]


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def make_batch(vocab: int, eos: int, B: int = 8, K: int = 8, P: int = 8, T: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    plen = torch.randint(4, P + 1, (B,), generator=g)
    prompt_mask = torch.arange(P)[None] >= (P - plen)[:, None]  # left-padded
    response_ids = torch.randint(3, vocab, (B, K, T), generator=g)
    lengths = torch.randint(8, T + 1, (B, K), generator=g)
    response_ids[torch.arange(B)[:, None], torch.arange(K)[None], lengths - 1] = eos
    response_mask = torch.arange(T)[None, None] < lengths[..., None]
    adv = torch.randn(B, K, 1, generator=g)
    return prompt_ids, prompt_mask, response_ids, response_mask, adv


def one_pass(model, batch, impl: str, precision: str) -> None:
    from reclight.models.forward import response_logprobs

    prompt_ids, prompt_mask, response_ids, response_mask, adv = batch
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with ctx:
        logp, _ = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, impl=impl)
    loss = -(adv * logp * response_mask).sum() / response_mask.sum()
    model.zero_grad(set_to_none=True)
    loss.backward()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", nargs="+", default=["fused", "hf"], choices=["fused", "hf"])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the pass under bf16 autocast (trainer precision bf16-mixed)")
    p.add_argument("--repeats", type=int, default=5, help="profiled passes per case")
    p.add_argument("--timed", type=int, default=15, help="unprofiled passes per case, interleaved, for the wall time")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--top", type=int, default=12, help="ops listed per case")
    args = p.parse_args(argv)

    from reclight.models.loading import load_causal_lm
    from reclight.models.tiny import TinyModelConfig, build_tiny

    cfg = TinyModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=max(1, args.hidden // 32),
                          intermediate_size=args.intermediate, max_positions=64)
    model, tok = load_causal_lm(str(build_tiny(tempfile.mkdtemp(prefix="train_pass_profile-"), cfg, seed=0)))
    model.train()
    batch = make_batch(model.config.vocab_size, tok.eos_token_id)
    n_tok = int(batch[3].sum())
    print(f"# model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; batch 8 x 8, "
          f"{n_tok} response tokens; precision {args.precision}; torch threads {torch.get_num_threads()}")
    for impl in args.impls:
        for _ in range(3):
            one_pass(model, batch, impl, args.precision)
    times: dict[str, list[float]] = {impl: [] for impl in args.impls}
    for _ in range(args.timed):  # interleaved: machine drift hits both alike
        for impl in args.impls:
            start = time.perf_counter()
            one_pass(model, batch, impl, args.precision)
            times[impl].append(time.perf_counter() - start)
    for impl in args.impls:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                one_pass(model, batch, impl, args.precision)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        groups: dict[str, float] = {}
        for e in events:
            groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total
        wall = statistics.median(times[impl])
        print(f"\n## impl={impl}: {1000 * wall:.1f} ms per pass (median of {args.timed}, no profiler)\n")
        print("| group | share of self CPU time |\n|---|---|")
        for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"| {g} | {100 * t / total:.1f}% |")
        print(f"\n| top op | group | ms per pass | share |\n|---|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"| `{e.key}` | {group_of(e.key)} | {e.self_cpu_time_total / 1000 / args.repeats:.2f} | "
                  f"{100 * e.self_cpu_time_total / total:.1f}% |")
    if len(args.impls) == 2:
        a, b = args.impls
        ratio = statistics.median(x / y for x, y in zip(times[b], times[a]))
        print(f"\n# {b} / {a} wall time per pass (median of per-round ratios): {ratio:.2f}x")


if __name__ == "__main__":
    main()
