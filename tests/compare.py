"""Results compared as JSON: equal structure and values, floats to a relative tolerance.

Shares of a stream merged by several processes are summed in another order than one process
sums them, which moves the last bits of a float and nothing else.
"""

from __future__ import annotations

import math
from typing import Any


def assert_same(a: Any, b: Any, path: str = "result", rel: float = 1e-9) -> None:
    """``a == b`` through dicts and lists, floats within ``rel`` (NaN equals NaN); the failing path is named."""
    if isinstance(a, dict):
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
