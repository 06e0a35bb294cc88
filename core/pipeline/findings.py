"""Stage 3 of the main run: the headline numbers and what they say, in sentences a reader can check.

Every sentence is built from a number in the results (nothing is asserted that was not
measured), and each states its null (the same statistic on shuffled data: documents' tokens,
domain labels or token ids shuffled) and its 95% interval over documents, as
"X (95% CI a–b) against null Y", and says so plainly when the two cannot be told apart.
A finding is a few sentences at any number of layers and experts: the strongest effect, and
counts for the rest (``core.pipeline.findings_text``); the full tables are in the report and data files.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from core.analysis.correlations import adjacent_and_far
from core.pipeline import findings_text as text
from core.pipeline.suite import RunResults
from core.pipeline.findings_text import est_of, nats, span


def headline_numbers(res: RunResults) -> dict[str, Any]:
    """The few numbers a summary shows, as plain values."""
    out: dict[str, Any] = {"tokens": int(sum(res.tokens.values()))}
    stats = res.get("routing_stats")
    if stats is not None:
        out["utilization_entropy_norm"] = [round(float(x), 4) for x in stats.utilization_entropy_norm]
        out["diagnosis"] = list(stats.diagnosis)
        if stats.token_entropy_norm is not None:
            out["token_entropy_norm"] = [round(float(x), 4) for x in stats.token_entropy_norm]
    spec = res.get("domain_specialization")
    if spec is not None:
        out["domain_kl_nats"] = [round(float(x), 4) for x in spec.layer_score]
        out["max_domain_ratio"] = round(float(np.nanmax(spec.ratio)), 3)
    corr = res.get("correlation_topk")
    if corr is not None:
        adj, far = _adjacent_vs_far(corr.layer_mean_abs)
        out["corr_adjacent_mean_abs"] = adj
        out["corr_nonadjacent_mean_abs"] = far
    dyn = res.get("checkpoint_dynamics")
    if dyn is not None:
        out["saturation"] = {str(s): round(float(np.nanmean(v)), 4) for s, v in zip(dyn.steps, dyn.saturation)}
    pr = res.get("pruning")
    if pr is not None:
        out["pruning_best"] = {f"{f:g}": b for f, b in zip(pr.fractions, pr.best)}
    abl = res.get("ablation")
    if abl is not None:
        out["ablation_delta_nats"] = {t: dict(zip(abl.domains, np.round(d, 4).tolist())) for t, d in zip(abl.targets, abl.delta)}
    est = {"domain_divergence": est_of(spec, "layer_score"), "corr_adjacent": est_of(corr, "adjacent"),
           "corr_nonadjacent": est_of(corr, "non_adjacent"), "saturation": est_of(dyn, "saturation_mean"),
           "consistency_same_top1": est_of(res.get("routing_consistency"), "same_top1"),
           "consistency_next_in_topk": est_of(res.get("routing_consistency"), "next_in_topk"),
           "load_balance": est_of(stats, "utilization_entropy_norm"),
           "vocabulary": getattr(res.get("vocabulary_specialization"), "estimate", None),
           "ablation_delta": getattr(abl, "estimate", None)}
    out["estimates"] = {k: _significant(v.to_dict()) for k, v in est.items() if v is not None}
    align = res.get("expert_alignment")
    if align is not None and hasattr(align, "perm_p"):
        out["alignment"] = {str(l): {"own": round(float(align.mean_own[i]), 4), "experts_permuted": round(float(align.perm_null_mean[i]), 4),
                                     "p": round(float(align.perm_p[i]), 4), "r_over_h": round(float(align.mean_random[i]), 4)}
                            for i, l in enumerate(align.layers)}
    return out


def _significant(value: Any, digits: int = 6) -> Any:
    """Floats to ``digits`` significant digits, through dicts and lists: a headline quotes, metrics keep the rest.

    So shares of the tokens summed by several processes (in another order than one process
    sums them, which moves the last bits) quote the same headline.
    """
    if isinstance(value, dict):
        return {k: _significant(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_significant(v, digits) for v in value]
    if isinstance(value, float) and np.isfinite(value):
        return float(f"{value:.{digits}g}")
    return value


def _adjacent_vs_far(layer_mean_abs: np.ndarray) -> tuple[float | None, float | None]:
    """``adjacent_and_far`` of the correlation analysis, rounded, None where there are no such layer pairs."""
    return tuple(round(float(v), 4) if np.isfinite(v) else None for v in adjacent_and_far(layer_mean_abs))


def _ablation_text(abl: Any) -> str:
    """How many single-expert changes are nulls, how many are small, and the largest with its interval."""
    est, delta = abl.estimate, np.asarray(abl.delta, float)
    T, D = delta.shape
    size = np.where(np.isfinite(delta), np.abs(delta), -np.inf)
    ok = est is not None and np.isfinite(np.asarray(est.low, float)).any()
    dist = np.asarray(est.distinguishable, bool) & np.isfinite(np.asarray(est.low, float)) if ok else np.zeros_like(delta, bool)
    t, d = np.unravel_index(int(np.argmax(np.where(dist, size, -np.inf) if dist.any() else size)), delta.shape)
    single = all(sum(map(len, target.values())) == 1 for target in abl.target_experts)
    text = f"Ablation (loss change, nats per token; {T} {'single experts' if single else 'targets'} x {D} domains): "
    if ok:
        text += f"{delta.size - int(dist.sum())} of {delta.size} changes are not distinguishable from no change; "
    small = int(((size >= 0) & (size < 0.01)).sum())
    text += f"{small} of {delta.size} are under 0.01 nats. The largest is {abl.targets[t]} on {abl.domains[d]}, "
    if not ok:
        why = "resampling off" if est is None or not est.resamples else "each domain's tokens are in one document block"
        return text + f"{nats(delta[t, d])} (no interval: {why})."
    return text + (f"{nats(delta[t, d])} (95% CI {span(est.low[t, d], est.high[t, d], nats)})"
                   + ("" if dist[t, d] else ", not distinguishable from no change") + ".")


def _pruning(pr: Any) -> str:
    """The fraction where a criterion does best against random (else the largest), and who beats random where."""
    names = {"weight_mass": "router weight mass", "collaboration": "collaboration share", "usage": "usage",
             "causal": "single-expert ablation", "random": "random"}
    rnd, F = pr.criteria.index("random"), len(pr.fractions)
    wins = [j for j in range(F) if np.asarray(pr.beats_random)[:, j].any()]
    j = wins[-1] if wins else F - 1
    c = min((i for i in range(len(pr.criteria)) if i != rnd), key=lambda i: pr.overall[i, j], default=rnd)
    verdict = ("beats random" if pr.beats_random[c, j] else "worse than random beyond the intervals"
               if pr.overall_low[c, j] > pr.overall_high[rnd, j] else "not distinguishable from random")  # also without intervals (NaN)
    ci = lambda i: f"{nats(pr.overall[i, j])} " + (  # noqa: E731
        f"(95% CI {span(pr.overall_low[i, j], pr.overall_high[i, j], nats)})"
        if np.isfinite(pr.overall_low[i, j]) and np.isfinite(pr.overall_high[i, j]) else "(no interval: too few documents)")
    beats = [f"{names.get(n, n)} at {int(pr.beats_random[i].sum())}" for i, n in enumerate(pr.criteria)
             if i != rnd and pr.beats_random[i].any()]
    return (f"Pruning (loss change, nats per token; random: {len(pr.random_seed_overall)} seeds): pruning "
            f"{pr.fractions[j]:.1%} of each layer's experts ({pr.experts_pruned[j]} of {pr.num_experts}), the best criterion, "
            f"{names.get(pr.criteria[c], pr.criteria[c])}, costs {ci(c)} against random {ci(rnd)}: {verdict}. "
            + (f"Beats random, of {F} fractions: " + ", ".join(beats) if beats
               else f"No criterion beats random at any of {F} fractions") + ".")


def findings(res: RunResults) -> list[str]:
    """A few sentences per analysis, each with its numbers, interval and null, at any number of layers and experts."""
    out: list[str] = []
    spec = res.get("domain_specialization")
    if spec is not None and len(spec.group_names) > 1:
        out.append(text.specialization(spec))
    corr = res.get("correlation_topk")
    if corr is not None and corr.layer_mean_abs.shape[0] > 1:
        out.append(text.correlation(corr, *_adjacent_vs_far(corr.layer_mean_abs)))
    for name, fn in (("routing_consistency", text.consistency), ("vocabulary_specialization", text.vocabulary)):
        if res.get(name) is not None:
            out.append(fn(res.get(name)))
    dyn = res.get("checkpoint_dynamics")
    if dyn is not None:
        out.append(text.saturation(dyn, res.model["top_k"]))
    if res.get("ablation") is not None:
        out.append(_ablation_text(res.get("ablation")))
    if res.get("pruning") is not None:
        out.append(_pruning(res.get("pruning")))
    out += _weights(res)
    if res.get("routing_stats") is not None:
        out.append(text.load_balance(res.get("routing_stats")))
    return [s for s in out if s]


def _alignment(align: Any) -> str:
    """How many layers' routers point into their own experts' input subspaces beyond permuted experts."""
    p, L = np.asarray(align.perm_p, float), len(align.layers)
    sig = p < 0.05
    effect = np.asarray(align.mean_own, float) - np.asarray(align.perm_null_mean, float)
    i = int(np.argmax(np.where(sig, effect, -np.inf)) if sig.any() else np.argmax(effect))
    return (f"Router–expert alignment (router row energy in its own expert's input subspace; null: experts permuted "
            f"{align.num_permutations} times): {int(sig.sum())} of {L} layers beyond the null, {0.05 * L:.1f} expected by chance "
            f"({'strongest' if sig.any() else 'largest'}: layer {align.layers[i]}, {align.mean_own[i]:.3f} against "
            f"{align.perm_null_mean[i]:.3f}, 95% range {align.perm_null_low[i]:.3f}–{align.perm_null_high[i]:.3f}, "
            f"p = {p[i]:.2g}" + ("" if sig[i] else ", not distinguishable") + ").")


def _hungarian(sim: Any) -> str:
    """How many adjacent layers' routers match beyond a rotated router, and the strongest pair."""
    adj = [(i, i + 1) for i in range(len(sim.layers) - 1)]
    p = np.array([sim.hungarian_p[a, b] for a, b in adj], float)
    gap = np.array([sim.hungarian_cosine[a, b] - sim.hungarian_null_mean[a, b] for a, b in adj], float)
    a, b = adj[int(np.argmax(gap))]
    sig = p[int(np.argmax(gap))] < 0.05
    return (f"Hungarian-matched cosine between adjacent layers' routers (null: one router randomly rotated, "
            f"{sim.num_null} draws): {int((p < 0.05).sum())} of {len(adj)} pairs above the null (p < 0.05); "
            f"largest: layers {sim.layers[a]}–{sim.layers[b]}, {sim.hungarian_cosine[a, b]:.3f} against "
            f"{sim.hungarian_null_mean[a, b]:.3f}, 95% range {sim.hungarian_null_low[a, b]:.3f}–"
            f"{sim.hungarian_null_high[a, b]:.3f}" + ("" if sig else ", not distinguishable")
            + ("" if getattr(sim, "centered", False) else "; rows not centred (sigmoid router)") + ".")


