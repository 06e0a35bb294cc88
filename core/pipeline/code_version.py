"""The version of the analysis code a stored result was computed by: a digest of its sources and numerical libraries.

A stored result (``core.pipeline.result_store``) is reused only under the same digest, so any edit of
an analysis, of the cache reader, of the one pass or of the result codec, and any other version of
numpy, scipy, scikit-learn, torch, safetensors or transformers, computes it again. Figures (``viz``) are not part
of it: a changed figure reuses every result.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
# the analyses, their specs, the model access the forward-pass analyses run through (ablation, generation), the cache reader, the stream, the stored form and the identities of stored results
CODE = ("core/analysis", "core/pipeline/analyses", "core/model_access", "core/store", "core/routing_data.py", "core/pipeline/shares.py",
        "core/pipeline/suite.py", "core/pipeline/context.py", "core/pipeline/pass_reuse.py", "core/pipeline/reuse.py",
        "core/pipeline/result_codec.py", "core/pipeline/spec.py")
LIBRARIES = ("numpy", "scipy", "scikit-learn", "torch", "safetensors", "transformers")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of the source files in :data:`CODE` (paths and bytes) and the versions of :data:`LIBRARIES`."""
    h = hashlib.sha256()
    for entry in CODE:
        path = _ROOT / entry
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f"{f.relative_to(_ROOT).as_posix()}:{f.stat().st_size}:".encode())
            h.update(f.read_bytes())
    for lib in LIBRARIES:
        h.update(f"{lib}={_version(lib)};".encode())
    return h.hexdigest()[:16]


def _version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "absent"
