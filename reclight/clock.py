"""Asynchronous schedules on a simulated clock (docs/algorithms.md section 7): one pure,
deterministic discrete-event schedule shared by the LLM trainer and the bandit bench.

A generator with continuous batching runs beside the trainer. Time is a cost, not seconds:

    decoding step      decode_a + decode_b * live_rows      (live_rows: sequences still decoding)
    admitting a group  prefill_b * prompt_tokens             (one prefill shared by its K samples)
    weight swap        sync_cost (+ prefill_b * re-prefilled tokens with recompute_kv_on_update)
    training step      train_c + train_e * trained_tokens    (sum of the batch's response lengths)

so a run is a pure function of its config, its prompt stream and its generator's lengths.

Events, in time order; at equal times trainer events come first, then generator events; inside
one generator event: swap, retire, admit, decode (section 7.2):

- **Trainer.** :meth:`AsyncClock.step` ``(s)`` is called when the trainer holds theta_s: version
  s is published at T_s (the end of step s - 1's training; T_0 = 0). The trainer takes the first
  B completed groups (completion order, ties by admission index n) that the staleness rule
  keeps, trains for ``train_c + train_e * tokens`` and publishes s + 1 at T_{s+1}.
- **Swap.** ``inflight``: at every generator event, if a newer version is published the
  generator takes the newest (one swap); live sequences go on with the new weights.
  ``drain``: once a newer version is published nothing is admitted; the swap happens at the
  first event at which no sequence is still decoding.
- **Retire.** A group whose K sequences ended in a decode leaves its slot at the next generator
  event; its ``completed_at`` is that event's time (= the end of that decode).
- **Admit.** While a slot is free (a slot holds ONE GROUP), not draining, and the rule allows:
  ``pace`` admits group n only while n < (s + eta + 1) * B, s = the newest published version.
- **Decode.** One token for every live sequence; it records the generator's version g (after
  this event's swap).

Decisions this module takes where the spec is silent:

- A waiting trainer re-checks after every generator event; its batch is formed at that event's
  start time (the retirement time), so it never waits for the rest of that event.
- A generator event that would do nothing (no swap, no retirement, no admission, nothing live)
  makes the generator idle until the next publish. Only ``pace`` can get there (every other
  rule always has a prompt to admit), and then the trainer always has its batch.
- ``drop`` discards, at every batch check of step s, EVERY completed group with s - v_first >
  eta (not only those ahead of the batch: staleness only grows, so they could never be trained),
  so their prompts are requeued as early as possible. In-flight groups are never aborted.
- A discarded prompt's "discards in a row" count is reset when a group of that prompt is
  trained; a prompt whose count reaches ``starve_after`` is reported as starved.
- ``GroupGenerator.release(n, trained)`` is called once per group, when its fate is known:
  ``trained=True`` when it enters a step's batch (during that ``step`` call), ``False`` when it
  is discarded. The backend may free a group's KV cache as soon as ``decode`` reports all its
  samples ended; it must keep what the caller needs to build the batch until released as trained.
- ``max_staleness: null`` under ``pace`` or ``drop`` means unbounded (the same schedule as
  ``none``), so one sweep over eta can include "unbounded"; under ``none`` eta is ignored.

Which staleness can a trained token reach under ``pace`` (proved in docs/async.md, tested in
``tests/core/test_clock.py``)? Admission gives v_first >= floor(n / B) - eta for group n. When
group n completes, with c_n versions published by then, fewer than (c_n + eta + 1) B groups
were admitted and at least c_n B trained, so n is trained at a step <= c_n + eta. Hence

    staleness(n) = s_train - v_first <= eta + (c_n - v_first)        (c_n - v_first: the versions
                                                                       published while n decoded)

- ``drain``: the trainer cannot get past step v_first + eta without n (no admission until n is
  done), so staleness <= eta, and it is reached; every token of a group has one version.
- ``inflight``: the bound is eta + the versions published during n's decoding, which is only
  bounded by its length and the costs (publishes are at least ``train_c`` apart): with eta = 1 a
  long group among short ones is trained with staleness above 1. Completion order reorders.

Guards: a step that needs more than ``max_events_per_step`` generator events (default
``MAX_EVENTS_PER_STEP``), a generator idle while the trainer waits, or a generator that breaks
the protocol (a sequence that never ends, wrong group keys) raise ``RuntimeError`` naming the
settings, instead of looping forever.

Imports only the standard library and ``reclight.checks``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from reclight.checks import check_bool, check_choice, check_float, check_int, invalid

WEIGHT_UPDATES = ("inflight", "drain")
STALENESS_RULES = ("none", "pace", "drop")
_ACC_KEYS = ("swaps", "recomputed_tokens", "admitted", "paced", "drain_blocked", "discarded", "requeued", "events",
             "generator_idle")
"""The generator's counters of one step (:meth:`AsyncClock.step`) or of one interval between two
batches (:meth:`AsyncClock.form`)."""
MAX_EVENTS_PER_STEP = 100_000
"""Generator events one :meth:`AsyncClock.step` may run before it declares the schedule stuck."""
PREFIX = "model.clock."
"""Errors name fields as typed on the trainer's command line."""