def _weights(res: RunResults) -> list[str]:
    out = []
    align = res.get("expert_alignment")
    if align is not None and hasattr(align, "perm_p"):
        out.append(_alignment(align))
    sim = res.get("router_similarity")
    if sim is not None and hasattr(sim, "hungarian_p") and len(sim.layers) > 1:
        out.append(_hungarian(sim))
    return out


_COUNT_REASON = re.compile(r"^\d+ (dead|dominant) experts\b")  # "3 dead experts": counted from stats.dead/dominant


def _problem_line(stats: Any, kind: str, note: str | None) -> str | None:
    """One line for all layers of one diagnosis: which layers, and in how many of them each reason holds."""
    idx = [i for i, d in enumerate(stats.diagnosis) if d == kind]
    if not idx:
        return None
    parts = []
    for what, mask in (("dead", stats.dead), ("dominant", stats.dominant)):
        rows = [i for i in idx if any((m := _COUNT_REASON.match(r)) and m.group(1) == what for r in stats.reasons[i])]
        if rows:
            parts.append(f"{what} experts in {len(rows)} ({int(np.asarray(mask, bool)[rows].sum())} in all)")
    other: dict[str, list[tuple[int, str]]] = {}  # the other reasons, grouped by their wording without the numbers
    for i in idx:
        for why in stats.reasons[i]:
            if not _COUNT_REASON.match(why):
                other.setdefault(re.sub(r"\d+(\.\d+)?", "#", why), []).append((stats.moe_layers[i], why))
    for hits in other.values():
        layer, why = hits[0]
        parts.append(f"{why} at layer {layer}" + (f" and {len(hits) - 1} more" if len(hits) > 1 else ""))
    one = len(idx) == 1
    return (f"{'layer' if one else 'layers'} {text.layer_list([stats.moe_layers[i] for i in idx])} of {len(stats.moe_layers)} "
            f"{'is' if one else 'are'} {kind}: " + "; ".join(parts)
            + " (see the routing statistics section" + (f"; {note}" if note else "") + ")")


def warnings_of(res: RunResults) -> list[str]:
    """One line per kind of problem (collapsed layers, imbalanced layers, each skipped analysis), layers named compactly."""
    out = []
    stats = res.get("routing_stats")
    if stats is not None:
        note = getattr(stats, "null_note", None)  # what the thresholds were judged against: said once
        for kind in ("collapsed", "imbalanced"):
            if line := _problem_line(stats, kind, note):
                out.append(line)
                note = "judged as above" if note else note
    for name, why in res.skipped.items():
        out.append(f"{name} skipped: {why}")
    abl = res.get("ablation")
    if abl is not None:
        out += abl.notes
    return out
