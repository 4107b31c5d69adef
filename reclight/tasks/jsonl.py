"""Loading task data from JSONL files (and Hugging Face rows) with errors that say what to fix.

Every problem with a data file is raised when the task loads it (the trainer does that at
setup), before any model is built or any step is run. Each error names the file, the 1-based
line, the field and what would have been accepted, so that a typo in a data set costs seconds,
not a failed job.

Two rules every task gets from here: a required text field that is empty (or only whitespace)
is refused, naming the file and line (an empty question trained on nothing but the template);
and rows repeating an earlier row's prompt field are dropped, keeping the first, with one
printed line counting them (:func:`drop_duplicates`, which each task calls after checking every
row, so a bad row is refused even where it repeats another). Dropping happens before a task
holds rows out for validation, so a validation prompt is never also a training prompt (before,
a duplicated row could land on both sides, silently).
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple


class DataError(ValueError):
    """A data file (or data set) exists but its content cannot be used."""


class Row(NamedTuple):
    """One record of a data source with where it came from."""

    line: int
    """1-based line number in the file (row index for an in-memory data set)."""
    record: dict[str, Any]
    """The decoded JSON object."""


_SNIPPET = 80


def _snippet(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= _SNIPPET else text[:_SNIPPET] + "...")


def _json_preview(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


def check_record(record: Any, required_fields: Mapping[str, type], where: str) -> dict[str, Any]:
    """Check that ``record`` is a JSON object holding each required field with the right type.

    ``where`` locates the record in messages (e.g. ``"data/test.jsonl:12"``). Returns the
    record; raises :class:`DataError` naming the field, the location and the fields present.
    """
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object with fields {sorted(required_fields)}, "
            f"got {type(record).__name__} {_json_preview(record)}"
        )
    for field, kind in required_fields.items():
        if field not in record:
            raise DataError(
                f"{where}: missing required field {field!r}; fields present: {sorted(record)}"
            )
        value = record[field]
        # bool is an int in Python; a JSON true is never a valid number of anything here.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise DataError(
                f"{where}: field {field!r} must be {kind.__name__}, "
                f"got {type(value).__name__} {_json_preview(value)}"
            )
        if kind is str and not value.strip():
            raise DataError(f"{where}: field {field!r}={value!r} is not valid; accepted: a non-empty text (an empty "
                            f"{field} has nothing to learn from; fix or remove the row)")
    return record


def drop_duplicates(rows: list[Row], field: str, source: str) -> list[Row]:
    """``rows`` without those whose ``field`` (whitespace-trimmed) repeats an earlier row's, the
    first kept; prints one line (a warning) with the count and the first few line pairs, and how
    many of the dropped rows had other content too (the first row's is what is used)."""
    first: dict[str, Row] = {}
    kept: list[Row] = []
    dropped: list[tuple[Row, Row]] = []
    for row in rows:
        key = str(row.record[field]).strip()
        if key in first:
            dropped.append((row, first[key]))
        else:
            first[key] = row
            kept.append(row)
    if dropped:
        pairs = ", ".join(f"{r.line} (= {f.line})" for r, f in dropped[:5]) + (" ..." if len(dropped) > 5 else "")
        differ = sum(r.record != f.record for r, f in dropped)
        other = (f"; {differ} of them differ in other fields (e.g. the answer): the first row's are used"
                 if differ else "")
        warnings.warn(f"{source}: dropped {len(dropped)} of {len(rows)} rows whose {field!r} repeats an earlier row's "
                      f"(line (= first line): {pairs}){other}; each prompt is kept once, so held-out prompts are "
                      "never also trained on", stacklevel=2)
    return kept


def read_jsonl(
    path: str | Path, required_fields: Mapping[str, type], config_field: str = "data_dir"
) -> list[Row]:
    """Read a JSON Lines file whose every non-blank line is an object with ``required_fields``.

    Args:
        path: the file to read.
        required_fields: field name -> expected Python type (e.g. ``{"question": str}``).
        config_field: the config argument the path came from, named when the file is missing.

    Returns:
        One :class:`Row` per non-blank line, in file order (blank lines are skipped, so
        ``row.line`` can run ahead of the row's index).

    Raises:
        FileNotFoundError: the file does not exist (names the path and ``config_field``).
        DataError: a line is not UTF-8 (a UTF-16 or Latin-1 file: file, line, byte), is not
            valid JSON (file, line, snippet), is not an object, lacks a required field or holds it with the wrong type, or the file has no records
            ("empty data set").
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"data file {str(path)!r} {what}; check the {config_field!r} setting "
            f"(it must point to the folder/file holding the JSONL data)"
        )
    rows: list[Row] = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            text = _decode_line(raw, line_no, where)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg}): {_snippet(text)}") from None
            rows.append(Row(line_no, check_record(record, required_fields, where)))
    require_nonempty(rows, str(path))
    return rows


_UTF16_BOMS = {b"\xff\xfe": "UTF-16 (little-endian)", b"\xfe\xff": "UTF-16 (big-endian)"}


def _decode_line(raw: bytes, line_no: int, where: str) -> str:
    """One line of a JSONL file as text: UTF-8 (a UTF-8 byte-order mark on line 1 is dropped).
    Anything else raises :class:`DataError` naming the file, the line and the offending byte:
    a UTF-16 file (its byte-order mark, or NUL bytes between characters) or bytes that are not
    UTF-8 (e.g. Latin-1)."""
    if line_no == 1:
        for bom, name in _UTF16_BOMS.items():
            if raw.startswith(bom):
                raise DataError(f"{where}: the file is {name} (it starts with the byte-order mark {bom!r}); "
                                "accepted: UTF-8 JSON Lines (convert it, e.g. `iconv -f UTF-16 -t UTF-8`)")
        raw = raw.removeprefix(b"\xef\xbb\xbf")
    if (nul := raw.find(b"\x00")) >= 0:
        raise DataError(f"{where}: the line holds NUL bytes (column {nul + 1}): the file looks UTF-16 "
                        "or binary; accepted: UTF-8 JSON Lines (convert it, e.g. `iconv -f UTF-16 -t UTF-8`)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1]
        raise DataError(f"{where}: not valid UTF-8 (byte {bad!r} at column {e.start + 1}: {e.reason}) near "
                        f"{_snippet(raw[max(0, e.start - 30) : e.start + 10].decode('utf-8', 'replace'))}; "
                        "accepted: UTF-8 JSON Lines (convert it, e.g. `iconv -f LATIN1 -t UTF-8` for Latin-1)") from None


def rows_from_records(
    records: Iterable[Mapping[str, Any]], required_fields: Mapping[str, type], source: str
) -> list[Row]:
    """Validate in-memory records (e.g. a Hugging Face split) exactly like :func:`read_jsonl`.

    Rows are numbered from 1, like lines, so uids look the same for both sources.
    """
    rows = [
        Row(i, check_record(dict(r), required_fields, f"{source}:{i}"))
        for i, r in enumerate(records, start=1)
    ]
    require_nonempty(rows, source)
    return rows


def require_nonempty(items: list, source: str, reason: str = "") -> None:
    """Raise ``DataError("empty data set ...")`` if ``items`` is empty.

    ``reason`` says what emptied it (e.g. a filter), so the message points at the real cause.
    """
    if not items:
        why = f" after {reason}" if reason else " (no non-blank lines)"
        raise DataError(f"empty data set: {source} has no examples{why}")


def held_out_indices(n: int, size: int, seed: int) -> list[int]:
    """``size`` distinct indices of ``range(n)``, drawn with ``random.Random(seed)``, sorted.

    The same (n, size, seed) always gives the same indices, on any machine and Python >= 3.2
    (``Random.sample`` over a ``range`` is specified by the seed alone).
    """
    if not 0 <= size <= n:
        raise ValueError(f"held-out size must be in [0, {n}], got {size}")
    return sorted(random.Random(seed).sample(range(n), size))


def check_split_indices(n: int, exclude: Iterable[int], size: int, seed: int) -> list[int]:
    """``size`` distinct indices of ``range(n)`` outside ``exclude`` (a task's ``val`` indices),
    drawn with ``random.Random(f"{seed}/check")``, in the order drawn: a task's ``check`` split,
    any prefix of which is a random sample of it (the warm-up checks on its first
    ``model.warmup.check_size``). Deterministic for one (n, exclude, size, seed), like
    :func:`held_out_indices`."""
    out = set(exclude)
    rest = [i for i in range(n) if i not in out]
    if not 0 <= size <= len(rest):
        raise ValueError(f"check size must be in [0, {len(rest)}], got {size}")
    return [rest[i] for i in random.Random(f"{seed}/check").sample(range(len(rest)), size)]


def hf_rows(
    dataset: str, config: str | None, split: str, required_fields: Mapping[str, type]
) -> list[Row]:
    """Load ``split`` of a Hugging Face data set (needs the optional ``datasets`` package).

    Only used when a task has no ``data_dir``; the tests never call it.
    """
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError(
            f"loading {dataset!r} by name needs the `datasets` package (not a reclight "
            f"dependency): `pip install datasets`, or set data_dir to a folder of JSONL files"
        ) from e
    records = load_dataset(dataset, config, split=split)
    return rows_from_records(records, required_fields, f"{dataset}[{split}]")


def task_rows(
    task_prefix: str, data_dir: str | None, split: str, file_name: str, required_fields: Mapping[str, type], *,
    hf_dataset: str, hf_config: str | None = None,
) -> tuple[list[Row], str, str]:
    """The rows of one source split of a task: ``(rows, source, uid_prefix)``.

    With ``data_dir``: the file ``data_dir/file_name`` (errors name the config field
    ``data_dir / <split>_file``); ``source`` is the path and ``uid_prefix``
    ``"<task_prefix>/<file name>"``. Without: ``split`` of the Hugging Face data set
    ``hf_dataset`` (``hf_config``); ``source`` is ``"<hf_dataset>[<split>]"`` and ``uid_prefix``
    ``"<task_prefix>/<split>"``. ``source`` locates rows in later messages (``<source>:<line>``).
    """
    if data_dir is None:
        rows = hf_rows(hf_dataset, hf_config, split, required_fields)
        source, uid_prefix = f"{hf_dataset}[{split}]", f"{task_prefix}/{split}"
    else:
        path = Path(data_dir) / file_name
        rows = read_jsonl(path, required_fields, config_field=f"data_dir / {split}_file")
        source, uid_prefix = str(path), f"{task_prefix}/{path.name}"
    return rows, source, uid_prefix
