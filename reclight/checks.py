"""Validation helpers shared by every config in the project (core, trainer, tasks, bandits).

Each check either returns the value (normalised: a numpy integer comes back as ``int``, an
integer given for a float field as ``float``) or raises ``ValueError`` with one message form::

    <field>=<value> is not valid; accepted: <what is>

Rules common to all numeric checks, on purpose:

- ``bool`` is never a number (``lr: true`` is a typo, not 1.0);
- integers are any ``numbers.Integral`` (Python or numpy), floats any ``numbers.Real``;
- a float must be finite: YAML's ``.inf`` / ``.nan`` pass every comparison one would write by
  hand (``nan > 0`` is False but ``not nan < 0`` is True) and surface much later, if at all.

Imports only the standard library, so configs validate before any heavy import.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from typing import Any


def invalid(field: str, value: Any, accepted: str) -> ValueError:
    """The project's one error form: ``<field>=<value!r> is not valid; accepted: <accepted>``."""
    return ValueError(f"{field}={value!r} is not valid; accepted: {accepted}")


def _name(field: str) -> str:
    return field.rsplit(".", 1)[-1]


def check_int(
    field: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
    allow_none: bool = False, accepted: str | None = None,
) -> int | None:
    """An integer (Python or numpy, never bool) within ``[minimum, maximum]``."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok:
        ok = (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if accepted is None:
            if minimum is not None and maximum is not None:
                accepted = f"an integer in [{minimum}, {maximum}]"
            elif minimum is not None:
                accepted = f"an integer >= {minimum}"
            elif maximum is not None:
                accepted = f"an integer <= {maximum}"
            else:
                accepted = "an integer"
            if allow_none:
                accepted = "None or " + accepted
        raise invalid(field, value, accepted)
    return int(value)


def _bounds_text(field: str, gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    name = _name(field)
    low = f"{gt:g} < " if gt is not None else (f"{ge:g} <= " if ge is not None else "")
    high = f" < {lt:g}" if lt is not None else (f" <= {le:g}" if le is not None else "")
    if low and high:
        return f"{low}{name}{high}"
    if low:
        return f"{name} > {gt:g}" if gt is not None else f"{name} >= {ge:g}"
    if high:
        return f"{name}{high}"
    return "a finite number"


def check_float(
    field: str, value: Any, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
    le: float | None = None, allow_none: bool = False, accepted: str | None = None,
) -> float | None:
    """A finite real number (never bool) with the given strict (``gt``/``lt``) or inclusive
    (``ge``/``le``) bounds. Default message: ``0 < eps_low < 1``, ``lr > 0``, ..."""
    if value is None and allow_none:
        return None
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    finite = number and math.isfinite(value)
    in_range = finite and ((gt is None or value > gt) and (ge is None or value >= ge)
                           and (lt is None or value < lt) and (le is None or value <= le))
    if not in_range:
        text = accepted or _bounds_text(field, gt, ge, lt, le)
        if not finite and "finite" not in text:
            text += " (a finite number)"
        raise invalid(field, value, "None or " + text if allow_none else text)
    return float(value)


def check_bool(field: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise invalid(field, value, "true or false")
    return value


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of ``choices`` (compared with ``==``; strings are quoted in the message)."""
    choices = tuple(choices)
    if value not in choices or (isinstance(value, bool) and not any(c is value for c in choices)):
        raise invalid(field, value, ", ".join(repr(c) if not isinstance(c, str) else c for c in choices))
    return value


def check_subset(field: str, values: Any, choices: Iterable[str], *, nonempty: bool = True) -> list[str]:
    """A list of distinct entries of ``choices`` (non-empty unless told otherwise)."""
    choices = tuple(choices)
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise invalid(field, values, f"a list of {', '.join(choices)}")
    values = list(values)
    if nonempty and not values:
        raise invalid(field, values, f"a non-empty list of {', '.join(choices)}")
    for v in values:
        if v not in choices:
            raise invalid(field, v, ", ".join(choices))
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise invalid(field, values, f"distinct entries (repeated: {', '.join(dup)})")
    return values


def check_out_dir(field: str, value: Any) -> str:
    """A folder to write into: a non-empty path that is not a file and has no file among its
    parents (``mkdir`` would fail there with a bare ``NotADirectoryError``). It need not exist."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise invalid(field, value, "a folder path (a non-empty string)")
    path = os.path.abspath(os.path.expanduser(os.fspath(value)))
    probe = path
    while True:
        if os.path.exists(probe) and not os.path.isdir(probe):
            where = "is a file" if probe == path else f"is under the file {probe!r}"
            raise invalid(field, value, f"a folder path (this one {where})")
        parent = os.path.dirname(probe)
        if parent == probe:
            return os.fspath(value)
        probe = parent


GLOBAL_SEED_ENV = "PL_GLOBAL_SEED"
"""Where ``seed_everything`` (Lightning's, the CLI's ``--seed_everything``) leaves the run's seed."""


def run_seed(seed: int | None) -> int:
    """``seed``, or the run's global seed when it is None (``seed_everything``, else 0): the one
    fallback of every ``seed: null`` field (``model.seed``, ``data.seed``)."""
    return int(os.environ.get(GLOBAL_SEED_ENV, 0)) if seed is None else int(seed)
