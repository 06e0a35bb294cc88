"""Stage 3 of the main run: the headline numbers and what they say, in sentences a reader can check.

Every sentence is built from a number in the results (nothing is asserted that was not
measured), and each states its null (the same statistic on shuffled data: documents' tokens,
domain labels or token ids shuffled) and its 95% interval over documents, as
"X (95% CI a–b) against null Y", and says so plainly when the two cannot be told apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.analysis.correlations import adjacent_and_far
from exp.analysis_suite import RunResults


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


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
    est = {"domain_divergence": _est(spec, "layer_score"), "corr_adjacent": _est(corr, "adjacent"),
           "corr_nonadjacent": _est(corr, "non_adjacent"), "saturation": _est(dyn, "saturation_mean"),
           "consistency_same_top1": _est(res.get("routing_consistency"), "same_top1"),
           "consistency_next_in_topk": _est(res.get("routing_consistency"), "next_in_topk"),
           "load_balance": _est(stats, "utilization_entropy_norm"),
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


def _est(obj: Any, name: str) -> Any:
    """The Estimate ``name`` of a result, or None (older results, resampling turned off)."""
    return (getattr(obj, "estimates", None) or {}).get(name)


def _specialization(spec: Any) -> str:
    parts = []
    top = _est(spec, "max_ratio")
    for d, name in enumerate(spec.group_names):
        r = spec.ratio[:, d, :]
        if not np.isfinite(r).any():
            continue
        li, ei = np.unravel_index(np.nanargmax(r), r.shape)
        text = (f"{name}: layer {spec.moe_layers[li]} expert {ei} takes {_pct(spec.share[li, d, ei])} of its tokens "
                f"({r[li, ei]:.2f}x the uniform {_pct(spec.baseline)}")
        parts.append(text + (f"; top ratio {top.at(d).text(lambda x: f'{x:.2f}x')})" if top is not None else ")"))
    kl = _est(spec, "layer_score")
    best = int(np.argmax(spec.layer_score))
    tail = (kl.at(best).text(lambda x: f"{x:.3f} nats") if kl is not None else f"{spec.layer_score[best]:.3f} nats")
    return ("Domain specialization: " + "; ".join(parts) + ". Divergence of a domain's routing from the overall routing "
            f"is largest at layer {spec.moe_layers[best]}: {tail}.")


def _correlation(corr: Any) -> str:
    adj, far = _adjacent_vs_far(corr.layer_mean_abs)
    ea, ef = _est(corr, "adjacent"), _est(corr, "non_adjacent")
    text = "Cross-layer correlation of expert selection, mean |r| between adjacent layers "
    text += ea.text() if ea is not None else f"{adj:.3f}"
    if far is not None:
        text += "; between non-adjacent layers " + (ef.text() if ef is not None else f"{far:.3f}")
    top = corr.top_pairs(1)
    if len(top):
        t = top.iloc[0]
        text += (f"; the strongest pair is layer {int(t.layer_a)} expert {int(t.expert_a)} with layer {int(t.layer_b)} "
                 f"expert {int(t.expert_b)} (r = {t['corr']:.3f})")
    if corr.undefined_features:
        text += f"; {corr.undefined_features} (layer, expert) features never varied and are left out"
    return text + "."


def _consistency(cons: Any) -> str:
    out = []
    for key, what in (("same_top1", "keeps its top-1 expert"), ("next_in_topk", "has its top-1 among the previous token's top-k")):
        est = _est(cons, key)
        if est is None:
            continue
        gap = np.asarray(est.value) - np.asarray(est.null)
        li = int(np.argmax(gap))
        n_dist = int(np.asarray(est.distinguishable).sum())
        out.append(f"the next token {what} most above chance at layer {cons.moe_layers[li]}: {est.at(li).text(_pct)}; "
                   f"{n_dist} of {len(gap)} layers are distinguishable from the shuffle")
    return ("Consecutive tokens (chance: each document's tokens shuffled, so a document's topic is not counted as "
            "stickiness): " + "; ".join(out) + ".") if out else ""


def _vocabulary(voc: Any) -> str:
    est = voc.estimate
    if est is None or not len(voc.token_ids):
        return ""
    li = int(np.argmax(np.asarray(est.value) - np.asarray(est.null)))
    return (f"Vocabulary ({len(voc.token_ids)} token ids seen at least {voc.min_count} times): the share of a token id's "
            f"occurrences that go to its most-used expert, averaged over token ids, is furthest above chance at layer "
            f"{voc.moe_layers[li]}: {est.at(li).text(_pct)}; {int(np.asarray(est.distinguishable).sum())} of "
            f"{len(voc.moe_layers)} layers differ from the shuffle.")


def _saturation(dyn: Any, k: int) -> str:
    sat = np.nanmean(dyn.saturation, axis=1)
    est = _est(dyn, "saturation_mean")
    if est is not None:
        steps = "; ".join(f"step {s}: {est.at(c).text(_pct)}" for c, s in enumerate(dyn.steps[:-1]))
        chance0 = float(np.asarray(est.null)[0])
    else:
        steps = ", ".join(f"step {s}: {_pct(v)}" for s, v in zip(dyn.steps[:-1], sat[:-1]))
        chance0 = k / dyn.utilization.shape[-1]
    mid = chance0 + (1 - chance0) / 2
    half = next((s for s, v in zip(dyn.steps, sat) if v >= mid), None)
    return (f"Router saturation (share of each token's top-{k} experts already chosen as at the final checkpoint, step "
            f"{dyn.steps[-1]}; chance: the same overlap with a random token of the same document): {steps}"
            + (f". It is halfway from the first checkpoint's chance to 100% ({_pct(mid)}) by step {half}." if half is not None else "."))


def _ablation_text(abl: Any) -> str:
    est = abl.estimate
    rows, flat = [], []
    for t, label in enumerate(abl.targets):
        cells = []
        for d, dom in enumerate(abl.domains):
            if est is None or not np.isfinite(est.low[t, d]):
                cells.append(f"{dom} {abl.delta[t, d]:+.3f}")
                continue
            cells.append(f"{dom} {abl.delta[t, d]:+.3f} [{est.low[t, d]:+.3f}, {est.high[t, d]:+.3f}]")
            if not est.distinguishable[t, d]:
                flat.append(f"{label.split(' ')[0]} on {dom}")
        rows.append(f"{label}: " + ", ".join(cells))
    text = "Ablation (change in loss, nats per token, by domain, 95% CI over documents) — " + "; ".join(rows) + "."
    if flat:
        text += f" Not distinguishable from no change ({len(flat)} of {abl.delta.size}): " + ", ".join(flat) + "."
    return text


def _pruning(pr: Any) -> str:
    """Which criterion keeps the model best at each pruned fraction, and whether it beats random beyond the intervals."""
    names = {"weight_mass": "router weight mass", "collaboration": "collaboration share", "usage": "usage",
             "causal": "single-expert ablation", "random": "random"}
    rnd = pr.criteria.index("random")
    parts = []
    for j, f in enumerate(pr.fractions):
        c = pr.criteria.index(pr.best[j])
        verdict = ("beats random beyond the intervals" if pr.beats_random[c, j] else
                   "random itself" if c == rnd else "not distinguishable from random")
        parts.append(f"{f:.1%} pruned ({pr.experts_pruned[j]} of {pr.num_experts} experts per layer): best {names.get(pr.best[j], pr.best[j])} {pr.overall[c, j]:+.3f} "
                     f"[{pr.overall_low[c, j]:+.3f}, {pr.overall_high[c, j]:+.3f}] against random {pr.overall[rnd, j]:+.3f} "
                     f"[{pr.overall_low[rnd, j]:+.3f}, {pr.overall_high[rnd, j]:+.3f}] ({verdict})")
    beats = [f"{names.get(n, n)} at {int(pr.beats_random[i].sum())} of {len(pr.fractions)}"
             for i, n in enumerate(pr.criteria) if i != rnd]
    return ("Pruning (loss change, nats per token, token-weighted over domains, 95% CI over documents; each layer loses "
            f"the same share of its experts; random over {len(pr.random_seed_overall)} seeds): " + "; ".join(parts)
            + ". Beats random beyond the intervals: " + ", ".join(beats) + ".")


def _load_balance(stats: Any) -> str:
    est = _est(stats, "utilization_entropy_norm")
    if est is None:
        return ("Load balance per layer (normalized utilization entropy, 1 = uniform): "
                + ", ".join(f"layer {l}: {e:.3f} ({d})" for l, e, d in zip(stats.moe_layers, stats.utilization_entropy_norm, stats.diagnosis)) + ".")
    li = int(np.argmin(est.value))
    return (f"Load balance (normalized utilization entropy, 1 = uniform): lowest at layer {stats.moe_layers[li]}, "
            f"{est.at(li).text()}; per layer " + ", ".join(f"{l}: {e:.3f}" for l, e in zip(stats.moe_layers, est.value))
            + f"; diagnosis {', '.join(f'{l}: {d}' for l, d in zip(stats.moe_layers, stats.diagnosis))}.")


def findings(res: RunResults) -> list[str]:
    """Sentences for the report and the terminal, each with its numbers, interval and null."""
    out: list[str] = []
    spec = res.get("domain_specialization")
    if spec is not None and len(spec.group_names) > 1:
        out.append(_specialization(spec))
    corr = res.get("correlation_topk")
    if corr is not None and corr.layer_mean_abs.shape[0] > 1:
        out.append(_correlation(corr))
    for name, fn in (("routing_consistency", _consistency), ("vocabulary_specialization", _vocabulary)):
        if res.get(name) is not None:
            out.append(fn(res.get(name)))
    dyn = res.get("checkpoint_dynamics")
    if dyn is not None:
        out.append(_saturation(dyn, res.model["top_k"]))
    if res.get("ablation") is not None:
        out.append(_ablation_text(res.get("ablation")))
    if res.get("pruning") is not None:
        out.append(_pruning(res.get("pruning")))
    out += _weights(res)
    if res.get("routing_stats") is not None:
        out.append(_load_balance(res.get("routing_stats")))
    return [s for s in out if s]


def _weights(res: RunResults) -> list[str]:
    out = []
    align = res.get("expert_alignment")
    if align is not None and hasattr(align, "perm_p"):
        rows = []
        for li, layer in enumerate(align.layers):
            verdict = "" if align.perm_p[li] < 0.05 else ", not distinguishable"
            rows.append(f"layer {layer}: {align.mean_own[li]:.3f} against {align.perm_null_mean[li]:.3f} "
                        f"(95% range {align.perm_null_low[li]:.3f}–{align.perm_null_high[li]:.3f}), p = {align.perm_p[li]:.3g}{verdict}")
        out.append("Router–expert alignment (share of a router row's energy in its own expert's input subspace, against the "
                   f"same share with experts permuted, {align.num_permutations} permutations): " + "; ".join(rows)
                   + f". A random subspace of the same size would hold r/H = {np.mean(align.mean_random):.3f} (reference only: "
                   "trained weights are anisotropic).")
    sim = res.get("router_similarity")
    if sim is not None and hasattr(sim, "hungarian_p") and len(sim.layers) > 1:
        L = len(sim.layers)
        adj = [(i, i + 1) for i in range(L - 1)]
        obs = np.mean([sim.hungarian_cosine[i, j] for i, j in adj])
        null = np.mean([sim.hungarian_null_mean[i, j] for i, j in adj])
        hits = sum(sim.hungarian_p[i, j] < 0.05 for i, j in adj)
        out.append(f"Hungarian-matched cosine between adjacent layers' routers: mean {obs:.3f} against {null:.3f} for a "
                   f"randomly rotated router (same spectrum, experts unmatched); {hits} of {len(adj)} adjacent pairs are "
                   f"above that null (p < 0.05)" + ("" if getattr(sim, "centered", False) else "; rows not centred (sigmoid router)")
                   + ".")
    return out


def warnings_of(res: RunResults) -> list[str]:
    """Collapse and dead-expert warnings, with the thresholds that raised them."""
    out = []
    stats = res.get("routing_stats")
    if stats is not None:
        for layer, diag, reasons, dead in zip(stats.moe_layers, stats.diagnosis, stats.reasons, stats.dead):
            if diag != "healthy":
                out.append(f"layer {layer} is {diag}: " + "; ".join(reasons))
    for name, why in res.skipped.items():
        out.append(f"{name} skipped: {why}")
    abl = res.get("ablation")
    if abl is not None:
        out += abl.notes
    return out