@dataclass(frozen=True)
class ClockCosts:
    """The cost model of the simulated clock (docs/algorithms.md section 7.1), in one arbitrary time unit."""

    decode_a: float = 1.0
    """Fixed cost of one decoding step of the generator (> 0)."""
    decode_b: float = 0.02
    """Cost per live sequence (row) of one decoding step (> 0)."""
    prefill_b: float = 0.0
    """Cost per prompt token of admitting a group (one prefill shared by its K samples), and per
    re-prefilled token with ``recompute_kv_on_update`` (>= 0)."""
    sync_cost: float = 0.0
    """Cost of one weight swap into the generator (>= 0)."""
    train_c: float = 4.0
    """Fixed cost of one training step (> 0)."""
    train_e: float = 0.002
    """Cost per trained token of one training step (> 0)."""
    field_prefix: ClassVar[str] = PREFIX + "costs."
    """How errors name the fields (a subclass used by another command line may change it)."""

    def __post_init__(self) -> None:
        f = self.field_prefix
        for name in ("decode_a", "decode_b", "train_c", "train_e"):
            object.__setattr__(self, name, check_float(f + name, getattr(self, name), gt=0))
        for name in ("prefill_b", "sync_cost"):
            object.__setattr__(self, name, check_float(f + name, getattr(self, name), ge=0))

    def decode(self, live_rows: int) -> float:
        """Cost of one decoding step with ``live_rows`` sequences still decoding."""
        return self.decode_a + self.decode_b * live_rows

    def train(self, tokens: int) -> float:
        """Cost of one training step on ``tokens`` response tokens."""
        return self.train_c + self.train_e * tokens


@dataclass(frozen=True)
class ClockConfig:
    """The asynchronous schedule (docs/algorithms.md section 7); the trainer's ``model.clock`` group."""

    enabled: bool = False
    """Run the asynchronous schedule (false: section 4's ``sync`` schedule, unchanged)."""
    max_inflight: int = 8
    """Slots of the generator; a slot holds ONE GROUP (its K sequences decode together)."""
    weight_update: Literal["inflight", "drain"] = "inflight"
    """``inflight``: live sequences take a newly published version at the next decoding step;
    ``drain``: stop admitting, finish what is in flight, then swap."""
    recompute_kv_on_update: bool = False
    """``inflight`` only: rebuild the live sequences' KV cache with the new weights at a swap
    (re-prefill, costs ``prefill_b`` per token) instead of keeping the old entries."""
    staleness: Literal["none", "pace", "drop"] = "pace"
    """``none``: no bound; ``pace``: admit group n only while n < (s + eta + 1) * B;
    ``drop``: discard completed groups whose oldest token is more than eta versions old."""
    max_staleness: int | None = 1
    """eta >= 0 of ``pace`` and ``drop``; null = unbounded (the schedule of ``none``)."""
    requeue: bool = True
    """``drop`` only: a discarded group's prompt goes back to the stream (after the current
    epoch's remaining prompts), as a new admission with new samples."""
    starve_after: int = 3
    """A prompt discarded this many times in a row is reported as starved (>= 1)."""
    costs: ClockCosts = field(default_factory=ClockCosts)
    """The cost model."""

    def __post_init__(self) -> None:
        f = PREFIX
        check_bool(f + "enabled", self.enabled)
        check_int(f + "max_inflight", self.max_inflight, minimum=1,
                  accepted="an integer >= 1 (slots; a slot holds one group of K samples)")
        check_choice(f + "weight_update", self.weight_update, WEIGHT_UPDATES)
        check_bool(f + "recompute_kv_on_update", self.recompute_kv_on_update)
        check_choice(f + "staleness", self.staleness, STALENESS_RULES)
        check_int(f + "max_staleness", self.max_staleness, minimum=0, allow_none=True)
        check_bool(f + "requeue", self.requeue)
        check_int(f + "starve_after", self.starve_after, minimum=1)
        if isinstance(self.costs, dict):  # built from a plain mapping (YAML, tests)
            object.__setattr__(self, "costs", ClockCosts(**self.costs))
        if not isinstance(self.costs, ClockCosts):
            raise invalid(f + "costs", self.costs, "a ClockCosts or a mapping of its fields")
        if self.recompute_kv_on_update and self.weight_update == "drain":
            raise invalid(f + "recompute_kv_on_update", True,
                          "false with weight_update 'drain' (drain swaps with nothing in flight: there is no "
                          "cache to rebuild); set weight_update: inflight")

    @property
    def eta(self) -> int | None:
        """The staleness bound in force (None: unbounded)."""
        return None if self.staleness == "none" else self.max_staleness

    def check_against(self, groups_per_step: int, group_size: int) -> None:
        """Refuse a combination with B groups per step and K samples per group that cannot run.

        Slots are groups, so any ``max_inflight`` >= 1 fits any K; ``pace`` always leaves the
        trainer (eta + 1) B admissible groups; ``drop`` always ends: while the trainer waits no
        version is published, so every group admitted after the generator's next swap is fresh.
        What remains to refuse is a batch or group size below 1."""
        check_int("groups_per_step", groups_per_step, minimum=1)
        check_int("group_size", group_size, minimum=1)

    def max_trained_staleness(self) -> int | None:
        """The largest staleness (s - v) a trained token can reach, when the rule alone bounds it:
        eta under ``drop`` and under ``pace`` with ``drain``; None (bounded only by the lengths
        and costs: eta + the versions published while a group decodes) otherwise."""
        eta = self.eta
        if eta is None or (self.staleness == "pace" and self.weight_update == "inflight"):
            return None
        return eta


