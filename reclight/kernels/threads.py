"""Pieces of one computation run concurrently on threads, the result bitwise that of running
them in turn: the micro-batches of a training update and of a warm-up step
(``model.train_forward.threads``), the prompt pieces of a rollout (``model.engine.fast.threads``).

At the embedded model's sizes (hidden 128, matrices of a few hundred rows) a second torch
intra-op thread costs more in wake-ups than it computes, so the second core of a laptop sat
idle. The work that is already cut into independent pieces is the micro-batches of one update
(each loss is its share of the whole update's, :func:`reclight.updates.micro_batches`) and the
halves of a warm-up batch (and, in the fast engine, pieces of a rollout, each sampled from its
own generator): :class:`MicroBatchThreads` runs those pieces on ``threads`` Python
threads, each torch op on one intra-op thread (torch releases the GIL inside its ops and
autograd runs a CPU backward on the calling thread).

What is computed does not depend on ``threads`` (at a given number of intra-op threads per op:
the pieces run with ``torch.get_num_threads() // k`` each, so ``OMP_NUM_THREADS=1`` makes every
count agree; a matrix product may round differently on 1 and 2 intra-op threads):

- each piece's gradients come from ``torch.autograd.grad`` in its own thread, and are added into
  ``.grad`` in piece order on the calling thread: the same fold (``g0``, then ``+ g1``, ...) as
  ``backward()`` piece after piece, so the same bits (tested: weights after several steps are
  equal at 1 and 2 threads);
- forward-only pieces write their outputs in piece order.

Refused by :func:`resolve_threads`, with the field named: DDP (its gradient hooks
fire on ``backward()``, not on ``autograd.grad``), FSDP, a GPU (one device stream: threads would
only interleave its launches), ``model.train_forward.compile`` (torch.compile's tracing is not
thread-safe) and dropout in the trained forward (the threads would draw from one generator in a
racing order). Thread-local state that matters is carried into the workers: grad mode and
autocast (Lightning's ``bf16-mixed`` enters autocast on the calling thread only).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import Tensor

from reclight.checks import check_int, invalid

T = TypeVar("T")
R = TypeVar("R")


def resolve_threads(threads: int, *, device: torch.device, world_size: int, strategy: str, compiled: bool,
                    dropout: str | None = None) -> int:
    """``model.train_forward.threads`` for this run, capped at the usable cores; more than 1 is
    refused with the field named where threads would not compute the same gradients or would not
    help (module docstring)."""
    if threads > 1:
        reasons = [
            (device.type != "cpu", f"the CPU (this run trains on {device.type}: one device stream, nothing to overlap)"),
            (world_size > 1, f"a single process (this run has {world_size}: DDP syncs gradients on backward())"),
            ("FSDP" in strategy or "ModelParallel" in strategy, f"an unsharded model (this run's strategy is {strategy})"),
            (compiled, "model.train_forward.compile: false (torch.compile's tracing is not thread-safe)"),
            (dropout is not None, f"a forward without random draws (this run has {dropout}: the threads would "
                                  "take the generator's numbers in a racing order)")]
        for bad, needs in reasons:
            if bad:
                raise invalid("model.train_forward.threads", threads, f"1, or > 1 only with {needs}")
    return usable_threads(threads)


def check_pieces_config(group: str, micro_batch_size: int | None, threads: int, pieces: str) -> None:
    """``{group}.micro_batch_size`` (null or >= 1) and ``{group}.threads`` (>= 1), as the user
    types them: more than one thread needs pieces to run side by side."""
    check_int(f"{group}.micro_batch_size", micro_batch_size, minimum=1, allow_none=True)
    check_int(f"{group}.threads", threads, minimum=1)
    if threads > 1 and micro_batch_size is None:
        raise invalid(f"{group}.threads", threads, f"1 while {group}.micro_batch_size is null (the {pieces} are "
                      "what runs side by side): set micro_batch_size too, e.g. half of data.prompts_per_step")


def usable_threads(threads: int) -> int:
    """``threads`` capped at the CPU cores this process may run on (more threads than cores only
    take turns; what is computed does not change)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(threads, cores))


@contextlib.contextmanager
def _thread_state(grad: bool, autocast: Sequence[tuple[str, torch.dtype]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.set_grad_enabled(grad))
        for device_type, dtype in autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        yield


class MicroBatchThreads:
    """Runs pieces of one computation on ``threads`` threads (1: in turn on the calling thread);
    results in piece order. The pool is made on first use and kept (``close`` ends it)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], pieces: Sequence[T]) -> list[R]:
        if self.threads <= 1 or len(pieces) <= 1:
            return [fn(p) for p in pieces]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="reclight-micro")
        grad = torch.is_grad_enabled()  # CPU only (resolve_threads, the engine): CPU autocast is the one to carry
        autocast = [("cpu", torch.get_autocast_dtype("cpu"))] if torch.is_autocast_enabled("cpu") else []

        def run(piece: T) -> R:
            with _thread_state(grad, autocast):
                return fn(piece)

        # Each torch op on one intra-op thread while the pieces run side by side: `threads`
        # Python threads each fanning out to the whole intra-op pool would oversubscribe the cores.
        intra = torch.get_num_threads()
        per_piece = max(1, intra // min(self.threads, len(pieces)))
        change = per_piece != intra  # not at the README's OMP_NUM_THREADS=1: no call on every step
        if change:
            torch.set_num_threads(per_piece)
        try:
            return list(self._pool.map(run, pieces))
        finally:
            if change:
                torch.set_num_threads(intra)

    def backward(self, loss_fn: Callable[[T], tuple[Tensor, R]], pieces: Sequence[T],
                 params: Sequence[Tensor]) -> list[R]:
        """For each piece, ``loss, out = loss_fn(piece)``; adds each loss's gradient with respect to
        ``params`` into their ``.grad`` in piece order (the fold ``backward()`` makes piece after
        piece) and returns the ``out``s. ``params`` are the parameters that require grad."""
        params = list(params)

        def grads(piece: T) -> tuple[tuple[Tensor | None, ...], R]:
            loss, out = loss_fn(piece)
            return torch.autograd.grad(loss, params, allow_unused=True), out

        outs = []
        for piece_grads, out in self.map(grads, pieces):
            with torch.no_grad():
                for p, g in zip(params, piece_grads):
                    if g is None:
                        continue
                    if p.grad is None:  # as AccumulateGrad: the gradient laid out like its parameter
                        p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
                    else:
                        p.grad += g
            outs.append(out)
        return outs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:  # the pool does not travel (a pickled module, a fork)
        return {"threads": self.threads, "_pool": None}
