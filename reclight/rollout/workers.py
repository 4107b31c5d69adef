"""Rollout workers: the asynchronous schedule's generation in its own process, while the trainer
trains (``model.rollout``, docs/async.md "Rollout workers").

With ``model.rollout.workers: 1`` the whole :class:`~reclight.rollout.async_queue.AsyncRolloutQueue`
(the clock, the continuous-batching engine, the prompt stream, the scored groups) moves into one
process started with torch's ``spawn`` context, and the trainer keeps :class:`WorkerRolloutQueue`,
a proxy with the queue's interface. ``paced`` mode: the worker runs the very code of the
in-process queue, so its batches, and the weights trained on them, are bitwise those of the
in-process run at the same threads per role.

The protocol of one step s (the trainer holds theta_s):

1. the trainer copies theta_s into shared-memory tensors (one set, written in place; the worker
   reads them only between 2 and 4 below, when the trainer does not write) and asks for step s
   on a torch multiprocessing queue;
2. the worker runs ``AsyncClock.step(s)``: generator events until the batch is formed, which it
   sends back at once (tensors travel in shared memory through torch's multiprocessing pickler);
3. the trainer trains step s while the worker runs the rest of the step: the clock's training
   window, where the emulated generator makes the next batches with weights <= theta_s. This
   is the overlap; a step costs ``phase 1 + max(training, phase 2)`` instead of their sum;
4. the worker reports the step done with its ``async/`` metrics (known only at the end of the
   window) and its memory; the trainer logs them with step s (it waits for them before logging:
   it would wait for them at step s + 1 anyway, since step s + 1 needs theta_{s+1}).

The worker is *quiesced* between 4 and the next request: nothing runs there, so its
``state_dict`` (asked at a checkpoint, after 4) is exactly the in-process queue's after step s
and a resume from it is exact; no generation is lost or redone because nothing is in flight
outside the state (the in-flight groups and their KV cache are part of it, as in-process).

``free`` mode (``model.rollout.mode: free``): the real clock decides. Step s: the trainer writes
theta_s into weight set s % 2 and asks for step s; the worker publishes version s at once
(``AsyncClock.form``: no simulated training cost), forms the batch from what it has (the same
staleness rule and completion order) and sends it with the ``async/`` metrics of the interval
since the previous batch; then it runs generator events (swap to the newest version, retire,
admit, decode) until the next request arrives, looking for one between two events; with
nothing to do (the rule or the drain holds it) it blocks on the next request. Two weight sets
because the worker may still swap theta_s in while the trainer trains step s; it reads set
s % 2 only while s is the newest version, and the trainer writes that set again (theta_{s+2})
only after asking for step s + 1, which the worker sees between events. A state asked for is
taken between two events, so it is consistent, and the worker then goes on generating. Which
version samples which token depends on the two processes' speeds: the versions are recorded per
token as always, the run is not reproducible.

Faults: the worker beats a shared clock every 0.2 s from a thread; the trainer, while it waits,
checks every 0.5 s that the worker lives and beat within ``heartbeat_s``, else stops the run
with an error naming the worker, its pid, its exit code or silence, and its log. The worker
dies with the trainer (``PR_SET_PDEATHSIG`` and a parent-pid watch), ignores Ctrl-C (the
trainer stops it), and is daemonic (multiprocessing ends it when the trainer exits). Its output
goes to ``<run folder>/rollout-worker-0.log``.

Data parallel: one worker per rank (each rank has its own clock), talking to its rank only
through shared memory and torch multiprocessing queues: no process group, so Lightning's default
group is left to the ranks. A sharded (FSDP) policy is refused (not built).

Departures from the in-process queue: ``async/`` metrics are the same, plus
``rollout/worker_rss_mib`` (the worker's resident memory), ``rollout/worker_wait_s`` (the
trainer's wait for the step-end message), ``rollout/worker_batch_s`` and ``rollout/worker_window_s``
(the worker's time until the batch was formed, and in the training window's events),
``rollout/worker_cpu_s`` (its CPU time in the step);
``rollout/wait_s`` is the trainer's wait for the batch. In ``free`` mode the interval is the one
between two batches: ``rollout/worker_idle_s`` (the worker blocked with nothing to do),
``rollout/worker_batch_s``, ``rollout/worker_cpu_s``; the simulated times (``async/clock``,
``async/trainer_wait``, the idle fractions, ``async/sync_clock``, ``async/speedup``) are not
reported.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import queue as queue_lib
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from reclight.checks import check_choice, check_float, check_int, invalid
from reclight.engines.stop import check_stop
from reclight.rollout.batch import RolloutBatch
from reclight.rollout.queue import rollout_seed

PREFIX = "model.rollout."
MODES = ("paced", "free")
POLL_S = 0.5
"""How often the waiting trainer checks the worker (the heartbeat bound is heartbeat_s + this)."""
BEAT_S = 0.2
STARTUP_S = 180.0
"""The bound on a worker's start (a Python process importing torch and unpickling the queue)."""