class PromptStream:
    """The prompts in admission order: an infinite base order plus the requeued prompts.

    ``order(i)`` is the prompt of base position i = 0, 1, 2, ... (e.g. a permutation of the
    train split per epoch of ``epoch_size`` prompts). ``requeue(p)`` puts p back "at the end of
    the stream", defined for an infinite stream as: after the remaining base prompts of the
    current epoch, before the next epoch's first. Requeued prompts are served first-in
    first-out whenever the base position sits on an epoch boundary; a prompt requeued while
    others are being served at that boundary joins them (still before the next epoch).
    """

    def __init__(self, order: Callable[[int], int], epoch_size: int) -> None:
        self.order = order
        self.epoch_size = check_int("epoch_size", epoch_size, minimum=1)
        self.position = 0
        self.pending: list[int] = []
        self.served = 0

    @classmethod
    def cyclic(cls, n_prompts: int) -> "PromptStream":
        """Prompts 0, 1, ..., n - 1, 0, 1, ... (epochs in index order)."""
        n = check_int("n_prompts", n_prompts, minimum=1)
        return cls(lambda i: i % n, n)

    @classmethod
    def shuffled(cls, n_prompts: int, seed: int) -> "PromptStream":
        """Each epoch a permutation of 0..n-1 drawn from (seed, epoch) alone."""
        return cls(EpochPermutation(n_prompts, seed), n_prompts)

    def next(self) -> int:
        """The prompt of the next admission."""
        self.served += 1
        if self.pending and self.position % self.epoch_size == 0:
            return self.pending.pop(0)
        prompt = int(self.order(self.position))
        self.position += 1
        return prompt

    def requeue(self, prompt: int) -> None:
        """Serve ``prompt`` again after the current epoch's remaining base prompts."""
        self.pending.append(int(prompt))

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "pending": list(self.pending), "served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.pending, self.served = int(state["position"]), list(state["pending"]), int(state["served"])


class EpochPermutation:
    """``order(i)`` of :meth:`PromptStream.shuffled`: epoch e is ``random.Random(f"{seed}:{e}")``'s
    shuffle of range(n) (string seeds are hashed with SHA-512: stable across platforms)."""

    def __init__(self, n_prompts: int, seed: int) -> None:
        self.n = check_int("n_prompts", n_prompts, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self._epoch, self._perm = -1, list(range(self.n))

    def __call__(self, i: int) -> int:
        epoch = i // self.n
        if epoch != self._epoch:
            self._perm = list(range(self.n))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._perm)
            self._epoch = epoch
        return self._perm[i % self.n]


@runtime_checkable
class GroupGenerator(Protocol):
    """What the clock drives: the LLM engine, or an emulation that only knows lengths."""

    def admit(self, n: int, prompt: int) -> int:
        """Start group n (admission index) on ``prompt``, K samples, with the weights it holds;
        its sampling noise is seeded by (run seed, n, rank). Returns the prompt's token count."""
        ...

    def decode(self) -> dict[int, list[bool]]:
        """One decoding step of every live sequence; returns ``{n: ended flags [K] after the
        step}`` for every group that was live before it."""
        ...

    def swap(self, version: int, recompute_kv: bool) -> int:
        """Take the trainer's newest published weights (= ``version``); returns the number of
        tokens re-prefilled (0 unless ``recompute_kv``)."""
        ...

    def release(self, n: int, trained: bool) -> None:
        """Group n's fate: in a batch (``trained``) or discarded."""
        ...


