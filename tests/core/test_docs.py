"""Every doc the code cites lives in the repository, and the maths doc covers the whole config.

- A citation ``docs/<name>.md`` (a plain mention or a Markdown link, in any file of the
  repository) names a file that exists; with ``section N`` (or ``sections N-M``, ``N, M``) after
  it, that file has a heading numbered N (``## N. Title`` or ``### N Title``). A citation may
  wrap onto the next line.
- No file cites the old spec outside the repository (its file name, or a path into a
  ``shared/docs`` folder next to the checkout).
- ``docs/algorithms.md`` names every preset of ``reclight.algorithms.PRESETS`` and every field of
  ``AlgorithmConfig`` (in backticks, as the doc writes code names).

The files checked are the repository's own: ``git ls-files`` (tracked, plus untracked files
that are not ignored), or, without git, a walk of the tree that skips dot-folders (``.git``,
``.venv``) and build outputs. This file is left out: it holds deliberately wrong citations.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

from reclight.algorithms import PRESETS, AlgorithmConfig

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()

_NUM = r"\d+(?:\.\d+)*"
CITATION = re.compile(
    rf"(?<![\w./-])(?P<path>docs/[\w.-]+\.md)(?:\s+sections?\s+(?P<nums>{_NUM}(?:\s*(?:-|,|and)\s*{_NUM})*))?"
)
"""``docs/<name>.md``, optionally followed by ``section N`` / ``sections N-M`` / ``sections N, M``."""
HEADING = re.compile(rf"^#{{1,6}}\s+(?P<num>{_NUM})\.?\s", re.MULTILINE)
FORBIDDEN = ("ALGORITHMS" + ".md", "shared/" + "docs")
"""The old spec's file name and its folder outside the checkout (spelt in two pieces so that this
file does not cite them)."""
SKIP_DIRS = {"__pycache__", "node_modules", "build", "dist"}


def repo_files(root: Path) -> list[Path]:
    """The repository's text-bearing files: git's list (tracked, and untracked but not ignored),
    else a walk skipping dot-folders, caches and ``*.egg-info``."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
        return sorted({root / n for n in names if (root / n).is_file()})
    except (OSError, subprocess.CalledProcessError):
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                           and not d.endswith(".egg-info")]
            found += [Path(dirpath) / f for f in filenames]
        return sorted(found)


def _text(path: Path) -> str | None:
    """The file as text, or None for a binary or undecodable file."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def section_numbers(doc: Path) -> set[str]:
    """The numbers of ``doc``'s numbered headings (``## 6. Title`` -> "6", ``### 6.2 T`` -> "6.2")."""
    return {m["num"] for m in HEADING.finditer(doc.read_text(encoding="utf-8"))}


def citation_problems(root: Path, files: list[Path]) -> list[str]:
    """One message per broken citation in ``files`` (paths under ``root``): a cited doc that does
    not exist, a cited section number with no heading of that number, a mention of the old spec."""
    problems, sections = [], {}
    for path in files:
        if path.resolve() == THIS:
            continue
        text = _text(path)
        if text is None:
            continue
        rel = path.relative_to(root)

        def where(offset: int) -> str:
            return f"{rel}:{text.count(chr(10), 0, offset) + 1}"

        for bad in FORBIDDEN:
            for m in re.finditer(re.escape(bad), text):
                problems.append(f"{where(m.start())}: cites {bad!r}, outside the repository; cite "
                                f"docs/algorithms.md section N instead")
        for m in CITATION.finditer(text):
            doc = root / m["path"]
            if not doc.is_file():
                problems.append(f"{where(m.start())}: cites {m['path']}, which does not exist")
                continue
            if m["nums"]:
                if doc not in sections:
                    sections[doc] = section_numbers(doc)
                for num in re.findall(_NUM, m["nums"]):
                    if num not in sections[doc]:
                        problems.append(f"{where(m.start())}: cites {m['path']} section {num}, which has no "
                                        f"heading numbered {num} (it has {sorted(sections[doc])})")
    return problems


def missing_names(doc_text: str, names: list[str]) -> list[str]:
    """The ``names`` that ``doc_text`` never writes as code (```name```)."""
    return [n for n in names if f"`{n}`" not in doc_text]


# -- the repository ------------------------------------------------------------------------------

def test_every_doc_citation_in_the_repository_resolves():
    files = repo_files(ROOT)
    assert any(f.name == "README.md" for f in files) and len(files) > 50  # the walk found the repo
    assert citation_problems(ROOT, files) == []


def test_algorithms_doc_names_every_preset_and_every_field():
    text = (ROOT / "docs" / "algorithms.md").read_text(encoding="utf-8")
    fields = [f.name for f in dataclasses.fields(AlgorithmConfig)]
    assert len(PRESETS) == 23 and len(fields) == 36  # a new preset or field must reach the doc too
    assert missing_names(text, list(PRESETS)) == []
    assert missing_names(text, fields) == []


# -- the checkers can fail -----------------------------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> list[Path]:
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body, encoding="utf-8")
    return repo_files(tmp_path)  # not a git repository: the walk


def test_citation_checker_catches_each_kind_of_broken_citation(tmp_path):
    doc = "# Title\n\n## 1. One\n\n### 1.1 Sub\n\n## 2 Two\n"
    files = _tree(tmp_path, {
        "docs/algorithms.md": doc,
        "good.py": '"""docs/algorithms.md section 1.1, docs/algorithms.md sections 1-2 and\n'
                   'docs/algorithms.md\n    section 2; see [the doc](docs/algorithms.md)."""\n',
        "wrong_section.py": "# docs/algorithms.md section 6.2\n",
        "wrong_range.md": "text\n(docs/algorithms.md sections 1.1-1.3)\n",
        "missing_doc.yaml": "# docs/nothing.md section 1\n",
        "old_spec.md": "see " + FORBIDDEN[0] + " section 4 and ../" + FORBIDDEN[1] + "/x.md\n",
        ".venv/ignored.py": "# docs/nothing.md\n",
    })
    assert [f.name for f in files] == ["algorithms.md", "good.py", "missing_doc.yaml", "old_spec.md",
                                       "wrong_range.md", "wrong_section.py"]
    assert section_numbers(tmp_path / "docs" / "algorithms.md") == {"1", "1.1", "2"}
    problems = citation_problems(tmp_path, files)
    assert len(problems) == 5, problems
    assert problems[0].startswith("missing_doc.yaml:1: cites docs/nothing.md, which does not exist")
    assert problems[1].startswith("old_spec.md:1: cites 'ALGORITHMS.md'")
    assert problems[2].startswith("old_spec.md:1: cites 'shared/docs'")
    assert problems[3].startswith("wrong_range.md:2: cites docs/algorithms.md section 1.3, which has no heading")
    assert problems[4].startswith("wrong_section.py:1: cites docs/algorithms.md section 6.2, which has no heading")


def test_completeness_checker_catches_a_missing_name():
    text = "| `grpo` | ... | `eps_low_outer` |"
    assert missing_names(text, ["grpo", "eps_low_outer"]) == []
    assert missing_names(text, ["grpo", "eps_low", "dapo"]) == ["eps_low", "dapo"]  # substring is not enough
