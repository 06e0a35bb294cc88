"""The sentences of the findings: a few per analysis, whatever the number of layers and experts.

A sentence quotes the strongest effect with its 95% interval over documents and its null (the
same statistic on shuffled data), and counts the rest ("n of L layers differ from the shuffle"):
the full per-layer and per-expert tables are in the report and the data files, so a sentence at
16 layers x 64 experts is as long as one at 4 x 8. Each sentence keeps its opening words, which
``viz.run_report`` uses to link it to its figure.
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


# ---------------------------------------------------------------------------- routing analyses
def specialization(spec: Any) -> str:
    """The most domain-specific expert, and the layer whose routing depends most on the domain."""
    top, kl = est_of(spec, "max_ratio"), est_of(spec, "layer_score")
    D, by = len(spec.group_names), spec.group_by
    best = []  # per domain: (layer index, expert) of the largest ratio
    for d in range(D):
        r = spec.ratio[:, d, :]
        best.append(np.unravel_index(np.nanargmax(r), r.shape) if np.isfinite(r).any() else None)
    seen = [d for d in range(D) if best[d] is not None]
    if not seen:
        return ""
    d = (seen[strongest(top.at(seen)) if len(seen) > 1 else 0] if top is not None
         else max(seen, key=lambda g: spec.ratio[best[g][0], g, best[g][1]]))
    li, e = best[d]
    x = lambda v: f"{v:.2f}x"  # noqa: E731
    ratio = quote(top.at(d), x, "") if top is not None else x(spec.ratio[li, d, e])
    text = (f"Domain specialization (null: {by} labels shuffled): the top expert is L{spec.moe_layers[li]}:E{e} for "
            f"{spec.group_names[d]}, share over uniform {ratio}")
    if top is not None and D > 1:
        text += f"; {count_of(top.at(seen))} {by}s beyond the null"
    b = strongest(kl) if kl is not None else int(np.argmax(spec.layer_score))
    div = quote(kl.at(b), f3, "") if kl is not None else f3(spec.layer_score[b])
    text += f". KL to the overall routing (nats) peaks at layer {spec.moe_layers[b]}, {div}"
    return text + (f"; {count_of(kl)} layers beyond the null." if kl is not None else ".")


def correlation(corr: Any, adj: float | None, far: float | None) -> str:
    """Adjacent against non-adjacent layers, and how many layer pairs correlate beyond the shuffle."""
    ea, ef, pairs = est_of(corr, "adjacent"), est_of(corr, "non_adjacent"), est_of(corr, "layer_mean_abs")
    text = "Cross-layer correlation of expert selection (mean |r|; null: layers shuffled within documents): adjacent layers "
    text += quote(ea, null="") if ea is not None else f3(adj)
    if far is not None:
        text += "; non-adjacent " + (quote(ef, null="") if ef is not None else f3(far))
    L = len(corr.moe_layers)
    if pairs is not None and L > 2:
        iu = np.triu_indices(L, k=1)
        sub = pairs.at(iu)
        i = strongest(sub)
        text += f"; {count_of(sub)} layer pairs beyond the null"
        if np.asarray(sub.distinguishable).any():
            text += f" (furthest: layers {corr.moe_layers[iu[0][i]]}–{corr.moe_layers[iu[1][i]]})"
    if corr.undefined_features:
        n = corr.undefined_features
        text += f"; {n} constant (layer, expert) feature{'s' if n > 1 else ''} left out"
    return text + "."


def consistency(cons: Any) -> str:
    """Whether the next token keeps its expert more than a shuffle of its document would."""
    same, nxt = est_of(cons, "same_top1"), est_of(cons, "next_in_topk")
    out = []
    if same is not None:
        li = strongest(same)
        out.append(f"the next token keeps its top-1 expert most above chance at layer {cons.moe_layers[li]}, "
                   f"{quote(same.at(li), pct, '')}; {count_of(same)} layers beyond it")
    if nxt is not None:
        out.append(f"its top-1 is in the previous token's top-k beyond chance at {count_of(nxt)} layers")
    return ("Consecutive tokens (chance: each document's tokens shuffled): " + "; ".join(out) + ".") if out else ""


def vocabulary(voc: Any) -> str:
    """How much a token id sticks to one expert, beyond what its domain explains."""
    est = voc.estimate
    if est is None or not len(voc.token_ids):
        return ""
    li = strongest(est)
    return (f"Vocabulary ({len(voc.token_ids)} token ids seen {voc.min_count}+ times; chance: ids shuffled within domain): "
            f"a token id's share at its top expert is furthest above chance at layer {voc.moe_layers[li]}, "
            f"{quote(est.at(li), pct, '')}; {count_of(est)} layers beyond chance.")


def saturation(dyn: Any, k: int) -> str:
    """How early the routing settles: the first checkpoint against chance, and the step it is halfway to final."""
    sat = np.nanmean(dyn.saturation, axis=1)
    est = est_of(dyn, "saturation_mean")
    if est is not None:
        first = quote(est.at(0), pct, "")
        chance0 = float(np.asarray(est.null)[0])
        first += f"; {count_of(est.at(slice(0, -1)))} earlier checkpoints beyond chance"
    else:
        first, chance0 = pct(sat[0]), k / dyn.utilization.shape[-1]
    mid = chance0 + (1 - chance0) / 2
    half = next((s for s, v in zip(dyn.steps, sat) if v >= mid), None)
    return (f"Router saturation (share of a token's top-{k} experts as at the final step {dyn.steps[-1]}; chance: a random "
            f"token of its document): step {dyn.steps[0]}, {first}"
            + (f". Halfway from chance to 100% ({pct(mid)}) by step {half}." if half is not None else "."))


def load_balance(stats: Any) -> str:
    """The least balanced layer, how many layers are less even than uniform routing, and the diagnoses counted."""
    est = est_of(stats, "utilization_entropy_norm")
    diag = ", ".join(f"{c} {kind}" for kind in ("collapsed", "imbalanced", "healthy") if (c := list(stats.diagnosis).count(kind)))
    L = len(stats.moe_layers)
    if est is None:
        li = int(np.argmin(stats.utilization_entropy_norm))
        return (f"Load balance (normalized utilization entropy, 1 = uniform; no interval: resampling off): lowest at layer "
                f"{stats.moe_layers[li]}, {stats.utilization_entropy_norm[li]:.3f}; {diag} of {L} layers.")
    li = int(np.argmin(est.value))
    return (f"Load balance (normalized utilization entropy, 1 = uniform): lowest at layer {stats.moe_layers[li]}, "
            f"{quote(est.at(li), null='uniform routing')}; {count_of(est)} layers below the uniform-routing null; "
            f"{diag} of {L} layers.")