@dataclass(frozen=True)
class WorkersConfig:
    """Where the asynchronous schedule's rollouts run (``model.rollout``)."""

    workers: int = 0
    """0: in the trainer's process, one thing after another (the emulation). 1: in a worker
    process, concurrent with training. One clock per rank, so one worker per rank at most."""
    mode: Literal["paced", "free"] = "paced"
    """``paced``: the worker follows the simulated clock: batches and weights bitwise those of
    the in-process run (same threads per role). ``free``: the real clock decides (the worker
    generates until the trainer's next request; which versions sample which tokens depends on
    timing), for throughput; the staleness rule and the per-token versions hold, the run is not
    reproducible."""
    device: str | None = None
    """The worker's device; null: the trainer's. Another device than the trainer's is refused
    for now (the engine's state is built on the trainer's device)."""
    heartbeat_s: float = 30.0
    """A worker that died or did not beat for this long stops the run (checked every 0.5 s)."""
    threads: int = 1
    """torch threads of the worker (intra-op)."""

    def __post_init__(self) -> None:
        check_int(PREFIX + "workers", self.workers, minimum=0, maximum=1,
                  accepted="0 (in-process) or 1 (one worker per rank: a rank's clock runs its events one after "
                           "another, so a second worker would have nothing to do)")
        check_choice(PREFIX + "mode", self.mode, MODES)
        if self.mode == "free" and not self.workers:
            raise invalid(PREFIX + "mode", self.mode, "paced with model.rollout.workers 0 (in-process generation "
                          "runs one thing after another: there is no real clock to follow; set workers: 1)")
        check_float(PREFIX + "heartbeat_s", self.heartbeat_s, gt=0.0)
        check_int(PREFIX + "threads", self.threads, minimum=1)
        if self.device is not None:
            check_device(PREFIX + "device", self.device)


def check_device(field: str, value: Any) -> torch.device:
    """A device of this machine: ``cpu``, or ``cuda[:i]`` with i < the number of GPUs."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise invalid(field, value, "null, cpu or cuda:<i> (a torch device)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) < count:
            return device
        raise invalid(field, value, f"null, cpu or cuda:<i> with i < {count} (this machine has {count} GPU(s))")
    raise invalid(field, value, "null, cpu or cuda:<i>")


def check_workers_settings(rollout: WorkersConfig, clock_enabled: bool, lora_enabled: bool = False) -> None:
    """What a worker needs, checked when the module is built: the asynchronous schedule (the
    synchronous queue has nothing to overlap within a step). Its engine needs are the schedule's
    own (``check_async_settings``: the fast engine; hf and vllm cannot run in a worker either).
    Not with LoRA yet: the shared weights are the policy's parameters by name, and a LoRA
    policy's are the base and adapter tensors, not the merged weights the engine must read."""
    if rollout.workers and not clock_enabled:
        raise invalid(PREFIX + "workers", rollout.workers, "0 with model.clock.enabled false (workers run the "
                      "asynchronous schedule; set model.clock.enabled true)")
    if rollout.workers and lora_enabled:
        raise invalid(PREFIX + "workers", rollout.workers, "0 with model.policy.lora.enabled true (a worker "
                      "does not merge the adapter yet; run the schedule in-process)")


