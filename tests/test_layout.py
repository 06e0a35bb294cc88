"""The layout: the generic wrapper does not load the toolkit's own model, the seed's names resolve, exp/ holds only scripts.

Which room may import which: tests/test_import_contracts.py (import-linter, pyproject.toml).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_generic_wrapper_does_not_load_the_toolkits_own_model():
    code = ("import sys, core.model_access.wrapper, core.store.split_cache, core.collection.sweep, core.analysis.streaming; "
            "import core.study_moe.config; "
            "print(sorted(m for m in sys.modules if m.startswith('core.study_moe.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['core.study_moe.config']"


def test_every_public_name_of_core_resolves():
    import core

    missing = [name for name in core.__all__ if getattr(core, name, None) is None]
    assert not missing
    for seed_name in ("MoEModelWrapper", "RouterAnalyzer", "ExpertAnalyzer", "ActivationCollector", "RoutingData"):
        assert seed_name in core.__all__


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "exp").glob("*.py") if p.name != "__init__.py"))
def test_exp_holds_only_short_scripts_that_run_the_library(script):
    """A script parses nothing and defines nothing: it runs ``core.commands.<name>.main`` (the library does the work)."""
    path = REPO / "exp" / script
    tree = ast.parse(path.read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert not defined, f"{script} defines {defined}: move it into core.commands.{path.stem}"
    assert "sys.path" not in path.read_text(), f"{script} edits sys.path (the project is installed by uv)"
    assert f"core.commands.{path.stem}" in _imports(path)
    assert len(path.read_text().splitlines()) <= 25


def test_nothing_imports_the_scripts():
    """The library and the tests reach a command through ``core.commands``, never through ``exp``."""
    bad = [f"{p.relative_to(REPO)} imports {name}"
           for folder in ("core", "data", "viz", "tests") for p in sorted((REPO / folder).rglob("*.py"))
           for name in _imports(p) if name == "exp" or name.startswith("exp.")]
    assert not bad, "; ".join(bad)


def test_the_seed_import_of_the_main_experiment_still_works():
    """The seed's ``from exp.basic_routing_analysis import BasicRoutingAnalysis``, verbatim, in a fresh interpreter."""
    code = ("from exp.basic_routing_analysis import BasicRoutingAnalysis; import core.pipeline.run as r; "
            "assert BasicRoutingAnalysis is r.BasicRoutingAnalysis; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_no_function_is_over_60_lines():
    """Functions are split where their responsibilities part; none of the library or the scripts runs past 60 lines."""
    long = []
    for folder in ("core", "data", "viz", "exp"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "; ".join(long)
