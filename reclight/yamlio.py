"""The one YAML loader of the project's config files: ``reclight fit --config`` files, study configs
and the bandit bench's configs.

PyYAML's ``safe_load`` (and jsonargparse's loader, which is the same) keeps the last of two equal
keys silently: a study config whose ``arms:`` held ``reinforce`` twice ran grpo under the name
``reinforce``. Its errors name ``"<unicode string>"`` rather than the file, and an empty file or
a list at the top level reached the CLI as "Unexpected config: ". :func:`load_yaml_file` instead
raises :class:`YamlFileError` naming the option, the file, the line and what is accepted:

- a repeated key in one mapping (at any depth), with the lines of both;
- a syntax error (a tab in the indentation, an unclosed brace or quote, two documents), with
  PyYAML's own description and where it started;
- an empty file (or only comments) and a top level that is not a mapping.

Imports only the standard library and PyYAML: the one module outside the core that the bandit
bench may import too (tests/core/test_imports.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

TAB_HINT = " (indent with spaces: YAML does not allow a tab there)"


class YamlFileError(ValueError):
    """A config file that is not a YAML mapping with each key once."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key given twice in one mapping (merge keys ``<<`` excepted:
    overriding a merged key is what they are for)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping (first at line {first + 1}); YAML would "
                    "keep only the last one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _syntax(e: yaml.YAMLError) -> str:
    """PyYAML's error as one line: the problem and where, then where its context started."""
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem_mark is None:
        return str(e).replace("\n", " ")
    problem = e.problem or "invalid YAML"
    text = f"{_where(e.problem_mark)}: {problem}"
    if "'\\t'" in problem:
        return text + TAB_HINT
    if e.context and e.context_mark is not None and e.context_mark.line != e.problem_mark.line:
        text += f" ({e.context} at {_where(e.context_mark)})"
    elif e.context:
        text += f" ({e.context})"
    return text


def parse_yaml(text: str, source: str, field: str = "--config",
               accepted: str = "a YAML mapping of settings (key: value lines)") -> dict[str, Any]:
    """``text`` (from ``source``, e.g. a path) as a mapping with each key once; a
    :class:`YamlFileError` ``<field>='<source>' is not valid: <why>; accepted: <accepted>``
    otherwise."""
    def fail(why: str) -> YamlFileError:
        return YamlFileError(f"{field}={source!r} is not valid: {why}; accepted: {accepted}")

    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise fail(_syntax(e)) from None
    if tree is None:
        raise fail("the file is empty (no YAML mapping in it)" if not text.strip() else
                   "the file holds no YAML value (only comments)")
    if not isinstance(tree, dict):
        kind = {list: "a list", str: "a string"}.get(type(tree), f"a {type(tree).__name__}")
        raise fail(f"its top level is {kind} ({str(tree)[:60]!r}), not a mapping")
    return tree


def load_yaml_file(path: str | os.PathLike, field: str = "--config",
                   accepted: str = "a YAML mapping of settings (key: value lines)") -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (rules in the module doc). A missing file is an
    error too; a file that is not UTF-8 names the byte."""
    p = Path(path)
    if not p.is_file():
        what = "it is a folder" if p.is_dir() else "no such file"
        raise YamlFileError(f"{field}={str(path)!r} is not valid: {what}; accepted: {accepted}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        bad = e.object[e.start : e.start + 1]
        raise YamlFileError(f"{field}={str(path)!r} is not valid: not UTF-8 text (byte {bad!r} at offset {e.start}); "
                            f"accepted: {accepted}") from None
    return parse_yaml(text, str(path), field, accepted)