# -- the trainer's side -------------------------------------------------------------------------------
def _parameters(policy: torch.nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    from reclight.models.fsdp import full_weights

    full = full_weights(policy) if isinstance(policy, torch.nn.Module) else policy
    return dict(full.named_parameters()) if isinstance(full, torch.nn.Module) else dict(full)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


class WorkerRolloutQueue:
    """The trainer's proxy of an :class:`AsyncRolloutQueue` run by a worker (module doc).

    Args:
        queue: the queue built in the trainer (moved into the worker at the first call).
        policy: the trained policy (its parameters' names and shapes size the shared weights).
        cfg: ``model.rollout``.
        log_dir: where the worker's log goes (the run folder).
        index: the worker's number in messages and its log's name (the rank).
    """

    def __init__(self, queue: Any, policy: torch.nn.Module, cfg: WorkersConfig, log_dir: str | Path,
                 index: int = 0) -> None:
        if cfg.device is not None and torch.device(cfg.device) != queue.engine.device:
            raise invalid(PREFIX + "device", cfg.device, f"null or the trainer's device ({queue.engine.device}): "
                          "a worker on a device of its own is not built yet (docs/async.md)")
        self.local, self.cfg, self.index = queue, cfg, index
        self.seed, self.rank = queue.seed, queue.rank
        self.log_path = Path(log_dir) / f"rollout-worker-{index}.log"
        # paced: one set (the worker reads it only while the trainer does not write); free: two,
        # version v in set v % 2, so theta_{s+1} is written while the worker may swap theta_s in
        self.weights = [{k: v.detach().clone().share_memory_() for k, v in _parameters(policy).items()}
                        for _ in range(2 if cfg.mode == "free" else 1)]
        self.process: Any = None
        self.last_wait_s = 0.0
        self._open: RolloutBatch | None = None  # the batch sent whose step-end message is not read yet
        self.name = f"rollout worker {index}"

    # -- the queue's interface -------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        if self.local is None:
            raise RuntimeError(f"{self.name}: the engine lives in the worker process, not in the trainer's")
        return self.local.engine

    def seed_for(self, step: int) -> int:
        return rollout_seed(self.seed, step, self.rank)

    def batch_for_step(self, step: int, policy: torch.nn.Module) -> RolloutBatch:
        check_stop("the asynchronous rollout of the next step")
        start = time.perf_counter()
        self._check_open()
        self._start()
        self._close_step()  # normally read already, in finish_step
        weights = self.weights[step % len(self.weights)]
        for name, src in _parameters(policy).items():  # theta_step; paced: the worker is quiesced now
            weights[name].copy_(src)  # free: it reads the other set, if any (module doc)
        if any(t.is_cuda for t in weights.values()):  # the copy is asynchronous: done before the worker reads
            torch.cuda.synchronize()
        self.requests.put(("step", step))
        msg = self._get("batch", f"generating step {step}'s batch")
        batch = msg[2]
        batch.gen_seconds = self.last_wait_s = time.perf_counter() - start
        if self.cfg.mode == "free":  # its metrics came with it (the interval since the previous batch)
            batch.metrics = msg[3]
        else:
            self._open = batch
        return batch

    def finish_step(self, batch: RolloutBatch) -> None:
        """Wait for the worker to end ``batch``'s step and fill its ``metrics`` (before logging;
        ``batch`` may be a copy of the one sent, moved to the trainer's device)."""
        if self._open is not None and self._open.step == batch.step:
            batch.metrics = self._close_step()

    def _check_open(self) -> None:
        if self.process is None and self.local is None:
            raise RuntimeError(f"{self.name} was stopped (after an error): its state is lost; resume from the last "
                               "checkpoint")

    def state_dict(self) -> dict[str, Any]:
        self._check_open()
        if self.process is None:
            return self.local.state_dict()
        self._close_step()  # quiesced: the state of the end of the last step (module doc)
        self.requests.put(("state",))
        return _clone(self._get("state", "saving its state")[1])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_open()
        if self.process is None:
            self.local.load_state_dict(state)
            return
        self._close_step()
        self.requests.put(("load", state))
        self._get("loaded", "loading a state")

    def close(self) -> None:
        """Stop the worker (at the end of the run, or on any error): ask, then kill after 5 s."""
        p, self.process = self.process, None
        if p is None:
            return
        if p.is_alive():
            try:
                self.requests.put(("stop",))
            except (OSError, ValueError):
                pass
            p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)

    # -- the worker process --------------------------------------------------------------------------
    def _start(self) -> None:
        if self.process is not None:
            return
        ctx = torch.multiprocessing.get_context("spawn")
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        self.beat = ctx.Value("d", 0.0)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = ctx.Process(
            target=_worker_main, name=f"reclight-rollout-worker-{self.index}", daemon=True,
            args=(self.local, self.weights, self.requests, self.results, self.beat, os.getpid(), self.cfg.threads,
                  str(self.log_path), self.cfg.mode))
        self.process.start()
        self.local = None  # the worker holds the queue now (the trainer keeps no second KV cache)
        print(f"{self.name}: pid {self.process.pid}, log {self.log_path}", flush=True)

    def _close_step(self) -> dict[str, float] | None:
        """Read the step-end message of the open step: its metrics (None: no step open)."""
        batch, self._open = self._open, None
        if batch is None:
            return None
        start = time.perf_counter()
        msg = self._get("done", f"ending step {batch.step}")
        batch.metrics = {**msg[2], "rollout/worker_rss_mib": msg[3],
                         "rollout/worker_wait_s": time.perf_counter() - start}
        return batch.metrics

    def _get(self, kind: str, doing: str) -> tuple:
        """The worker's next message, which must be ``kind``; a dead or silent worker is an error."""
        p, started = self.process, time.monotonic()
        while True:
            try:
                msg = self.results.get(timeout=POLL_S)
            except queue_lib.Empty:
                msg = None
            if msg is not None:
                if msg[0] == kind:
                    return msg
                self.close()
                if msg[0] == "error":
                    raise RuntimeError(f"{self.name} (pid {p.pid}) failed while {doing}:\n{msg[1]}log: {self.log_path}")
                raise RuntimeError(f"{self.name} (pid {p.pid}) sent {msg[0]!r} while {doing}; expected {kind!r}")
            if not p.is_alive():
                code = p.exitcode
                killed = code is not None and code < 0
                how = f"killed by {signal.Signals(-code).name}" if killed else f"exit code {code}"
                self.close()
                raise RuntimeError(f"{self.name} (pid {p.pid}) died ({how}) while {doing}; log: {self.log_path}; "
                                   "resume from the last checkpoint: it is exact (docs/async.md)")
            beat = self.beat.value
            silent = time.monotonic() - (beat if beat else started)
            bound = self.cfg.heartbeat_s if beat else max(self.cfg.heartbeat_s, STARTUP_S)
            if silent > bound:
                self.close()
                raise RuntimeError(f"{self.name} (pid {p.pid}) stopped answering while {doing}: no heartbeat for "
                                   f"{silent:.1f} s (model.rollout.heartbeat_s={self.cfg.heartbeat_s}); it was "
                                   f"killed; log: {self.log_path}; resume from the last checkpoint (exact)")