@dataclass
class GroupRecord:
    """One admitted group, as the clock saw it."""

    n: int
    """Admission index."""
    prompt: int
    admitted_at: float
    completed_at: float | None = None
    """Time it left its slot (None while in flight)."""
    token_versions: list[int] = field(default_factory=list)
    """Version of the weights at each of the group's decoding steps: token t of every sample
    has version ``token_versions[t]``."""
    lengths: list[int] = field(default_factory=list)
    """Per-sample response length in tokens, K entries (0 while the sample is still decoding)."""
    prompt_tokens: int = 0
    """What ``GroupGenerator.admit`` returned (the prefill it cost)."""
    prompt_discards: int = 0
    """How many times in a row this prompt had been discarded when this group was admitted."""
    trained_step: int | None = None
    discarded_step: int | None = None

    @property
    def done(self) -> bool:
        """Every sample has ended."""
        return bool(self.lengths) and all(length > 0 for length in self.lengths)

    @property
    def first_version(self) -> int:
        return self.token_versions[0]

    @property
    def last_versions(self) -> list[int]:
        """Version of each sample's last token."""
        return [self.token_versions[length - 1] for length in self.lengths]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def staleness(self, step: int) -> int:
        """The group's staleness when trained at ``step``: that of its oldest token."""
        return step - self.first_version

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "GroupRecord":
        return cls(**{k: (list(v) if isinstance(v, list) else v) for k, v in state.items()})


@dataclass
class StepPlan:
    """What training step ``step`` trains, and the clock's account of its window [T_s, T_{s+1})."""

    step: int
    groups: list[GroupRecord]
    """The B trained groups in batch order (completion order, ties by admission index)."""
    metrics: dict[str, float]
    """docs/algorithms.md section 7.4, under ``async/`` (see :func:`step_metrics`)."""
    published_at: float = 0.0
    """T_s: version s published, the trainer free."""
    train_start: float = 0.0
    """When the batch was formed (T_s + the trainer's wait)."""
    train_end: float = 0.0
    """T_{s+1}: version s + 1 published."""
    discarded: list[GroupRecord] = field(default_factory=list)
    """Groups discarded (``drop``) while this batch was formed."""


