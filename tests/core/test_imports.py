"""The architecture, checked on the source: which modules may import which.

- the core (``reclight.{algorithms,advantages,losses,sync,checks}``) imports only torch, the
  standard library and the core itself;
- the bandit bench imports the core and nothing else of reclight;
- nothing below the trainer imports the trainer, and no package imports ``reclight.trainer``
  except the trainer itself (the direction is trainer -> rollout -> engines -> models/kernels
  -> core);
- no import cycles between reclight's modules, counting imports at every level (inside
  functions too: a function-level import that closes a cycle is still a cycle, only deferred).
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = {"reclight.yamlio"}
"""Outside the core but importable by every layer and the bench: imports the standard library
and PyYAML only (the one YAML loader of the project's config files)."""
CORE = {"reclight.algorithms", "reclight.advantages", "reclight.losses", "reclight.sync", "reclight.checks",
        "reclight.stats", "reclight.clock", "reclight.updates"}
LAYERS = ["core", "tasks", "kernels", "models", "engines", "rollout", "trainer", "study", "launch"]
"""Each package may import itself and the layers to its left only; ``reclight.launch`` (the
``reclight`` command) is the one top entry, above the trainer and the study."""


def _modules():
    out = {}
    for base in ("reclight", "bandits"):
        for path in (ROOT / base).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path, top_level_only=False):
    """Absolute module names imported by ``path`` (relative imports are not used here)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _layer(module):
    if module in CORE or module in SHARED:
        return "core"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_core_imports_only_torch_stdlib_and_core():
    for name in CORE:
        for imp in _imports(_modules()[name]):
            top = imp.split(".")[0]
            ok = top in ("torch", "__future__") or top in sys.stdlib_module_names or imp in CORE or (
                top == "reclight" and any(imp.startswith(c + ".") for c in CORE))
            assert ok, f"{name} imports {imp}"


def test_bandits_import_only_the_core_of_reclight():
    mods = _modules()
    for name, path in mods.items():
        if not name.startswith("bandits"):
            continue
        for imp in _imports(path):
            if imp.startswith("reclight"):
                assert imp in CORE | SHARED or any(imp.startswith(c + ".") for c in CORE | SHARED), \
                    f"{name} imports {imp}"


def test_the_shared_yaml_loader_imports_only_the_standard_library_and_pyyaml():
    for name in SHARED:
        for imp in _imports(_modules()[name]):
            top = imp.split(".")[0]
            assert top in ("yaml", "__future__") or top in sys.stdlib_module_names, f"{name} imports {imp}"


def test_layers_import_only_downwards():
    mods = _modules()
    for name, path in mods.items():
        src = _layer(name)
        if src is None:
            continue
        for imp in _imports(path):
            dst = next((_layer(m) for m in (imp, imp.rsplit(".", 1)[0]) if m in mods), None)
            if dst is None:
                continue
            assert LAYERS.index(dst) <= LAYERS.index(src), f"{name} ({src}) imports {imp} ({dst})"


def test_no_import_cycles():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(path):
            for cand in (imp, imp.rsplit(".", 1)[0]):
                if cand in mods and cand != name:
                    deps.add(cand)
                    break
        graph[name] = deps
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph[node]:
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_layout_has_the_expected_rooms():
    """The folders show the architecture: the core at the top level, the rest in subpackages."""
    top = {p.stem for p in (ROOT / "reclight").glob("*.py")} - {"__init__", "__main__"}
    assert top == {n.split(".")[1] for n in CORE | SHARED} | {"launch"}
    assert {p.name for p in (ROOT / "reclight").iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(
        LAYERS[1:-1])
