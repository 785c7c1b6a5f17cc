"""The package's import graph: acyclic, and layered as the README's layout section says.

Read from the source with ``ast`` (imports inside functions and under TYPE_CHECKING
count too), so a cycle cannot hide behind a function-level import."""

from __future__ import annotations

import ast
import importlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adaptive_moe"

# Which packages each package may import (besides itself): the layering, lowest first.
LAYERS: dict[str, set[str]] = {
    "core": set(),
    "calc": {"core"},
    "comm": {"core"},
    "tuning": {"core"},
    "runtime": {"core", "comm", "tuning"},
    "profiling": {"core", "calc", "comm", "tuning", "runtime"},
    "planning": {"core", "calc", "comm", "tuning", "runtime", "profiling"},
    "integrations": {"core", "calc", "comm", "tuning", "runtime"},
    # The trainer runs the dense part through the public ``parallelize``, as a user would.
    "training": {"core", "calc", "comm", "tuning", "runtime", "profiling", "integrations"},
}
TOP = {"adaptive_moe", "adaptive_moe.cli", "adaptive_moe.__main__"}  # may import anything


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Modules of the package ``path`` imports (``from . import x`` resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        # An import of a package counts as an import of its __init__ (only existing modules).
        graph[name] = {m for m in _imports(path, name) if m in paths and m != name}
    return graph


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_every_module_is_in_a_layered_package() -> None:
    loose = [m for m in _graph() if m not in TOP and _package(m) not in LAYERS]
    assert loose == [], f"modules outside the layered packages: {loose}"


def test_lower_layers_import_nothing_from_higher_ones() -> None:
    bad = []
    for module, deps in _graph().items():
        if module in TOP:
            continue
        own = _package(module)
        for dep in deps:
            target = _package(dep)
            if dep == "adaptive_moe" or (target not in (own, None) and target not in LAYERS[own]):
                bad.append(f"{module} -> {dep}")
    assert bad == [], "imports against the layering:\n" + "\n".join(sorted(bad))


def test_import_graph_has_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_modules_import_in_any_order() -> None:
    """Every module imports on its own, in a fresh interpreter, in a shuffled order."""
    names = sorted(set(_graph()) - {"adaptive_moe.__main__"})  # __main__ runs the CLI
    random.Random(0).shuffle(names)
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=240)


@pytest.mark.parametrize("name", ["adaptive_moe.core.config", "adaptive_moe.calc"])
def test_light_modules_do_not_import_torch_distributed_stack(name: str) -> None:
    code = f"import sys, {name}; print('adaptive_moe.runtime.layer' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True
    )
    assert out.stdout.strip() == "False"
    assert importlib.import_module(name)
