"""One whole RL step (rollout, log-prob, update) of reclight against TRL and against the floor.

Usage (in an environment with TRL, e.g. ``pip install -e '.[bench]'``)::

    python benchmarks/rl_step_bench.py --arms floor trl reclight --steps 15 --json out.json

Every *arm* (``framework[:key=value,...]``) runs in its own spawned process, set up once
(model loaded from ONE folder written by ``save_pretrained``, same tokenizer, same prompts in
the same order, same K, max_new_tokens, temperature 1, lr, grad clip 1.0 and dtype; one
optimizer step per batch of B prompts x K samples). The coordinator then interleaves the steps
round-robin (A B C A B C ...): an arm's process sits blocked at its step boundary until the
coordinator lets it run exactly one more step, so all arms see the same machine conditions.

``--schedule sequential`` runs each arm's steps back to back instead (A A A ... B B B ...), as a
real run does. On this project's machine the sequential figures drift: two IDENTICAL reclight
arms in one sequential invocation measured 0.403 and 0.321 s/step, interleaved 0.359 and 0.358
(docs/benchmarks.md); prefer the interleaved schedule (and its per-round ratios) for comparisons
and report both.

What is timed: boundary to boundary of the framework's own training loop (the whole cycle:
data fetch, generation, scoring, advantages, forward, backward, clipping, optimizer, logging),
excluding only the time the arm spends blocked waiting for its turn. The first ``--warmup``
steps of each arm are discarded.

Machine noise: for every step the arm reads ``/proc/stat`` (CPU busy time of the whole
machine) and its own CPU time (``os.times``, all threads) at both ends; the difference is the
CPU time OTHER processes used during that step, reported in cores (1.0 = one core busy all
step). Steps where others used more than ``--noisy-cores`` are flagged; medians are reported
over all measured steps and over the quiet ones.

The arms:

- ``floor``: the minimum work, written plainly with transformers + torch: HF ``generate``
  (``num_return_sequences=K``, KV cache), reward, group-relative advantages divided by the
  group std, ONE forward with grad, the token-mean policy-gradient loss, ONE backward, grad-norm
  clipping to 1.0 and ONE AdamW step.
- ``trl``: ``trl.GRPOTrainer`` set explicitly for the CPU (``use_cpu``, ``bf16=False``, no
  gradient checkpointing, ``beta=0``, ``scale_rewards="group"``, ``loss_type="dapo"`` =
  token mean, ``optim="adamw_torch"``, constant lr, no logging or saving); options override
  ``GRPOConfig`` fields, e.g. ``trl:bf16=true``.
- ``reclight``: the real training path, ``lightning.Trainer.fit(RLModule, RLDataModule)`` with
  the ``grpo`` preset and ``monitor.log_kl_init=False`` (the KL monitor costs one more forward;
  it is a logging option); options go to ``RLModule``'s typed groups as dotted keys
  (``engine.name=fast``, ``engine.dtype=bfloat16``, ``train_forward.impl=fused``,
  ``train_forward.compile=true``, ``engine.fast.compile_decode=true``: values are JSON) or,
  prefixed ``trainer.``, to the Trainer (``trainer.precision=bf16-mixed``). Compilation (of
  either framework) happens in the first steps: give ``--warmup`` enough of them.
  ``src=DIR`` runs the reclight of another checkout (e.g. an older commit:
  ``git worktree add DIR COMMIT``) through that checkout's own copy of this file's runner, with
  that checkout's option spelling: an interleaved A/B of two versions in one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

HZ = os.sysconf("SC_CLK_TCK")


# -- measuring one step ----------------------------------------------------------------------
def _snapshot() -> tuple[float, float, float, int]:
    """(wall seconds, machine busy CPU seconds, this process's CPU seconds, its page faults)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    t = os.times()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy / HZ, t.user + t.system, ru.ru_minflt + ru.ru_majflt


class Gate:
    """The step boundary of an arm. Call it once before each step and once after the last:
    it reports the step that just ended and blocks until the coordinator says "go"."""

    def __init__(self, conn: Any, total_steps: int) -> None:
        self.conn = conn
        self.total = total_steps
        self.calls = 0
        self.start: tuple[float, float, float, int] | None = None
        self.info: dict[str, float] = {}  # extra per-step figures set by the arm

    def __call__(self) -> None:
        end = _snapshot()
        if self.start is None:
            self.conn.send({"ready": True})
        else:
            wall = end[0] - self.start[0]
            own = end[2] - self.start[2]
            others = max(0.0, (end[1] - self.start[1]) - own)
            parts = {k: v for k, v in self.info.items() if k in PARTS}
            self.conn.send({"wall": wall, "own_cores": own / wall, "others_cores": others / wall, **self.info,
                            "other": wall - sum(parts.values()), "page_faults": end[3] - self.start[3]})
            self.info = {}
        self.calls += 1
        if self.calls <= self.total:
            msg = self.conn.recv()
            if msg != "go":
                raise SystemExit(0)
            self.start = _snapshot()


@dataclass
class Spec:
    """What every arm shares."""

    model_dir: str
    prompts: list[list[str]]  # [steps][B]
    answers: list[list[str]]
    K: int
    max_new_tokens: int
    lr: float
    seed: int
    threads: int
    steps: int  # total, warm-up included
    workdir: str
    options: dict[str, Any] = field(default_factory=dict)


PARTS = ("generate", "reward", "logp_fwd", "backward", "clip", "optimizer")


def _timed(obj: Any, name: str, key: str, gate: Gate) -> None:
    """Replace ``obj.name`` by a wrapper adding its wall time to ``gate.info[key]`` (per step)."""
    orig = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            gate.info[key] = gate.info.get(key, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)


def _attn(opts: dict[str, Any]) -> dict[str, Any]:
    """Pops the arm option ``attn_implementation`` (HF attention kernel) into from_pretrained kwargs."""
    impl = opts.pop("attn_implementation", None)
    return {} if impl is None else {"attn_implementation": impl}


def _reward(text: str, answer: str) -> float:
    return 1.0 if text.strip() == answer else 0.0


# -- the floor ---------------------------------------------------------------------------------
def run_floor(spec: Spec, gate: Gate) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    opts = spec.options
    tok = AutoTokenizer.from_pretrained(spec.model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32, **_attn(opts))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    K, eos = spec.K, tok.eos_token_id
    gen_cfg = GenerationConfig(do_sample=True, max_new_tokens=spec.max_new_tokens, num_return_sequences=K,
                               temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    autocast = bool(opts.get("autocast", False))
    torch.manual_seed(spec.seed)
    tick = time.perf_counter

    def part(key: str, t0: float) -> float:
        now = tick()
        gate.info[key] = gate.info.get(key, 0.0) + now - t0
        return now

    for step in range(spec.steps):
        gate()
        t = tick()
        enc = tok(spec.prompts[step], padding=True, padding_side="left", return_tensors="pt")
        P = enc["input_ids"].shape[1]
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            seqs = model.generate(**enc, generation_config=gen_cfg)
        t = part("generate", t)
        resp = seqs[:, P:]  # [B*K, T]
        is_eos = resp == eos
        mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
        texts = tok.batch_decode([r[m].tolist() for r, m in zip(resp, mask)], skip_special_tokens=True)
        answers = [a for a in spec.answers[step] for _ in range(K)]
        r = torch.tensor([_reward(t, a) for t, a in zip(texts, answers)]).view(-1, K)  # [B, K]
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)  # [B*K, 1]
        t = part("reward", t)
        attn = torch.cat([enc["attention_mask"].repeat_interleave(K, 0), mask.long()], dim=1)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            logits = model(input_ids=seqs, attention_mask=attn).logits[:, P - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, resp[..., None]).squeeze(-1)  # [B*K, T]
        ratio = torch.exp(logp - logp.detach())  # on-policy: 1, with the policy gradient
        loss = -(ratio * adv * mask).sum() / mask.sum().clamp(min=1)
        t = part("logp_fwd", t)
        loss.backward()
        t = part("backward", t)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t = part("clip", t)
        opt.step()
        opt.zero_grad(set_to_none=True)
        part("optimizer", t)
        gate.info["resp_tokens"] = float(mask.sum())
    gate()


# -- TRL ---------------------------------------------------------------------------------------
def run_trl(spec: Spec, gate: Gate) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    B = len(spec.prompts[0])
    opts = dict(spec.options)
    tok = AutoTokenizer.from_pretrained(spec.model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32, **_attn(opts))
    ds = Dataset.from_dict({"prompt": [p for ps in spec.prompts for p in ps],
                            "answer": [a for ans in spec.answers for a in ans]})

    def arithmetic_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        t = time.perf_counter()
        out = [_reward(c, a) for c, a in zip(completions, answer)]
        gate.info["reward"] = gate.info.get("reward", 0.0) + time.perf_counter() - t
        return out

    cfg = dict(
        output_dir=os.path.join(spec.workdir, "trl"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, beta=0.0, scale_rewards="group", loss_type="dapo",
        num_generations=spec.K, per_device_train_batch_size=B * spec.K, gradient_accumulation_steps=1,
        max_completion_length=spec.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", max_steps=spec.steps, shuffle_dataset=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, log_completions=False, seed=spec.seed, dataloader_num_workers=0,
    )
    cfg.update(opts)
    trainer_ref: list[Any] = []

    class GateCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            lens = trainer_ref[0]._metrics["train"].get("completions/mean_length") if trainer_ref else None
            if lens:
                gate.info["resp_tokens"] = lens[-1] * B * spec.K
            gate()

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            lens = trainer_ref[0]._metrics["train"].get("completions/mean_length")
            if lens:
                gate.info["resp_tokens"] = lens[-1] * B * spec.K
            gate()

    _timed(model, "generate", "generate", gate)
    _timed(torch.optim.AdamW, "step", "optimizer", gate)
    trainer = GRPOTrainer(model=model, reward_funcs=[arithmetic_reward], args=GRPOConfig(**cfg),
                          train_dataset=ds, processing_class=tok, callbacks=[GateCallback()])
    trainer_ref.append(trainer)
    _timed(trainer, "_get_per_token_logps_and_entropies", "logp_fwd", gate)
    _timed(trainer.accelerator, "backward", "backward", gate)
    _timed(trainer.accelerator, "clip_grad_norm_", "clip", gate)
    trainer.train()


# -- reclight ----------------------------------------------------------------------------------
def run_reclight(spec: Spec, gate: Gate) -> None:
    from lightning.pytorch import Callback, Trainer

    from reclight.engines.base import SamplingConfig
    from reclight.trainer.config import MonitorConfig, OptimConfig, PolicyConfig
    from reclight.trainer.data import RLDataModule
    from reclight.trainer.module import RLModule

    try:  # the typed model.algorithm group (arm options algorithm.preset=..., algorithm.<field>=...)
        from reclight.trainer.config import AlgorithmGroup

        algorithm: Any = AlgorithmGroup(preset="grpo")
    except ImportError:  # an older checkout (src=DIR): a preset name and algorithm_overrides
        algorithm = "grpo"
    B = len(spec.prompts[0])
    opts = dict(spec.options)
    trainer_opts = {k.split(".", 1)[1]: opts.pop(k) for k in list(opts) if k.startswith("trainer.")}
    sampling = SamplingConfig(num_samples=spec.K, max_new_tokens=spec.max_new_tokens, temperature=1.0)
    module_kw: dict[str, Any] = dict(policy=PolicyConfig(name_or_path=spec.model_dir), algorithm=algorithm,
                                     sampling=sampling, optim=OptimConfig(lr=spec.lr, grad_clip=1.0), warmup=None,
                                     monitor=MonitorConfig(log_kl_init=False), seed=spec.seed)
    module_kw = _with_options(RLModule, module_kw, opts)
    module = RLModule(**module_kw)
    dm = RLDataModule(prompts_per_step=B, eval_size=8, eval_batch_size=8, seed=spec.seed)

    def _info(trainer: Any) -> None:
        n = trainer.callback_metrics.get("response/len_mean")
        if n is not None:
            gate.info["resp_tokens"] = float(n) * B * spec.K

    import torch

    import reclight.rollout.scoring
    import reclight.trainer.module

    _timed(reclight.rollout.scoring, "score", "reward", gate)
    _timed(reclight.trainer.module, "response_logprobs", "logp_fwd", gate)
    _timed(torch.nn.utils, "clip_grad_norm_", "clip", gate)
    _timed(torch.optim.AdamW, "step", "optimizer", gate)
    _timed(module, "manual_backward", "backward", gate)

    class GateCallback(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            engine = pl_module.rollouts.engine
            if not hasattr(engine.generate, "__wrapped_by_bench__"):
                _timed(engine, "generate", "generate", gate)
                engine.generate.__wrapped_by_bench__ = True
            _info(trainer)
            gate()

        def on_train_end(self, trainer, pl_module):  # noqa: ANN001
            _info(trainer)
            gate()

    kw: dict[str, Any] = dict(accelerator="cpu", devices=1, max_steps=spec.steps, logger=False,
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                              limit_val_batches=0, num_sanity_val_steps=0, callbacks=[GateCallback()],
                              default_root_dir=os.path.join(spec.workdir, "reclight"))
    kw.update(trainer_opts)
    Trainer(**kw).fit(module, dm)


def _with_options(cls: Any, kwargs: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Apply arm options ``group.field[.field]=value`` (e.g. ``engine.name=fast``,
    ``train_forward.impl=fused``) to ``cls``'s typed config groups; a plain key sets an argument."""
    import dataclasses
    import inspect

    defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items()}
    out = dict(kwargs)
    for key, value in opts.items():
        group, *path = key.split(".")
        if not path:
            out[group] = value
            continue

        def put(obj: Any, names: list[str]) -> Any:
            head, rest = names[0], names[1:]
            return dataclasses.replace(obj, **{head: put(getattr(obj, head), rest) if rest else value})

        out[group] = put(out.get(group, defaults[group]), path)
    return out


RUNNERS = {"floor": run_floor, "trl": run_trl, "reclight": run_reclight}


def _worker(framework: str, spec: Spec, conn: Any) -> None:
    src = spec.options.pop("src", None)
    if src is not None:  # before reclight is first imported: this arm's reclight is that checkout's
        sys.path.insert(0, str(src))
    try:
        from reclight.rollout.workers import die_with_parent
    except ImportError:  # a checkout older than it (src=DIR)
        pass
    else:
        die_with_parent(os.getppid())  # a killed coordinator leaves no arm running (it did)
    import torch

    torch.set_num_threads(spec.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    gate = Gate(conn, spec.steps)
    runner = RUNNERS[framework]
    if src is not None:  # this arm runs another checkout's reclight through that checkout's runner
        import importlib.util

        import reclight

        if not os.path.realpath(reclight.__file__).startswith(os.path.realpath(src)):
            raise RuntimeError(f"src={src}: imported reclight from {reclight.__file__}, not from that checkout")
        bench = importlib.util.spec_from_file_location("rl_step_bench_src", os.path.join(src, "benchmarks", "rl_step_bench.py"))
        module = importlib.util.module_from_spec(bench)
        sys.modules[bench.name] = module  # dataclasses look their module up while it is executed
        bench.loader.exec_module(module)
        runner = module.RUNNERS[framework]
    try:
        runner(spec, gate)
    except BaseException as e:  # report, so the coordinator does not hang
        import traceback

        conn.send({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"})
        raise


# -- the coordinator ---------------------------------------------------------------------------
def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    """``"trl:bf16=true,torch_compile=false"`` -> ``("trl", {"bf16": True, ...})``."""
    name, _, rest = text.partition(":")
    if name not in RUNNERS:
        raise SystemExit(f"--arms: {name!r} is not valid; accepted: {', '.join(RUNNERS)} (optionally :key=value,...)")
    opts: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value  # a bare string such as bfloat16
    return name, opts


def make_prompts(steps: int, batch: int, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """The prompts reclight's data module uses for steps 0..steps-1 (same sampler, same seed)."""
    from reclight.rollout.sampler import PromptSampler
    from reclight.tasks.arithmetic import Arithmetic

    train = Arithmetic().examples("train")
    sampler = PromptSampler(len(train), batch, seed)
    prompts, answers = [], []
    for t in range(steps):
        ex = [train[i] for i in sampler.indices(t)]
        prompts.append([e.prompt for e in ex])
        answers.append([e.answer for e in ex])
    return prompts, answers


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(label: str, rows: list[dict[str, float]], noisy: float) -> dict[str, Any]:
    quiet = [r for r in rows if r["others_cores"] <= noisy]
    return {
        "arm": label,
        "median_s": _median([r["wall"] for r in rows]),
        "median_quiet_s": _median([r["wall"] for r in quiet]),
        "min_s": min(r["wall"] for r in rows),
        "n": len(rows),
        "n_quiet": len(quiet),
        "others_cores_median": _median([r["others_cores"] for r in rows]),
        "others_cores_max": max(r["others_cores"] for r in rows),
        "own_cores_median": _median([r["own_cores"] for r in rows]),
        "resp_tokens_median": _median([r.get("resp_tokens", float("nan")) for r in rows]),
        "page_faults_median": _median([r.get("page_faults", float("nan")) for r in rows]),
        "parts_median_s": {k: _median([r.get(k, 0.0) for r in rows]) for k in (*PARTS, "other")},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["floor", "trl", "reclight"],
                   help="framework[:key=value,...]; the first is the reference of the ratio column")
    p.add_argument("--steps", type=int, default=12, help="measured steps per arm")
    p.add_argument("--warmup", type=int, default=3, help="discarded first steps per arm")
    p.add_argument("--prompts-per-step", type=int, default=32, help="B")
    p.add_argument("--num-samples", type=int, default=8, help="K")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128, help="tiny Llama width (128: ~1M parameters)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--lr", type=float, default=1e-5, help="small, so the random policy (and the work) stays the same")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every arm")
    p.add_argument("--noisy-cores", type=float, default=0.25, help="flag a step where others used more CPU")
    p.add_argument("--schedule", choices=("interleaved", "sequential"), default="interleaved",
                   help="interleaved: A B C A B C (shared machine noise hits all arms alike); sequential: "
                        "each arm's steps back to back (what a real run does; for a quiet machine)")
    p.add_argument("--json", default=None, help="write every step and the summary here")
    args = p.parse_args(argv)

    from reclight.models.tiny import TinyModelConfig, build_tiny

    arms = [(a, *parse_arm(a)) for a in args.arms]
    total = args.warmup + args.steps
    workdir = tempfile.mkdtemp(prefix="rl_step_bench-")
    cfg = TinyModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=max(1, args.hidden // 32),
                          intermediate_size=args.intermediate, max_positions=max(64, 8 + args.max_new_tokens))
    model_dir = str(build_tiny(workdir, cfg, seed=args.seed))
    prompts, answers = make_prompts(total, args.prompts_per_step, args.seed)
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for label, framework, opts in arms:  # set up one at a time (no set-up inside the timed rounds)
        spec = Spec(model_dir, prompts, answers, args.num_samples, args.max_new_tokens, args.lr, args.seed,
                    args.threads, total, workdir, opts)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(framework, spec, child), daemon=True)
        proc.start()
        msg = parent.recv()
        if "error" in msg:
            raise SystemExit(f"arm {label} failed to start:\n{msg['error']}")
        procs.append(proc)
        conns.append(parent)
        print(f"# {label}: ready", file=sys.stderr, flush=True)
    steps: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in arms}
    def run_step(t: int, label: str, conn: Any) -> None:
        conn.send("go")
        msg = conn.recv()
        if "error" in msg:
            raise SystemExit(f"arm {label} failed at step {t}:\n{msg['error']}")
        msg["step"] = t
        steps[label].append(msg)

    if args.schedule == "interleaved":
        for t in range(total):  # A B C A B C ...
            for (label, _, _), conn in zip(arms, conns):
                run_step(t, label, conn)
            print(f"# step {t}: " + "  ".join(f"{lbl}={steps[lbl][-1]['wall']:.3f}s" for lbl in steps),
                  file=sys.stderr, flush=True)
    else:  # A A A ... B B B ...: each arm's steps back to back, as in a real run
        for (label, _, _), conn in zip(arms, conns):
            for t in range(total):
                run_step(t, label, conn)
            print(f"# {label}: " + " ".join(f"{r['wall']:.3f}" for r in steps[label]), file=sys.stderr, flush=True)
    for proc in procs:
        proc.join(timeout=120)

    n_params = _count_params(model_dir)
    summary = [summarise(label, steps[label][args.warmup :], args.noisy_cores) for label, _, _ in arms]
    ref = summary[0]
    for s in summary:
        s["ratio_vs_first"] = s["median_s"] / ref["median_s"]
        s["ratio_quiet_vs_first"] = s["median_quiet_s"] / ref["median_quiet_s"] if ref["n_quiet"] and s["n_quiet"] else float("nan")
    setting = (f"{n_params / 1e6:.2f}M-parameter Llama (h{args.hidden} l{args.layers} i{args.intermediate}), "
               f"B={args.prompts_per_step} prompts x K={args.num_samples}, max_new_tokens={args.max_new_tokens}, "
               f"{args.threads} torch threads, {args.steps} measured steps per arm after {args.warmup} warm-up, "
               f"{args.schedule}")
    print(f"\n{setting}\n")
    print(f"| arm | median s/step | ratio vs {ref['arm']} | median quiet s/step (n) | others' CPU, cores (median / max) "
          f"| response tokens/step | page faults/step |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| `{s['arm']}` | {s['median_s']:.3f} | {s['ratio_vs_first']:.2f}x | {s['median_quiet_s']:.3f} "
              f"({s['n_quiet']}/{s['n']}) | {s['others_cores_median']:.2f} / {s['others_cores_max']:.2f} "
              f"| {s['resp_tokens_median']:.0f} | {s['page_faults_median']:.0f} |")
    ref_rows = steps[ref["arm"]][args.warmup :]
    print(f"\nRatios vs `{ref['arm']}` (per-round: same step index, same prompts; interleaved, also the same machine conditions; CPU time = wall x own cores)\n")
    print("| arm | median / median | per-round ratio: median (min-max) | CPU-time ratio: median (min-max) |")
    print("|---|---|---|---|")
    for s in summary:
        rows = steps[s["arm"]][args.warmup :]
        wall = [r["wall"] / q["wall"] for r, q in zip(rows, ref_rows)]
        cpu = [r["wall"] * r["own_cores"] / (q["wall"] * q["own_cores"]) for r, q in zip(rows, ref_rows)]
        s["per_round_ratio"] = {"median": _median(wall), "min": min(wall), "max": max(wall)}
        s["cpu_time_ratio"] = {"median": _median(cpu), "min": min(cpu), "max": max(cpu)}
        print(f"| `{s['arm']}` | {s['ratio_vs_first']:.2f}x | {_median(wall):.2f}x ({min(wall):.2f}-{max(wall):.2f}) "
              f"| {_median(cpu):.2f}x ({min(cpu):.2f}-{max(cpu):.2f}) |")
    print("\nWhere the time goes (median seconds per step; `other` = the step minus the named parts)\n")
    print("| arm | " + " | ".join(f"{k}" for k in (*PARTS, "other")) + " |")
    print("|---" * (len(PARTS) + 2) + "|")
    for s in summary:
        print(f"| `{s['arm']}` | " + " | ".join(f"{v:.3f}" for v in s["parts_median_s"].values()) + " |")
    result = {"setting": setting, "args": vars(args), "n_params": n_params, "summary": summary, "steps": steps}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _count_params(model_dir: str) -> int:
    import torch
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() for k in f.keys() if torch is not None)


if __name__ == "__main__":
    main()
