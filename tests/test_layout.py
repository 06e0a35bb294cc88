"""The layout of core/: the generic wrapper does not load the toolkit's own model, and the seed's names all resolve.

Which room may import which: tests/test_import_contracts.py (import-linter, pyproject.toml).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
