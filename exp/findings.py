"""Stage 3 of the main run: the headline numbers and what they say, in sentences a reader can check.

Every sentence is built from a number in the results (nothing is asserted that was not
measured), and each comes with the baseline that gives it meaning: the uniform share k/E for
specialization, non-adjacent layers for correlation, the least-used expert for ablation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
    abl = res.get("ablation")
    if abl is not None:
        out["ablation_delta_nats"] = {t: dict(zip(abl.domains, np.round(d, 4).tolist())) for t, d in zip(abl.targets, abl.delta)}
    align = res.get("expert_alignment")
    if align is not None:
        out["alignment_own_vs_random"] = [round(float(np.mean(align.own)), 4), round(float(np.mean(align.random_mean)), 4)]
    return out


def _adjacent_vs_far(layer_mean_abs: np.ndarray) -> tuple[float | None, float | None]:
    L = layer_mean_abs.shape[0]
    adj = [layer_mean_abs[i, i + 1] for i in range(L - 1)]
    far = [layer_mean_abs[i, j] for i in range(L) for j in range(i + 2, L)]
    return (round(float(np.mean(adj)), 4) if adj else None, round(float(np.mean(far)), 4) if far else None)


def findings(res: RunResults) -> list[str]:
    """Sentences for the report and the terminal, each with its numbers and baseline."""
    out: list[str] = []
    spec = res.get("domain_specialization")
    if spec is not None and len(spec.group_names) > 1:
        parts = []
        for d, name in enumerate(spec.group_names):
            r = spec.ratio[:, d, :]
            li, ei = np.unravel_index(np.nanargmax(r), r.shape)
            parts.append(f"{name}: layer {spec.moe_layers[li]} expert {ei} takes {_pct(spec.share[li, d, ei])} of its tokens "
                         f"({r[li, ei]:.2f}x the uniform {_pct(spec.baseline)})")
        best = int(np.argmax(spec.layer_score))
        out.append("Domain specialization: " + "; ".join(parts) + f". Divergence of a domain's routing from the overall "
                   f"routing is largest at layer {spec.moe_layers[best]} ({spec.layer_score[best]:.3f} nats; per layer "
                   f"{', '.join(f'{x:.3f}' for x in spec.layer_score)}).")
    corr = res.get("correlation_topk")
    if corr is not None and corr.layer_mean_abs.shape[0] > 1:
        adj, far = _adjacent_vs_far(corr.layer_mean_abs)
        top = corr.top_pairs(1)
        text = f"Cross-layer correlation of expert selection: mean |r| between adjacent layers {adj:.3f}"
        text += f", between non-adjacent layers {far:.3f}" if far is not None else ""
        if len(top):
            t = top.iloc[0]
            text += (f"; the strongest pair is layer {int(t.layer_a)} expert {int(t.expert_a)} with layer {int(t.layer_b)} expert {int(t.expert_b)} "
                     f"(r = {t['corr']:.3f})")
        out.append(text + ".")
    dyn = res.get("checkpoint_dynamics")
    if dyn is not None:
        sat = np.nanmean(dyn.saturation, axis=1)
        k, n_exp = res.model["top_k"], res.model["num_experts"]
        chance = k / n_exp
        steps = ", ".join(f"step {s}: {_pct(v)}" for s, v in zip(dyn.steps, sat))
        mid = chance + (1 - chance) / 2
        half = next((s for s, v in zip(dyn.steps, sat) if v >= mid), None)
        out.append(f"Router saturation (share of each token's top-{k} experts already chosen as at the final checkpoint; "
                   f"chance {_pct(chance)}): {steps}" + (f"; it is halfway from chance to 100% ({_pct(mid)}) by step {half}." if half is not None else "."))
    abl = res.get("ablation")
    if abl is not None:
        rows = []
        for label, delta in zip(abl.targets, abl.delta):
            rows.append(f"{label}: " + ", ".join(f"{d} {v:+.3f}" for d, v in zip(abl.domains, delta)))
        out.append("Ablation (change in loss, nats per token, by domain) — " + "; ".join(rows) + ".")
    align = res.get("expert_alignment")
    if align is not None:
        out.append(f"Router rows lie in their own expert's input subspace with mean energy share {np.mean(align.own):.3f}, "
                   f"against {np.mean(align.other_mean):.3f} for other experts' subspaces and {np.mean(align.random_mean):.3f} "
                   f"for random subspaces of the same dimension.")
    stats = res.get("routing_stats")
    if stats is not None:
        out.append("Load balance per layer (normalized utilization entropy, 1 = uniform): "
                   + ", ".join(f"layer {l}: {e:.3f} ({d})" for l, e, d in zip(stats.moe_layers, stats.utilization_entropy_norm, stats.diagnosis))
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
