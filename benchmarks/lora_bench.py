"""Peak memory and time of one training step with and without LoRA and gradient checkpointing.

Usage::

    python benchmarks/lora_bench.py                       # the table of docs/lora.md
    python benchmarks/lora_bench.py --hidden 512 --layers 8 --steps 2 --threads 2

Each arm (full or LoRA weights x HF or fused training forward x checkpointing off or on) runs in
its own spawned process, so its peak resident memory (``ru_maxrss``) is its own: the process
builds a Llama from a config (random weights, seeded; ~110M parameters by default, no download),
then runs ``--steps`` training steps after one untimed step: the response log-probs of B prompts
x K samples (:func:`reclight.models.forward.response_logprobs`), the ``grpo`` loss
(:func:`reclight.losses.policy_loss`), backward, AdamW. Reported: the process's resident memory
before the first step (weights built), its peak over the steps, the peak minus that (what the
step itself needs: gradients, optimizer state, activations), the trainable parameters and the
median step time. LoRA needs ``pip install 'reclight[lora]'``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _arm(args: dict, lora: bool, impl: str, ckpt: bool, queue: mp.Queue) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reclight.algorithms import get_algorithm
    from reclight.losses import policy_loss
    from reclight.models.forward import enable_checkpointing, response_logprobs

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args["vocab"], hidden_size=args["hidden"], intermediate_size=args["intermediate"],
                      num_hidden_layers=args["layers"], num_attention_heads=args["heads"],
                      num_key_value_heads=args["heads"], max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.train()
    if lora:
        from reclight.models.lora import LoraConfig, attach_lora

        attach_lora(model, LoraConfig(enabled=True, rank=args["rank"], alpha=2.0 * args["rank"]), seed=0)
    if ckpt and impl == "hf":
        enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    B, K, P, T = args["prompts"], args["samples"], args["prompt_len"], args["response_len"]
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, cfg.vocab_size, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    response_ids = torch.randint(3, cfg.vocab_size, (B, K, T), generator=g)
    response_mask = torch.ones(B, K, T, dtype=torch.bool)
    rewards = torch.randn(B, K, generator=g)
    adv = rewards - rewards.mean(-1, keepdim=True)
    algo = get_algorithm("grpo")
    before = _rss_mb()
    times = []
    for step in range(args["steps"] + 1):
        start = time.perf_counter()
        logp, _ = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, impl=impl,
                                    checkpointing=ckpt)
        loss, _ = policy_loss(logp, logp.detach(), adv, response_mask, algo)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:  # the first step allocates the optimizer state: untimed
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"weights": "lora r=%d" % args["rank"] if lora else "full", "forward": impl,
               "checkpointing": ckpt, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
               "trainable_m": sum(p.numel() for p in params) / 1e6, "rss_before_mb": before, "peak_mb": peak,
               "step_mb": peak - before, "step_s": statistics.median(times)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=2, help="B")
    ap.add_argument("--samples", type=int, default=4, help="K")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per arm (after one untimed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--impl", nargs="+", default=["hf", "fused"])
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    args = {k.replace("-", "_"): v for k, v in vars(a).items()}
    ctx = mp.get_context("spawn")
    rows = []
    for impl in a.impl:
        for lora in (False, True):
            for ckpt in (False, True):
                q = ctx.Queue()
                p = ctx.Process(target=_arm, args=(args, lora, impl, ckpt, q))
                p.start()
                rows.append(q.get())
                p.join()
                r = rows[-1]
                print(f"  done: {r['weights']} {impl} checkpointing={ckpt}: {r['step_s']:.2f} s", flush=True)
    cpu = "unknown CPU"
    try:
        flags = open("/proc/cpuinfo").read()
        cpu = f"{os.cpu_count()}-core " + ("AVX-512" if "avx512f" in flags else "AVX2-only" if "avx2" in flags else "")
    except OSError:
        pass
    print(f"\n{rows[0]['params_m']:.0f}M-parameter Llama (hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}), "
          f"B={a.prompts} x K={a.samples}, prompt {a.prompt_len} + response {a.response_len} tokens, fp32, "
          f"{a.threads} thread(s), {cpu} CPU\n")
    print("| weights | forward | checkpointing | trainable (M) | RSS before step (MB) | peak RSS (MB) "
          "| peak - before (MB) | step (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['forward']} | {'on' if r['checkpointing'] else 'off'} | {r['trainable_m']:.2f} "
              f"| {r['rss_before_mb']:.0f} | {r['peak_mb']:.0f} | {r['step_mb']:.0f} | {r['step_s']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
