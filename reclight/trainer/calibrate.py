"""``reclight calibrate``: measure the simulated clock's costs (``model.clock.costs``) in seconds.

    reclight calibrate --config configs/arithmetic.yaml [fit overrides] [--steps N] [--out FILE]

The clock (:mod:`reclight.clock`, docs/async.md) charges a decoding step ``decode_a + decode_b *
live_rows``, an admission ``prefill_b * prompt_tokens``, a weight swap ``sync_cost`` and a training
step ``train_c + train_e * trained_tokens``. This command builds the run exactly as ``reclight fit``
would from the same arguments (the real CLI: model, engine, precision, device, data), times each
of those operations on this machine, fits the straight lines by least squares, and prints a YAML
snippet ``model: {clock: {costs: {...}}}`` that composes with ``--config``; the fit quality and
every measured point are written above it as comments.

What is timed, and how it departs from a run:

- **Decoding steps**: a :class:`~reclight.engines.continuous.ContinuousEngine` on the run's fast
  engine (the generator the asynchronous queue drives), with 1 .. ``model.clock.max_inflight``
  (at least 2) groups of K samples admitted at once; every decoding step after the one that
  prefills is timed with its live rows (samples that end leave, so the row counts in between
  are measured too). Medians per row count, then ``decode_a + decode_b * rows``, each median
  weighted by its number of samples.
- **Prefills**: the engine prefills an admitted prompt inside its next decoding step, so that step
  is timed for one group whose prompt has 2 .. ``2 x`` the longest train prompt tokens (within the
  model's positions; the ids are a real prompt's, repeated: the cost does not depend on them);
  ``time = alpha + prefill_b * tokens``, and alpha (one decoding step of K rows) is reported beside
  ``decode_a + decode_b * K`` as a check.
- **Weight swap**: ``FastLlamaEngine.update_weights`` from the policy (the median).
- **Training steps**: the module's real training step (every update of ``model.updates``,
  logging included), timed from ``on_train_batch_start`` to ``on_train_batch_end`` during a short
  fit. Its batches are one real rollout batch of the run, its groups repeated or cut to 1/4, 1/2,
  1 and 2 times B (multiples of ``model.updates.mini_batches``); the tokens are the responses'
  real lengths. Steps run round-robin over the sizes, after two untimed steps at the largest.
- The fit runs on one process (``trainer.devices 1``) with the synchronous schedule
  (``model.clock.enabled false``: it hands whole batches; the asynchronous queue's generator is
  the continuous engine timed above), no warm-up (a cost does not depend on the weights' values),
  no logger, checkpoints or validation, and one evaluation example (the start-of-RL evaluation
  is not timed).
- Every training size is timed ``--steps`` times (default 5), every other operation
  :data:`GENERATOR_REPEATS` times as often, after one untimed round; medians are fitted. A
  slope that noise makes <= 0 where the clock needs > 0 (``decode_b``, ``train_e``) is set to a
  floor, 1% of the intercept spread over the largest measured size (below what the measurement
  resolves), and the YAML says so; a negative ``prefill_b`` becomes 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from reclight.checks import invalid
from reclight.clock import ClockCosts
from reclight.engines.continuous import ContinuousEngine
from reclight.engines.fast import FastLlamaEngine
from reclight.models.tokens import encode_prompts
from reclight.rollout.batch import RolloutBatch

FLOOR_SHARE = 0.01
"""A slope that must be > 0 but is measured <= 0 becomes this share of the intercept per unit at the largest size."""
TRAIN_WARMUP_STEPS = 2
"""Untimed training steps (at the largest size) before the timed ones."""
GENERATOR_REPEATS = 8
"""Decoding steps, prefills and swaps are timed this many times ``--steps`` (each costs
milliseconds, and their medians need more samples than a training step's)."""


# -- the fits ------------------------------------------------------------------------------------
@dataclass
class LineFit:
    """``y = intercept + slope * x`` by least squares over ``points`` (x, median seconds, samples)."""

    intercept: float
    slope: float
    r2: float
    """1 - SS_res / SS_tot, weighted as the fit (1.0 when every point has the same y and the line
    passes through them)."""
    max_rel_residual: float
    """max |y - fit| / y over the points."""
    mean_rel_residual: float
    """|y - fit| / y averaged over the points, weighted as the fit."""
    total_ratio: float
    """The line summed over every sample / the samples' measured total: what a clock charging the
    line would count for this work, against the wall time it took (medians leave out the slow
    outliers, so this is usually below 1)."""
    points: list[tuple[float, float, int]] = field(default_factory=list)


def least_squares(xs: Sequence[float], ys: Sequence[float],
                  weights: Sequence[float] | None = None) -> tuple[float, float, float]:
    """``(intercept a, slope b, R^2)`` of the line ``y = a + b x`` minimising sum w (y - a - b x)^2
    (weights w > 0, all 1 unless given); with weighted means mx, my:

        b = sum w (x - mx)(y - my) / sum w (x - mx)^2,     a = my - b mx,
        R^2 = 1 - sum w (y - a - b x)^2 / sum w (y - my)^2.

    Needs two distinct x; sums are ``math.fsum`` (exact on points that lie on a line with dyadic
    coefficients)."""
    w = [1.0] * len(xs) if weights is None else [float(v) for v in weights]
    if not len(xs) == len(ys) == len(w) or len(set(xs)) < 2 or min(w) <= 0:
        raise ValueError(f"least_squares needs at least two distinct x, one y and one weight > 0 per x; got "
                         f"x={list(xs)}, {len(ys)} y, weights {w}")
    sw = math.fsum(w)
    mx, my = math.fsum(v * x for v, x in zip(w, xs)) / sw, math.fsum(v * y for v, y in zip(w, ys)) / sw
    sxx = math.fsum(v * (x - mx) ** 2 for v, x in zip(w, xs))
    sxy = math.fsum(v * (x - mx) * (y - my) for v, x, y in zip(w, xs, ys))
    b = sxy / sxx
    a = my - b * mx
    ss_res = math.fsum(v * (y - a - b * x) ** 2 for v, x, y in zip(w, xs, ys))
    ss_tot = math.fsum(v * (y - my) ** 2 for v, y in zip(w, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return a, b, r2


def fit_line(samples: dict[float, list[float]]) -> LineFit:
    """Median of each x's samples, then :func:`least_squares` over the medians, each weighted by
    its number of samples (decoding steps fall on row counts as samples end: a row count seen
    once is one noisy sample, not a point worth a well-sampled one)."""
    xs = sorted(samples)
    ys = [statistics.median(samples[x]) for x in xs]
    counts = [len(samples[x]) for x in xs]
    a, b, r2 = least_squares(xs, ys, counts)
    rel = [abs(y - a - b * x) / y if y > 0 else 0.0 for x, y in zip(xs, ys)]
    mean = math.fsum(r * n for r, n in zip(rel, counts)) / sum(counts)
    total = math.fsum(t for x in xs for t in samples[x])
    charged = math.fsum((a + b * x) * n for x, n in zip(xs, counts))
    return LineFit(a, b, r2, max(rel), mean, charged / total, [(x, y, n) for x, y, n in zip(xs, ys, counts)])


def _positive_slope(fit: LineFit, name: str, notes: list[str]) -> float:
    """``fit.slope``, or the floor (module docstring) when noise made it <= 0."""
    if fit.slope > 0:
        return fit.slope
    floor = FLOOR_SHARE * max(fit.intercept, 1e-12) / max(x for x, _, _ in fit.points)
    notes.append(f"{name}: fitted {fit.slope:.3g} s (<= 0: within the noise); set to the floor {floor:.3g} s "
                 f"({FLOOR_SHARE:.0%} of the intercept at the largest size), as the clock needs > 0")
    return floor


# -- the measurements ----------------------------------------------------------------------------
def _clock(device: Any) -> Callable[[], float]:
    if getattr(device, "type", "cpu") == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


def _geometric(lo: int, hi: int, count: int) -> list[int]:
    """Up to ``count`` distinct integers from lo to hi, spaced geometrically (both ends included)."""
    if hi <= lo:
        return [lo]
    return sorted({round(lo * (hi / lo) ** (i / (count - 1))) for i in range(count)})


def measure_generator(engine: Any, policy: Any, prompt_ids: Any, max_groups: int, max_prompt: int,
                      repeats: int) -> dict[str, Any]:
    """Time the continuous engine on ``engine`` (a ``FastLlamaEngine``) and its weight swap from
    ``policy``: ``{"decode": {rows: [s, ...]}, "prefill": {prompt tokens: [s, ...]}, "swap": [s,
    ...]}`` (module docstring). ``prompt_ids`` [P] is a real prompt (repeated or cut to each
    measured length). The engine ends with its own version (the swaps copy ``policy`` as it is)."""
    now = _clock(engine.device)
    max_groups = max(max_groups, 2)  # two group counts at least: a line needs two distinct row counts
    batcher = ContinuousEngine(engine, max_groups, seed=0)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    counter = iter(range(10**9))

    def prompt(length: int) -> Any:
        return ids.repeat(-(-length // ids.numel()))[:length]

    def clear() -> None:
        for n in [*batcher.live_groups, *batcher.finished]:
            batcher.release(n)

    decode: dict[float, list[float]] = {}
    groups = _geometric(1, max_groups, 6)

    def decode_round(g: int, want: int, record: bool) -> int:
        """Admit g groups, prefill untimed, then time decoding steps until none is live or ``want`` are timed."""
        for _ in range(g):
            batcher.admit(next(counter), ids)
        batcher.decode()  # the prefill step: timed apart, below
        timed = 0
        while batcher.live_rows and timed < want:
            rows = batcher.live_rows
            t = now()
            batcher.decode()
            if record:
                decode.setdefault(rows, []).append(now() - t)
            timed += 1
        clear()
        return timed

    decode_round(max(groups), 1, record=False)  # warm-up: allocations, first-call costs
    need = {g: repeats for g in groups}
    while any(need.values()):
        for g in groups:
            if need[g] > 0:
                timed = decode_round(g, need[g], record=True)
                need[g] -= max(timed, 1)  # a round whose samples all ended at once still counts

    prefill: dict[float, list[float]] = {}
    lengths = _geometric(2, max(max_prompt, 3), 6)
    for r in range(repeats + 1):  # round 0 is the warm-up
        for length in reversed(lengths):  # the longest first: the ring grows once, untimed
            batcher.admit(next(counter), prompt(length))
            t = now()
            batcher.decode()
            if r:
                prefill.setdefault(length, []).append(now() - t)
            clear()

    swap: list[float] = []
    version = engine.version
    for r in range(repeats + 1):
        t = now()
        engine.update_weights(policy, version)
        if r:
            swap.append(now() - t)
    return {"decode": decode, "prefill": prefill, "swap": swap}


def resize_batch(batch: Any, groups: int, step: int) -> Any:
    """``batch`` (a ``RolloutBatch`` of B groups) with ``groups`` groups: its groups repeated in
    order (or the first ``groups``), every per-group tensor [B, ...] indexed alike."""
    B = batch.rewards.shape[0]
    index = torch.arange(groups, device=batch.rewards.device) % B
    changes = {f.name: getattr(batch, f.name)[index] for f in dataclasses.fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor) and getattr(batch, f.name).shape[:1] == (B,)}
    return dataclasses.replace(batch, step=step, metrics=None, **changes)


SIZE_SHARES = (0.25, 0.5, 1.0, 2.0)
"""Groups of the timed training steps, as shares of B."""


def train_sizes(groups_per_step: int, mini_batches: int) -> list[int]:
    """Groups per timed training step, one per :data:`SIZE_SHARES`: about B/4, B/2, B and 2B, as
    multiples of ``mini_batches`` (values may repeat for a small B: more samples of that size)."""
    return [max(mini_batches, round(groups_per_step * f / mini_batches) * mini_batches) for f in SIZE_SHARES]


def planned_steps(sizes: Sequence[int], repeats: int) -> list[int]:
    """Groups of every step of the calibration fit: the untimed steps at the largest size, then the
    sizes round-robin ``repeats`` times (so a drift of the machine touches every size alike)."""
    return [max(sizes)] * TRAIN_WARMUP_STEPS + [g for _ in range(repeats) for g in sizes]


class Probe(pl.Callback):
    """The calibration fit's callback. At ``on_train_start`` (the module has built its policy,
    engine and rollout queue) it times the generator, draws step 0's real batch and makes the queue
    hand the fit that batch resized to the planned sizes; then it times every training step.

    It reads the module's set-up (engine, policy, prompts, settings) directly: a measurement
    harness looks at the run it measures; the one thing it changes is what the queue hands the
    trainer."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.generator: dict[str, Any] = {}
        self.train: dict[float, list[float]] = {}
        self.setup: dict[str, Any] = {}
        self._now: Callable[[], float] = time.perf_counter
        self._t = 0.0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        queue, engine = module.rollouts, module.rollouts.engine
        if not isinstance(engine, FastLlamaEngine):
            raise invalid("model.engine.name", module.engine_cfg.name, "fast, or auto where it resolves to fast "
                          f"(it gave the {type(engine).__name__}): the clock's generator is the fast engine's "
                          "continuous batching")
        self._now = _clock(engine.device)
        p = module.prompts
        train = p.train
        ids, mask = encode_prompts(module.tokenizer, [train[i].prompt for i in range(min(len(train), 256))],
                                   module.policy_cfg.use_chat_template)
        lengths = mask.sum(1)
        T = engine.sampling.max_new_tokens
        positions = getattr(module.policy.config, "max_position_embeddings", None) or 10**6
        max_prompt = max(2, min(2 * int(lengths.max()), positions - T))
        max_groups = module.clock_cfg.max_inflight
        self.generator = measure_generator(engine, module.policy, ids[0][mask[0]], max_groups, max_prompt,
                                           GENERATOR_REPEATS * self.repeats)
        B = p.groups_per_rank
        sizes = train_sizes(B, module.updates_cfg.mini_batches)
        plan = planned_steps(sizes, self.repeats)
        if len(plan) != trainer.max_steps:
            raise RuntimeError(f"the calibration fit runs {trainer.max_steps} steps; its plan has {len(plan)}")
        base = queue.batch_for_step(0, module.policy)

        def planned(step: int, policy: torch.nn.Module) -> RolloutBatch:
            return resize_batch(base, plan[step], step)

        queue.batch_for_step = planned
        self.setup = {
            "repeats": self.repeats, "B": B, "K": engine.sampling.num_samples, "max_new_tokens": T,
            "max_inflight": max_groups, "train_groups": sorted(set(sizes)),
            "prompt_tokens_mean": round(float(lengths.float().mean()), 2), "device": str(engine.device),
            "engine_dtype": str(engine.dtype).replace("torch.", ""), "precision": str(trainer.precision),
            "parameters": sum(q.numel() for q in module.policy.parameters()),
        }

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._t = self._now()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        seconds = self._now() - self._t
        if batch.step >= TRAIN_WARMUP_STEPS:
            self.train.setdefault(int(batch.response_mask.sum()), []).append(seconds)


# -- the command ---------------------------------------------------------------------------------
FIXED_ARGS = ("--model.clock.enabled", "false", "--model.warmup", "null", "--trainer.devices", "1",
              "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.limit_val_batches", "0", "--data.eval_size", "1")
"""Appended to the user's arguments (so they win over every ``--config``): see the module docstring."""


@dataclass
class Calibration:
    """The measured costs, their fits and the set-up they were measured on."""

    costs: ClockCosts  # in seconds
    decode: LineFit  # x: live rows
    prefill: LineFit  # x: prompt tokens
    train: LineFit  # x: trained tokens
    swap: list[float]  # seconds per update_weights
    setup: dict[str, Any]
    notes: list[str]
    seconds: float  # wall time of the whole calibration

    def to_yaml(self) -> str:
        """The snippet ``model: {clock: {costs: ...}}`` (composes with ``--config``), the fit
        quality and every measured point above it as comments."""
        import yaml

        s, c = self.setup, self.costs
        K = s["K"]
        lines = [
            "# reclight calibrate: the simulated clock's costs in seconds on this machine (docs/async.md)",
            f"# device {s['device']} (torch threads: {torch.get_num_threads()}), trainer.precision "
            f"{s['precision']}, engine {s['engine_dtype']}, torch {torch.__version__}; {s['parameters']:,} "
            f"parameters, B={s['B']}, K={K}, max_new_tokens={s['max_new_tokens']}, max_inflight={s['max_inflight']}, "
            f"prompts {s['prompt_tokens_mean']} tokens on average; {self.seconds:.0f} s",
            f"# medians of {s['repeats']} training steps per size and {GENERATOR_REPEATS * s['repeats']} of every "
            "other operation (n: the samples of a point)",
        ]

        def block(title: str, fit: LineFit, unit: str) -> None:
            lines.append(f"# {title}: R^2 {fit.r2:.3f}, |residual| {fit.mean_rel_residual:.1%} of the point on "
                         f"average (weighted), {fit.max_rel_residual:.1%} at most; the line charges "
                         f"{fit.total_ratio:.2f} x the measured total")
            lines.append(f"#   {unit:>8}  {'median s':>10}  {'fit s':>10}  n")
            for x, y, n in fit.points:
                lines.append(f"#   {x:>8g}  {y:>10.4g}  {fit.intercept + fit.slope * x:>10.4g}  {n}")

        block(f"decoding step = {self.decode.intercept:.4g} + {self.decode.slope:.4g} * live_rows", self.decode, "rows")
        block(f"first step of one group = {self.prefill.intercept:.4g} + {self.prefill.slope:.4g} * prompt_tokens "
              f"(its intercept, one step of K rows, against decode_a + decode_b * K = "
              f"{c.decode_a + c.decode_b * K:.4g})", self.prefill, "tokens")
        lines.append(f"# weight swap: median {statistics.median(self.swap):.4g} s, range "
                     f"{min(self.swap):.4g} .. {max(self.swap):.4g} over {len(self.swap)}")
        block(f"training step = {self.train.intercept:.4g} + {self.train.slope:.4g} * trained_tokens "
              f"(groups {s['train_groups']})", self.train, "tokens")
        lines += [f"# note: {note}" for note in self.notes]
        body = {"model": {"clock": {"costs": {k: _round(v) for k, v in dataclasses.asdict(c).items()}}}}
        return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)


def _round(x: float) -> float:
    """Four significant digits (the measurement resolves no more)."""
    return float(f"{x:.4g}")


def _positive(value: float, floor: float, name: str, notes: list[str]) -> float:
    if value > 0:
        return value
    notes.append(f"{name}: fitted {value:.3g} s (<= 0: within the noise); set to {floor:.3g} s, as the clock needs > 0")
    return floor


def costs_from(gen: dict[str, Any],
               train: dict[float, list[float]]) -> tuple[ClockCosts, dict[str, LineFit], list[str]]:
    """``(ClockCosts, {decode, prefill, train: LineFit}, notes)`` from the timed points (module docstring)."""
    notes: list[str] = []
    fits = {"decode": fit_line(gen["decode"]), "prefill": fit_line(gen["prefill"]), "train": fit_line(train)}
    d, p, t = fits["decode"], fits["prefill"], fits["train"]
    prefill_b = p.slope
    if prefill_b < 0:
        notes.append(f"prefill_b: fitted {prefill_b:.3g} s per token (< 0: within the noise); set to 0")
        prefill_b = 0.0
    costs = ClockCosts(
        decode_a=_positive(d.intercept, FLOOR_SHARE * min(y for _, y, _ in d.points), "decode_a", notes),
        decode_b=_positive_slope(d, "decode_b", notes),
        prefill_b=prefill_b,
        sync_cost=statistics.median(gen["swap"]),
        train_c=_positive(t.intercept, FLOOR_SHARE * min(y for _, y, _ in t.points), "train_c", notes),
        train_e=_positive_slope(t, "train_e", notes),
    )
    return costs, fits, notes


def calibrate(args: Sequence[str], repeats: int = 5) -> Calibration:
    """Measure the clock's costs for the run ``args`` (``reclight fit`` arguments, without ``fit``)."""
    from reclight.trainer.cli import main as cli_main

    start = time.perf_counter()
    steps = len(planned_steps(train_sizes(1, 1), repeats))
    from unittest import mock

    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the CLI reads ``args``, not this command's own
        cli = cli_main([*args, *FIXED_ARGS, "--trainer.max_steps", str(steps)], run=False)
    name = cli.model.engine_cfg.name
    if name not in ("auto", "fast"):  # known before any model loads; auto is checked once resolved (Probe)
        raise invalid("model.engine.name", name, "fast, or auto where it resolves to fast: the clock's generator "
                      "is the fast engine's continuous batching")
    trainer = cli.trainer
    # The CLI's config-saving callback would write config.yaml into the working folder (no logger here).
    from lightning.pytorch.cli import SaveConfigCallback

    trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, SaveConfigCallback)]
    probe = Probe(repeats)
    trainer.callbacks.append(probe)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    costs, fits, notes = costs_from(probe.generator, probe.train)
    return Calibration(costs=costs, swap=probe.generator["swap"], setup=probe.setup, notes=notes,
                       seconds=time.perf_counter() - start, **fits)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reclight calibrate", allow_abbrev=False,
        description="Measure the simulated clock's costs (model.clock.costs, in seconds) for a run's model, engine "
                    "and this machine; print them as YAML that composes with --config.",
        epilog="Every other argument goes to the trainer's command line as for `reclight fit` (--config FILE, "
               "--model.clock.max_inflight 16, ...). Example: reclight calibrate --config configs/arithmetic.yaml "
               "--out costs.yaml; then reclight fit --config configs/arithmetic.yaml --config costs.yaml "
               "--model.clock.enabled true")
    p.add_argument("--steps", type=int, default=5, help="timed repeats of every measurement (default 5)")
    p.add_argument("--out", default=None, help="also write the YAML to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``reclight calibrate ...``: returns the exit status."""
    parser = _parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.steps < 1:
        parser.error(str(invalid("--steps", args.steps, "an integer >= 1")))
    import contextlib

    try:
        with contextlib.redirect_stdout(sys.stderr):  # the run's own prints; stdout carries only the YAML
            result = calibrate(rest, args.steps)
    except ValueError as err:  # a setting that cannot be calibrated (it names the field)
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    text = result.to_yaml()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