class AsyncClock:
    """The discrete-event schedule of docs/algorithms.md section 7 (rules in the module docstring).

    Args:
        cfg: the schedule.
        groups_per_step: B, groups per training step.
        group_size: K, samples per group.
        stream: the prompts in admission order (the clock owns its position from now on and
            saves it in :meth:`state_dict`).
        generator: the backend (its own state, e.g. KV caches, is the caller's to checkpoint).
        max_events_per_step: guard against a schedule that makes no progress.
        record_events: keep a list of every event in ``self.events`` (for tests and timelines).
    """

    def __init__(self, cfg: ClockConfig, groups_per_step: int, group_size: int, stream: PromptStream,
                 generator: GroupGenerator, *, max_events_per_step: int = MAX_EVENTS_PER_STEP,
                 record_events: bool = False) -> None:
        cfg.check_against(groups_per_step, group_size)
        self.cfg, self.costs = cfg, cfg.costs
        self.B, self.K = int(groups_per_step), int(group_size)
        self.stream, self.generator = stream, generator
        self.max_events_per_step = check_int("max_events_per_step", max_events_per_step, minimum=1)
        self.events: list[dict[str, Any]] | None = [] if record_events else None
        self.next_step = 0
        self.published = -1  # newest published version
        self.train_end = 0.0  # T_{next_step}
        self.gen_version = 0  # g: the generator starts with theta_0
        self.gen_time = 0.0  # start of the generator's next event
        self.next_n = 0
        self.live: dict[int, GroupRecord] = {}
        self.completed: list[GroupRecord] = []
        self.streak: dict[int, int] = {}
        self.totals = {"trainer_idle": 0.0, "generator_idle": 0.0, "completed_samples": 0, "completed_tokens": 0,
                       "trained_samples": 0, "trained_tokens": 0, "discarded": 0, "requeued": 0}
        self._acc: dict[str, float] = dict.fromkeys(_ACC_KEYS, 0.0)
        self._now = 0.0  # time of the trainer's current batch check

    # ---- events ----------------------------------------------------------------------------

    def _log(self, kind: str, **details: Any) -> None:
        if self.events is not None:
            self.events.append({"kind": kind, **details})

    def _generator_event(self) -> str:
        """Run one generator event at ``gen_time``. Returns ``"idle"`` (nothing to do: the
        generator waits for the next publish), ``"retired"`` or ``"busy"``."""
        t, cfg, newest = self.gen_time, self.cfg, self.published
        duration, did = 0.0, False
        decoding = any(not rec.done for rec in self.live.values())
        if newest > self.gen_version and (cfg.weight_update == "inflight" or not decoding):
            recompute = cfg.recompute_kv_on_update and decoding
            tokens = int(self.generator.swap(newest, recompute))
            duration += self.costs.sync_cost + self.costs.prefill_b * tokens
            self.gen_version, did = newest, True
            self._acc["swaps"] += 1
            self._acc["recomputed_tokens"] += tokens
            self._log("swap", t=t, version=newest, tokens=tokens)
        retired = sorted((rec for rec in self.live.values() if rec.done), key=lambda r: r.n)
        for rec in retired:
            del self.live[rec.n]
            rec.completed_at = t
            self.completed.append(rec)
            self.totals["completed_samples"] += self.K
            self.totals["completed_tokens"] += rec.tokens
            self._log("retire", t=t, n=rec.n)
        did = did or bool(retired)
        eta = cfg.eta
        while len(self.live) < cfg.max_inflight:
            if newest > self.gen_version:  # drain: finish what is in flight first
                self._acc["drain_blocked"] += 1
                break
            if cfg.staleness == "pace" and eta is not None and self.next_n >= (newest + eta + 1) * self.B:
                self._acc["paced"] += 1
                break
            n, prompt = self.next_n, self.stream.next()
            tokens = int(self.generator.admit(n, prompt))
            self.live[n] = GroupRecord(n=n, prompt=prompt, admitted_at=t, lengths=[0] * self.K, prompt_tokens=tokens,
                                       prompt_discards=self.streak.get(prompt, 0))
            self.next_n += 1
            duration += self.costs.prefill_b * tokens
            did = True
            self._acc["admitted"] += 1
            self._log("admit", t=t, n=n, prompt=prompt, version=self.gen_version)
        if self.live:
            rows = sum(1 for rec in self.live.values() for length in rec.lengths if length == 0)
            ended = self.generator.decode()
            if set(ended) != set(self.live):
                raise RuntimeError(f"the generator's decode() answered for groups {sorted(ended)}; expected every "
                                   f"live group {sorted(self.live)} (GroupGenerator protocol)")
            for n, rec in self.live.items():
                rec.token_versions.append(self.gen_version)
                flags = ended[n]
                if len(flags) != self.K:
                    raise RuntimeError(f"decode() gave {len(flags)} ended flags for group {n}; expected K = {self.K}")
                for k, flag in enumerate(flags):
                    if rec.lengths[k] and not flag:
                        raise RuntimeError(f"decode() reopened sample {k} of group {n}, which had ended")
                    if flag and not rec.lengths[k]:
                        rec.lengths[k] = len(rec.token_versions)
            duration += self.costs.decode(rows)
            did = True
            self._log("decode", t=t, rows=rows, version=self.gen_version, groups=list(self.live))
        if not did:
            return "idle"
        self._acc["events"] += 1
        self.gen_time = t + duration
        return "retired" if retired else "busy"

    def _form_batch(self, step: int, plan_discarded: list[GroupRecord]) -> list[GroupRecord] | None:
        """Apply the staleness rule to the completed groups, then take the first B (or None)."""
        eta = self.cfg.eta
        if self.cfg.staleness == "drop" and eta is not None:
            kept = []
            for rec in self.completed:
                if rec.staleness(step) <= eta:
                    kept.append(rec)
                    continue
                rec.discarded_step = step
                self.streak[rec.prompt] = self.streak.get(rec.prompt, 0) + 1
                self.generator.release(rec.n, False)
                plan_discarded.append(rec)
                self._acc["discarded"] += 1
                self.totals["discarded"] += 1
                if self.cfg.requeue:
                    self.stream.requeue(rec.prompt)
                    self._acc["requeued"] += 1
                    self.totals["requeued"] += 1
                self._log("discard", t=self._now, n=rec.n, step=step, requeued=self.cfg.requeue)
            self.completed = kept
        if len(self.completed) < self.B:
            return None
        batch, self.completed = self.completed[: self.B], self.completed[self.B:]
        for rec in batch:
            rec.trained_step = step
            self.streak.pop(rec.prompt, None)
            self.generator.release(rec.n, True)
        return batch

    def _stuck(self, step: int, why: str) -> RuntimeError:
        c = self.cfg
        return RuntimeError(
            f"the asynchronous schedule makes no progress at step {step}: {why} (model.clock: staleness="
            f"{c.staleness}, max_staleness={c.max_staleness}, weight_update={c.weight_update}, max_inflight="
            f"{c.max_inflight}, requeue={c.requeue}; B={self.B}, K={self.K}; {len(self.live)} groups in flight, "
            f"{len(self.completed)} completed)")

    def _check_next(self, s: int) -> None:
        if s != self.next_step:
            raise ValueError(f"step={s!r} is not valid; accepted: {self.next_step} (steps are called in order)")

    def _publish_and_form(self, s: int, t_publish: float) -> tuple[list[GroupRecord], list[GroupRecord], int]:
        """Publish version s at ``t_publish``, then run generator events until B completed groups
        pass the staleness rule: (the batch, the groups discarded meanwhile, the events run)."""
        self.published = s
        self._log("publish", t=t_publish, version=s)
        self._now = t_publish
        discarded: list[GroupRecord] = []
        batch = self._form_batch(s, discarded)
        events = 0
        while batch is None:
            if events >= self.max_events_per_step:
                raise self._stuck(s, f"more than {self.max_events_per_step} generator events while the trainer waits "
                                     "(does every sequence end?)")
            self._now = self.gen_time
            if self._generator_event() == "idle":
                raise self._stuck(s, "the generator has nothing to do while the trainer waits")
            events += 1
            batch = self._form_batch(s, discarded)
        return batch, discarded, events

    # ---- the trainer's call ----------------------------------------------------------------

    def step(self, s: int, on_batch: Callable[[list[GroupRecord]], None] | None = None) -> StepPlan:
        """Training step ``s`` (0, 1, 2, ... in order), called when the trainer holds theta_s.

        Publishes version s at T_s, runs generator events until B groups pass the staleness
        rule, charges the training cost, runs every generator event that starts strictly before
        T_{s+1}, and returns the plan. Every ``generator.swap`` made here takes a version <= s.
        ``on_batch(groups)``, if given, is called as soon as the batch is formed, before the
        events of the training window: a rollout worker hands the batch to the trainer there and
        generates the window's events while the trainer trains (docs/async.md, "Rollout workers")."""
        self._check_next(s)
        self._acc = dict.fromkeys(_ACC_KEYS, 0.0)
        t_publish = self.train_end
        batch, discarded, events = self._publish_and_form(s, t_publish)
        if on_batch is not None:
            on_batch(batch)
        train_start = self._now
        tokens = sum(rec.tokens for rec in batch)
        train_end = train_start + self.costs.train(tokens)
        self._log("train", t=train_start, end=train_end, step=s, groups=[rec.n for rec in batch])
        while self.gen_time < train_end:
            if events >= self.max_events_per_step:
                raise self._stuck(s, f"more than {self.max_events_per_step} generator events in one step")
            if self._generator_event() == "idle":
                self._acc["generator_idle"] += train_end - self.gen_time
                self._log("idle", t=self.gen_time, until=train_end)
                self.gen_time = train_end
                break
            events += 1
        self.totals["trainer_idle"] += train_start - t_publish
        self.totals["generator_idle"] += self._acc["generator_idle"]
        self.totals["trained_samples"] += self.B * self.K
        self.totals["trained_tokens"] += tokens
        self.train_end = train_end
        self.next_step = s + 1
        plan = StepPlan(step=s, groups=batch, metrics={}, published_at=t_publish, train_start=train_start,
                        train_end=train_end, discarded=discarded)
        plan.metrics = self._metrics(plan)
        return plan

    # ---- the real clock (a free rollout worker, reclight/rollout/workers.py) ------------------

    def form(self, s: int) -> StepPlan:
        """Free mode: the trainer holds theta_s NOW (the real clock decides when). Publishes
        version s at the generator's current time and runs generator events until B groups pass
        the staleness rule (as :meth:`step` does), but charges no training cost and runs no
        window: the caller runs :meth:`event` until the trainer's next request, however long
        the training takes for real. The staleness rule, the swaps (taking the newest published
        version) and the per-token versions are the paced schedule's rules; only the times differ.

        The plan's metrics are :func:`step_metrics` of the batch and the generator's counters
        since the previous batch was formed (its window events included): the interval a free
        worker can account for when it hands over a batch. The simulated times (``async/clock``
        and the idle fractions) are not reported: they would describe no real run."""
        self._check_next(s)
        t_publish = self.gen_time
        batch, discarded, _ = self._publish_and_form(s, t_publish)
        tokens = sum(rec.tokens for rec in batch)
        self._log("train", t=self._now, end=self._now, step=s, groups=[rec.n for rec in batch])
        self.totals["trained_samples"] += self.B * self.K
        self.totals["trained_tokens"] += tokens
        self.train_end = self._now
        self.next_step = s + 1
        plan = StepPlan(step=s, groups=batch, metrics={}, published_at=t_publish, train_start=self._now,
                        train_end=self._now, discarded=discarded)
        plan.metrics = self._counter_metrics(plan)
        self._acc = dict.fromkeys(_ACC_KEYS, 0.0)
        return plan

    def event(self) -> bool:
        """Free mode: one generator event of the time the trainer trains (swap to the newest
        published version, retire, admit, decode). False: nothing to do until the next publish."""
        return self._generator_event() != "idle"

    def _counter_metrics(self, plan: StepPlan) -> dict[str, float]:
        """The metrics that hold on any clock: the batch's staleness and lengths, the rule's
        discards, the generator's counters, the backlog."""
        tot = self.totals
        m = step_metrics(plan.groups, plan.step)
        m.update({
            "async/discarded": self._acc["discarded"],
            "async/requeued": self._acc["requeued"],
            "async/starved": float(sum(1 for c in self.streak.values() if c >= self.cfg.starve_after)),
            "async/discard_streak_max": float(max(self.streak.values(), default=0)),
            "async/discarded_total": float(tot["discarded"]),
            "async/admitted": self._acc["admitted"],
            "async/paced": self._acc["paced"],
            "async/drain_blocked": self._acc["drain_blocked"],
            "async/swaps": self._acc["swaps"],
            "async/recomputed_tokens": self._acc["recomputed_tokens"],
            "async/generator_events": self._acc["events"],
            "async/inflight": float(len(self.live)),
            "async/backlog": float(len(self.completed)),
            "async/completed_len_mean": tot["completed_tokens"] / max(tot["completed_samples"], 1),
            "async/trained_len_mean_run": tot["trained_tokens"] / max(tot["trained_samples"], 1),
        })
        return m

    def _metrics(self, plan: StepPlan) -> dict[str, float]:
        window = plan.train_end - plan.published_at
        tot = self.totals
        m = self._counter_metrics(plan)
        m.update({
            "async/trainer_wait": plan.train_start - plan.published_at,
            "async/trainer_idle_frac": (plan.train_start - plan.published_at) / window,
            "async/generator_idle_frac": self._acc["generator_idle"] / window,
            "async/trainer_idle_frac_total": tot["trainer_idle"] / plan.train_end,
            "async/generator_idle_frac_total": tot["generator_idle"] / plan.train_end,
            "async/clock": plan.train_end,
        })
        return m

    # ---- checkpoint ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain Python (ints, floats, strings, lists, dicts): restores the schedule exactly. The
        generator's own state and ``events`` (a debugging record) are not part of it."""
        return {
            "config": dataclasses.asdict(self.cfg), "groups_per_step": self.B, "group_size": self.K,
            "next_step": self.next_step, "published": self.published, "train_end": self.train_end,
            "gen_version": self.gen_version, "gen_time": self.gen_time, "next_n": self.next_n,
            "live": [rec.to_dict() for rec in self.live.values()],
            "completed": [rec.to_dict() for rec in self.completed],
            "streak": [[p, c] for p, c in self.streak.items()], "totals": dict(self.totals),
            "stream": self.stream.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state saved under another schedule."""
        saved = state["config"]
        mine = dataclasses.asdict(self.cfg)
        for key in mine:
            if saved.get(key) != mine[key]:
                raise ValueError(f"{PREFIX}{key}={mine[key]!r} differs from the checkpoint's {saved.get(key)!r}; "
                                 "accepted: the schedule the run was saved with")
        if (state["groups_per_step"], state["group_size"]) != (self.B, self.K):
            raise ValueError(f"(groups_per_step, group_size)={(self.B, self.K)} differs from the checkpoint's "
                             f"{(state['groups_per_step'], state['group_size'])}")
        self.next_step, self.published = int(state["next_step"]), int(state["published"])
        self.train_end, self.gen_version = float(state["train_end"]), int(state["gen_version"])
        self.gen_time, self.next_n = float(state["gen_time"]), int(state["next_n"])
        self.live = {d["n"]: GroupRecord.from_dict(d) for d in state["live"]}
        self.completed = [GroupRecord.from_dict(d) for d in state["completed"]]
        self.streak = {int(p): int(c) for p, c in state["streak"]}
        self.totals = dict(state["totals"])
        self.stream.load_state_dict(state["stream"])


def step_metrics(groups: Sequence[GroupRecord], step: int) -> dict[str, float]:
    """Staleness and length metrics of the groups trained at ``step`` (docs/algorithms.md section 7.4):

    - ``staleness_mean`` / ``staleness_max``: s - v over trained tokens (token t of sample k has
      version ``token_versions[t]``);
    - ``age_mean``: s - v_first per sample (a trajectory's age: its oldest token), mean over
      samples; ``age_token_weighted``: the same weighted by each sample's length;
    - ``versions_spanned_mean`` / ``_max``: v_last - v_first + 1 per sample;
    - ``trained_len_mean``: mean response length of the trained samples."""
    tok = stale_sum = stale_max = age_sum = age_tok = span_sum = span_max = samples = 0
    for rec in groups:
        for length in rec.lengths:
            versions = rec.token_versions[:length]
            age = step - versions[0]
            span = versions[-1] - versions[0] + 1
            stale_sum += sum(step - v for v in versions)
            stale_max = max(stale_max, age)
            tok += length
            samples += 1
            age_sum += age
            age_tok += age * length
            span_sum += span
            span_max = max(span_max, span)
    return {
        "async/staleness_mean": stale_sum / tok, "async/staleness_max": float(stale_max),
        "async/age_mean": age_sum / samples, "async/age_token_weighted": age_tok / tok,
        "async/versions_spanned_mean": span_sum / samples, "async/versions_spanned_max": float(span_max),
        "async/trained_len_mean": tok / samples,
    }


class ScriptedGenerator:
    """A :class:`GroupGenerator` that knows lengths only (no model): sample k of group n ends
    after ``lengths(n, prompt)[k]`` tokens. For the bench (lengths by prompt), the tests and
    :func:`synchronous_clock`. A swap with ``recompute_kv`` re-prefills, per live group, its
    prompt once plus the generated tokens of each sequence still decoding."""

    def __init__(self, lengths: Callable[[int, int], Sequence[int]],
                 prompt_tokens: Callable[[int], int] = lambda prompt: 1) -> None:
        self.lengths, self.prompt_tokens = lengths, prompt_tokens
        self.live: dict[int, list[int]] = {}  # n -> [steps decoded, target length per sample...]
        self.version = 0
        self.released: dict[int, bool] = {}

    def admit(self, n: int, prompt: int) -> int:
        target = [int(x) for x in self.lengths(n, prompt)]
        if not target or min(target) < 1:
            raise ValueError(f"lengths({n}, {prompt})={target!r} is not valid; accepted: K integers >= 1")
        self.live[n] = [0, int(self.prompt_tokens(prompt))] + target
        return self.live[n][1]

    def decode(self) -> dict[int, list[bool]]:
        out = {}
        for n, state in self.live.items():
            if any(state[0] < length for length in state[2:]):  # live: a sample still decoding
                state[0] += 1
                out[n] = [state[0] >= length for length in state[2:]]
        return out

    def swap(self, version: int, recompute_kv: bool) -> int:
        self.version = version
        if not recompute_kv:
            return 0
        tokens = 0
        for state in self.live.values():
            decoding = [length for length in state[2:] if state[0] < length]
            if decoding:
                tokens += state[1] + state[0] * len(decoding)
        return tokens

    def release(self, n: int, trained: bool) -> None:
        self.live.pop(n, None)
        self.released[n] = trained

    def state_dict(self) -> dict[str, Any]:
        return {"live": [[n, list(s)] for n, s in self.live.items()], "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.live = {int(n): list(s) for n, s in state["live"]}
        self.version = int(state["version"])


def synchronous_clock(costs: ClockCosts, batches: Iterable[Sequence[GroupRecord | tuple[int, Sequence[int]]]],
                      max_inflight: int | None = None) -> float:
    """The clock total of the synchronous on-policy loop (``pace``, eta = 0, ``drain``,
    ``max_inflight`` = B unless given) training the given batches with the same costs: the
    denominator of the emulated speedup. A batch is B groups, each a :class:`GroupRecord` or
    ``(prompt_tokens, lengths)``. Runs the clock itself, so it follows exactly the same rules;
    with ``max_inflight`` = B a step costs ``[sync_cost] + prefill_b * prompt tokens +
    sum_t (decode_a + decode_b * #samples longer than t) + train_c + train_e * tokens``."""
    scripts = [[(g.prompt_tokens, list(g.lengths)) if isinstance(g, GroupRecord) else (int(g[0]), list(g[1]))
                for g in batch] for batch in batches]
    if not scripts:
        return 0.0
    b, k = len(scripts[0]), len(scripts[0][0][1])
    flat = [g for batch in scripts for g in batch]
    if any(len(batch) != b for batch in scripts) or any(len(g[1]) != k for g in flat):
        raise ValueError("every batch needs the same number of groups B and every group the same K")
    cfg = ClockConfig(enabled=True, max_inflight=max_inflight or b, weight_update="drain", staleness="pace",
                      max_staleness=0, costs=costs)
    gen = ScriptedGenerator(lambda n, prompt: flat[n][1], lambda prompt: flat[prompt][0])
    clock = AsyncClock(cfg, b, k, PromptStream(lambda i: i, len(flat)), gen)
    plan = None
    for s in range(len(scripts)):
        plan = clock.step(s)
    return plan.train_end


def emulated_speedup(plans: Sequence[StepPlan], costs: ClockCosts) -> float:
    """Synchronous clock total of the same batches / this run's clock total (> 1: faster)."""
    return synchronous_clock(costs, [p.groups for p in plans]) / plans[-1].train_end
