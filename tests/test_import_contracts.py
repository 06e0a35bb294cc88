"""The import contracts of pyproject.toml ([tool.importlinter], docs/CONTRACTS.md) hold, and no import cycle exists.

The contracts are checked by import-linter's own command, run from the repository root; the
cycle check builds the same import graph with grimp (which import-linter is built on).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("core", "data", "viz")


def _lint_imports() -> list[str]:
    """The command line of import-linter's ``lint-imports``, from the environment running the tests."""
    beside = Path(sys.executable).with_name("lint-imports")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("lint-imports")
    assert found, "lint-imports not found: install the dev dependencies (uv sync)"
    return [found]


def test_import_linter_contracts_are_kept():
    """`lint-imports` (import-linter) passes: every contract in pyproject.toml is kept."""
    out = subprocess.run([*_lint_imports(), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    report = out.stdout + out.stderr
    assert out.returncode == 0, f"lint-imports failed (exit {out.returncode}):\n{report}"
    assert "0 broken" in report, report


def strongly_connected_components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of a directed graph given as ``{node: successors}``, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(edges[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def import_cycles(*packages: str) -> list[list[str]]:
    """Every group of modules of ``packages`` that import one another in a circle (each group sorted).

    Every import counts: at module level, inside functions or ``TYPE_CHECKING`` blocks, and a
    package's ``__init__`` importing its own submodules; a module importing itself is a cycle of one.
    """
    graph = grimp.build_graph(*packages, cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & graph.modules for m in graph.modules}
    return [c for c in strongly_connected_components(edges) if len(c) > 1 or c[0] in edges[c[0]]]


def _describe(cycle: list[str], *packages: str) -> str:
    graph = grimp.build_graph(*packages, cache_dir=None)
    members = set(cycle)
    lines = [" <-> ".join(cycle)]
    for a in cycle:
        for b in sorted(set(graph.find_modules_directly_imported_by(a)) & members):
            where = [d["line_number"] for d in graph.get_import_details(importer=a, imported=b)]
            lines.append(f"  {a} imports {b} (line {', '.join(map(str, where))})")
    return "\n".join(lines)


def test_no_import_cycle_in_the_library():
    cycles = import_cycles(*LIBRARY)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, *LIBRARY) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    """The check above can fail: a planted two-module cycle and a longer one are found, a chain is not."""
    edges = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}, "g": {"g"}}
    found = [c for c in strongly_connected_components(edges) if len(c) > 1 or c[0] in edges[c[0]]]
    assert sorted(found) == [["a", "b"], ["c", "d", "e"], ["g"]]


def test_the_cycle_finder_sees_imports_inside_functions(tmp_path, monkeypatch):
    """A cycle closed by an import inside a function (as split_cache -> collector once was) is found."""
    pkg = tmp_path / "cyclic_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from cyclic_pkg.two import helper\n")
    (pkg / "two.py").write_text("def helper():\n    from cyclic_pkg.one import helper as h\n    return h\n")
    (pkg / "three.py").write_text("import cyclic_pkg.one\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclic_pkg") == [["cyclic_pkg.one", "cyclic_pkg.two"]]


MODEL_LIBRARIES = ("torch.nn", "transformers", "nnsight", "nnterp", "accelerate")


def test_the_store_imports_no_model_library():
    """import-linter names only top-level external packages, so ``torch.nn`` in core/store is checked here."""
    bad = []
    for path in sorted((REPO / "core" / "store").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                names = [f"{node.value.id}.{node.attr}"]  # torch.nn.Module used without importing torch.nn
            for name in names:
                if any(name == lib or name.startswith(lib + ".") for lib in MODEL_LIBRARIES):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} uses {name}")
    assert not bad, "; ".join(bad)
