"""How findings quote numbers: an Estimate as "X (95% CI a–b) against null Y", counts, layer lists, formats.

Each analysis writes its own sentences (``core.pipeline.analyses``) with these helpers. A
sentence quotes the strongest effect with its 95% interval over documents and its null (the
same statistic on shuffled data), and counts the rest ("n of L layers differ from the shuffle"):
the full per-layer and per-expert tables are in the report and the data files, so a sentence at
16 layers x 64 experts is as long as one at 4 x 8.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Fmt = Callable[[float], str]


def f3(x: float) -> str:
    return f"{x:.3f}"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def nats(x: float) -> str:
    """Signed nats, in scientific notation below 0.001 so that tiny effects do not all read +0.000."""
    x = float(x)
    return f"{x:+.3f}" if x == 0 or abs(x) >= 0.001 else f"{x:+.1e}"


def est_of(obj: Any, name: str) -> Any:
    """The Estimate ``name`` of a result, or None (older results, resampling turned off)."""
    return (getattr(obj, "estimates", None) or {}).get(name)


def short_null(name: str) -> str:
    """A null's name without its trailing details in parentheses (the report's tables keep them)."""
    return re.sub(r"\s*\([^()]*\)$", "", name)


def span(lo: float, hi: float, fmt: Fmt) -> str:
    """``a–b``, or ``a to b`` when the numbers carry signs (a dash would read as a minus)."""
    a, b = fmt(lo), fmt(hi)
    return f"{a} to {b}" if a[:1] in "+-" or b[:1] in "+-" else f"{a}–{b}"


def quote(est: Any, fmt: Fmt = f3, null: str | None = None) -> str:
    """One element of an Estimate: "X (95% CI a–b) against <null> N (95% range c–d)", and the verdict if null.

    ``null``: a shorter name for the null than the Estimate's (the sentence's preamble says what it is).
    """
    v, lo, hi, n, nlo, nhi = (float(np.asarray(x)) for x in (est.value, est.low, est.high, est.null, est.null_low, est.null_high))
    name = short_null(est.null_name) if null is None else null
    ci = f" (95% CI {span(lo, hi, fmt)})" if np.isfinite(lo) and np.isfinite(hi) else " (no interval)"
    rng = f" (95% range {span(nlo, nhi, fmt)})" if np.isfinite(nlo) and fmt(nlo) != fmt(nhi) else ""
    s = f"{fmt(v)}{ci} against {name + ' ' if name else ''}{fmt(n)}{rng}"
    if not np.isfinite(lo):
        return s
    return s + ("" if bool(est.distinguishable) else ", not distinguishable")


def count_of(est: Any, total: int | None = None) -> str:
    """"n of N" elements of an Estimate distinguishable from their null."""
    d = np.asarray(est.distinguishable, bool)
    return f"{int(d.sum())} of {d.size if total is None else total}"


def flagged(est: Any, what: str = "layers", beyond: str = "beyond the null", correction: bool = True) -> str:
    """"n of N <what> <beyond>", with the correction and how many false flags it allows per run, as a count.

    "3 of 16 layers beyond the null (Holm: ≈ 0.05 false per run)": corrected over the 16 layers
    (Holm), so by chance at most 0.05 of a layer is flagged per run, a count, not a share.
    Without a verdict (too few documents), says why instead.
    """
    if getattr(est, "why_none", "") and not np.isfinite(np.asarray(est.low, float)).any():
        return f"no verdict on {what}: {est.why_none}"
    text = f"{count_of(est)} {what} {beyond}"
    if not correction:  # the sentence says it once for all its counts
        return text
    if getattr(est, "p_adjusted", None) is not None and est.family > 1:
        return text + f" (Holm: ≈ {est.expected_false:.2g} false per run)"
    return text + f" ({est.expected_false:.2g} false per run by chance)"


def layer_list(layers: Sequence[int]) -> str:
    """Layer numbers with runs written as ranges: ``5, 9, 12–15``."""
    layers = sorted(int(x) for x in layers)
    out: list[str] = []
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        out.append(str(layers[i]) if j == i else f"{layers[i]}, {layers[j]}" if j == i + 1 else f"{layers[i]}–{layers[j]}")
        i = j + 1
    return ", ".join(out)


def strongest(est: Any) -> int | tuple:
    """Index of the element furthest above its null, preferring those distinguishable from it."""
    gap = np.asarray(est.value, float) - np.asarray(est.null, float)
    gap = np.where(np.isfinite(gap), gap, -np.inf)
    d = np.asarray(est.distinguishable, bool) & np.isfinite(np.asarray(est.low, float))
    flat = np.where(d, gap, -np.inf) if d.any() else gap
    return np.unravel_index(int(np.argmax(flat)), np.shape(gap)) if np.ndim(gap) > 1 else int(np.argmax(flat))
