"""A process-wide request to stop, honoured by every generation loop.

A batch scheduler's SIGTERM must end a run within seconds, but a rollout of long responses can
take minutes and no trainer hook runs inside it. So the trainer's signal handler only records
the request (:func:`request_stop`: a flag, safe in a signal handler) and every decoding loop
checks it once per token: HF ``generate`` through a stopping criterion (:mod:`reclight.engines.hf`,
which raises once ``generate`` returns), the fast engine between decoding steps. They raise
:class:`StopRequested` at those points only, where no training state is half-updated, so the
trainer can still write a consistent, resumable checkpoint (:mod:`reclight.trainer.signals`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_requested: str | None = None
_deferred = 0


class StopRequested(Exception):
    """Generation was abandoned because the process was asked to stop (e.g. SIGTERM)."""


def request_stop(reason: str) -> None:
    """Ask every generation loop of this process to stop at its next token."""
    global _requested
    _requested = reason


def stop_requested() -> str | None:
    """The reason of a pending stop request, or None."""
    return _requested


def clear_stop() -> None:
    global _requested
    _requested = None


def check_stop(where: str) -> None:
    """Raise :class:`StopRequested` if a stop was requested (``where`` names the loop), unless
    stops are :func:`deferred` here."""
    if _requested is not None and not _deferred:
        raise StopRequested(f"{where} abandoned: {_requested}")


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """No loop inside raises :class:`StopRequested`: for work that must not be abandoned half-way
    because its state is not transactional (one step of the asynchronous schedule, whose clock,
    KV cache and queued groups all advance together). A pending request is honoured at the next
    check outside (the end of that training step: :mod:`reclight.trainer.signals`)."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