def _clone(state: Any) -> Any:
    """A deep copy of the tensors of a received state (they share the worker's memory)."""
    if isinstance(state, Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_clone(v) for v in state)
    return state


# -- the worker's side --------------------------------------------------------------------------------
def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (its parent) ends, however it ends (also used by
    ``benchmarks/rl_step_bench.py``'s arm processes)."""
    try:  # Linux: the kernel sends SIGKILL when the parent exits, however it exits
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:  # and a portable check, for a parent that died before the prctl
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(POLL_S)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _memory_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _worker_main(queue: Any, weights: list[dict[str, Tensor]], requests: Any, results: Any, beat: Any,
                 parent_pid: int, threads: int, log_path: str, mode: str = "paced") -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the trainer stops us
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    torch.set_num_threads(threads)

    def heartbeat() -> None:
        while True:
            beat.value = time.monotonic()
            time.sleep(BEAT_S)

    threading.Thread(target=heartbeat, daemon=True, name="heartbeat").start()
    print(f"rollout worker: pid {os.getpid()}, parent {parent_pid}, {threads} thread(s), mode {mode}", flush=True)
    try:
        if mode == "free":
            _serve_free(queue, weights, requests, results)
        else:
            _serve_paced(queue, weights[0], requests, results)
    except BaseException:
        text = traceback.format_exc()
        print(text, flush=True)
        results.put(("error", text))
        results.close()
        results.join_thread()
        os._exit(1)


def _serve_state(queue: Any, msg: tuple, results: Any) -> bool:
    """The requests both modes answer alike; False: ``stop``."""
    if msg[0] == "state":
        results.put(("state", queue.state_dict()))
    elif msg[0] == "load":
        queue.load_state_dict(msg[1])
        results.put(("loaded",))
    elif msg[0] == "stop":
        print("rollout worker: stopped by the trainer", flush=True)
        return False
    else:
        raise ValueError(f"unknown request {msg[0]!r}")
    return True


def _serve_paced(queue: Any, weights: dict[str, Tensor], requests: Any, results: Any) -> None:
    """Step s: the simulated clock's step, the batch sent when formed, then the window's events
    and the step-end message; idle (blocked on the next request) in between."""
    while True:
        msg = requests.get()
        if msg[0] != "step":
            if not _serve_state(queue, msg, results):
                return
            continue
        step, times = msg[1], [(time.perf_counter(), time.process_time())]

        def send(batch: RolloutBatch) -> None:
            times.append((time.perf_counter(), time.process_time()))
            # on the CPU: a CUDA tensor sent would live in this process's memory, which the
            # next steps reuse while the trainer still trains on it
            results.put(("batch", step, dataclasses.replace(batch.to("cpu"), metrics={})))

        batch = queue.batch_for_step(step, weights, on_batch=send)
        if queue.engine.device.type == "cuda":  # the shared weights read before the trainer writes
            torch.cuda.synchronize(queue.engine.device)
        times.append((time.perf_counter(), time.process_time()))
        phases = {"rollout/worker_batch_s": times[1][0] - times[0][0],  # until the batch was formed
                  "rollout/worker_window_s": times[2][0] - times[1][0],  # the training window's events
                  "rollout/worker_cpu_s": times[2][1] - times[0][1]}  # CPU time of the step (all threads)
        results.put(("done", step, {**batch.metrics, **phases}, _memory_mib()))


def _serve_free(queue: Any, weights: list[dict[str, Tensor]], requests: Any, results: Any) -> None:
    """Step s: publish theta_s (set s % 2) and form the batch at once, send it with the metrics
    of the interval since the previous batch, then run generator events until the next request
    arrives (it is looked for between two events, so every state sent is between events, and a
    swap of theta_s ends before the trainer can write set s % 2 again: it writes theta_{s+2}
    only after asking for step s + 1). Idle when the generator has nothing to do (the staleness
    rule or the drain holds it): blocked on the next request."""
    generating, idle_s, cpu0 = False, 0.0, time.process_time()
    while True:
        if generating:
            try:
                msg = requests.get_nowait()
            except queue_lib.Empty:
                generating = queue.window_event()
                continue
        else:
            t0 = time.perf_counter()
            msg = requests.get()
            idle_s += time.perf_counter() - t0
        if msg[0] != "step":
            if not _serve_state(queue, msg, results):
                return
            generating = generating and msg[0] != "load"  # a loaded state waits for its next step
            continue
        step, t0 = msg[1], time.perf_counter()
        batch = queue.free_batch(step, weights[step % len(weights)])
        if queue.engine.device.type == "cuda":
            torch.cuda.synchronize(queue.engine.device)
        cpu = time.process_time()
        metrics = {**batch.metrics, "rollout/worker_batch_s": time.perf_counter() - t0,
                   "rollout/worker_idle_s": idle_s,  # blocked with nothing to do, since the previous batch
                   "rollout/worker_cpu_s": cpu - cpu0, "rollout/worker_rss_mib": _memory_mib()}
        results.put(("batch", step, dataclasses.replace(batch.to("cpu"), metrics={}), metrics))
        generating, idle_s, cpu0 = True, 0.0, cpu
