"""The rooms of core/ import only what docs/CONTRACTS.md allows, and the seed's names all resolve."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = {"core", "core.routing_data", "core.safe_io", "core.distributed"}
ALLOWED = {  # room -> other rooms its modules may import (docs/CONTRACTS.md, "The rooms of core/")
    "model_access": set(),
    "store": set(),
    "collection": {"store", "model_access", "analysis"},  # analysis only for the seed's compute_activation_correlations
    "analysis": set(),
    "study_moe": set(),
}


def _core_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("core"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("core"))
    return names


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_only_what_the_contract_allows(room):
    bad = []
    for path in sorted((REPO / "core" / room).glob("*.py")):
        for name in _core_imports(path):
            parts = name.split(".")
            if name in SHARED or parts[1] == room or parts[1] in ALLOWED[room]:
                continue
            bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "; ".join(bad)


def test_the_generic_wrapper_does_not_load_the_toolkits_own_model():
    code = ("import sys, core.model_access.wrapper, core.collection.sweep, core.analysis.streaming; "
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
