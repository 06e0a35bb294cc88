"""Results compared as JSON: equal structure and values, floats to a relative tolerance.

Shares of a stream merged by several processes are summed in another order than one process
sums them, which moves the last bits of a float and nothing else.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def assert_same(a: Any, b: Any, path: str = "result", rel: float = 1e-9) -> None:
    """``a == b`` through dicts, lists and arrays, floats within ``rel`` (NaN equals NaN); the failing path is named."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):  # an array of metrics.json's array file (core.array_files)
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), f"{path}: {type(a).__name__} != {type(b).__name__}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.dtype} {a.shape} != {b.dtype} {b.shape}"
        close = np.isclose(a, b, rtol=rel, atol=1e-12, equal_nan=True) if a.dtype.kind == "f" else a == b
        bad = np.argwhere(~close)
        assert not len(bad), f"{path}{list(bad[0])}: {a[tuple(bad[0])]} != {b[tuple(bad[0])]} ({len(bad)} elements differ)"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
