"""Turn one run's analysis results into the HTML report: a figure (and its numbers) per analysis.

Reads result objects by their documented fields and hands plain arrays to ``viz.plotting``;
it computes nothing new, so every number in the page is one the analyses produced.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from viz import matrix_views as V
from viz import plotting as P
from viz._common import token_label
from viz.report import Report


# the figure behind each finding, by how the finding begins (exp.findings writes them)
_FINDING_FIGURES = (("Load balance", "utilization"), ("Domain specialization", "domain_divergence"),
                    ("Cross-layer correlation", "correlation_layer_summary"), ("Consecutive tokens", "routing_consistency_same_top1"),
                    ("Vocabulary", "vocabulary_specialization"), ("Router saturation", "saturation_vs_chance"),
                    ("Ablation", "ablation"), ("Pruning", "pruning"), ("Router–expert alignment", "router_expert_alignment"),
                    ("Hungarian-matched cosine", "hungarian_cosine_vs_null"), ("Collaboration", "collaboration_patterns"))


def _figure_of(finding: str) -> str | None:
    return next((name for start, name in _FINDING_FIGURES if finding.startswith(start)), None)


def parameter_table(params: dict[str, Any]) -> pd.DataFrame:
    """Parameters as a two-column table, floats to 4 significant digits (a report quotes them, it does not dump a dict)."""
    def shown(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.4g}"
        return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return pd.DataFrame({"parameter": list(params), "value": [shown(v) for v in params.values()]})


def _matrix_frame(m: np.ndarray, labels: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(np.asarray(m), index=list(labels), columns=list(labels))


def build_report(
    results: Any,
    summary: dict[str, Any],
    findings: list[str],
    warnings: list[str],
    decode: Callable[[int], str] | None = None,
    title: str = "MoE routing report",
) -> tuple[Report, dict[str, go.Figure]]:
    """The report and the figures by name (for static export and W&B)."""
    rep = Report(title, summary=summary, warnings=warnings)
    figs: dict[str, go.Figure] = {}

    def add(section: str, name: str, fig: go.Figure, data: Any = None, caption: str | None = None,
            arrays: Sequence[str] = ()) -> None:
        rep.add_figure(section, fig, name, data=data, caption=caption, arrays=arrays)
        figs[name] = fig

    rep.lead = [(f, _figure_of(f)) for f in findings] or [("No findings: no analysis ran.", None)]
    r = results.results
    _stats_section(r, add, rep)
    _correlation_section(r, add, rep)
    _coactivation_section(r, add, rep)
    _specialization_section(r, add, rep, decode)
    _weights_section(r, add, rep)
    _dynamics_section(r, add, rep)
    _collaboration_section(r, add, rep)
    _ablation_section(r, add, rep)
    _pruning_section(r, add, rep)
    return rep, figs


def _stats_section(r: dict[str, Any], add: Callable[..., None], rep: Report) -> None:
    """Utilization per layer and expert, overall and per dataset; token entropy against log E."""
    stats = r.get("routing_stats")
    if stats is not None:
        L, E = list(stats.moe_layers), stats.num_experts
        rep.add_section("Routing statistics", "Expert utilization per layer and the diagnosis of each layer; its thresholds, "
                        "in units of the uniform share 1/E, are in the table below.")
        null = getattr(stats, "null_note", "")
        rep.add_table("Routing statistics", parameter_table(stats.thresholds.to_dict()), "diagnosis_thresholds",
                      caption="Thresholds of the dead / dominant / collapsed / imbalanced diagnosis"
                      + (f". The null: {null}." if null else "."))
        rep.add_table("Routing statistics", pd.DataFrame({"layer": L, "diagnosis": stats.diagnosis,
                                                          "why": ["; ".join(w) for w in stats.reasons]}),
                      "diagnosis_per_layer", caption="Each layer's diagnosis and what raised it (beyond the null above).")
        add("Routing statistics", "utilization", P.utilization_heatmap(stats.utilization, L), stats.expert_table())
        if stats.token_entropy is not None:
            add("Routing statistics", "token_entropy", P.entropy_per_layer(stats.token_entropy, L, max_entropy=math.log(E)),
                stats.layer_table(), caption="Mean entropy of each token's routing distribution; the dashed line is log E (uniform).")
        for name, s in (r.get("routing_stats_by_dataset") or {}).items():
            add("Routing statistics", f"utilization_{name}", P.utilization_heatmap(s.utilization, L, title=f"Expert utilization on {name}"),
                s.expert_table())


def _usage(r: dict[str, Any]) -> np.ndarray | None:
    """Each layer's expert load ``[L, E]``: which experts a wide model's expert-level figures keep."""
    stats, co = r.get("routing_stats"), r.get("coactivation")
    if stats is not None:
        return np.asarray(stats.utilization, dtype=float)
    return None if co is None else np.asarray(co.counts, dtype=float)


def _experts_note(num_experts: int, what: str = "each layer") -> str:
    if num_experts <= V.MAX_EXPERTS:
        return ""
    return f" Only the {V.MAX_EXPERTS} most used experts of {what} (of {num_experts}) are shown, in index order."


def _pair_picker(matrix: np.ndarray, E: int, layers: list[int], scores: np.ndarray, usage: np.ndarray | None,
                 title: str, measure: str, score_name: str) -> tuple[go.Figure, pd.DataFrame, str] | None:
    """The expert-level blocks of a bounded set of layer pairs from an ``[L*E, L*E]`` matrix, one at a time.

    Returns the figure, the strongest expert pairs within each shown layer pair, and a caption
    saying which pairs and experts are shown (None with a single layer: no pair to show).
    """
    pairs = V.layer_pairs(scores)
    if not pairs:
        return None
    keep = [V.top_experts(None if usage is None else usage[i], E) for i in range(len(layers))]
    fig = P.correlation_by_layer_pair(
        [V.block(matrix, E, a, b)[np.ix_(keep[a], keep[b])] for a, b in pairs],
        [(layers[a], layers[b]) for a, b in pairs], [keep[a] for a, _ in pairs], [keep[b] for _, b in pairs],
        scores=[scores[a, b] for a, b in pairs], shown=V.strongest(pairs, scores), title=title, measure=measure)
    L = len(layers)
    adjacent = "every adjacent pair" if L - 1 < V.MAX_OPTIONS else "evenly spaced adjacent pairs"
    caption = (f"Pick a layer pair in the menu ({len(pairs)} of the {L * (L - 1) // 2}: {adjacent} and the strongest by "
               f"{score_name}, shown beside each; it opens on the strongest).{_experts_note(E)} The numbers list the "
               "strongest expert pairs within each pair shown.")
    return fig, V.pair_table(matrix, E, layers, pairs, value="corr_diff" if measure.startswith("Δ") else "corr"), caption


def _correlation_section(r: dict[str, Any], add: Callable[..., None], rep: Report) -> None:
    """Cross-layer correlation: layer-level summaries, and the expert level of one layer pair at a time."""
    corr = r.get("correlation_topk")
    if corr is None:
        return
    sec, layers, E, usage = "Cross-layer correlations", list(corr.moe_layers), corr.num_experts, _usage(r)
    rep.add_section(sec, "Pearson correlation over tokens of expert-selection indicators (and router probabilities). "
                    "Each layer-level summary is the mean |r| over all expert pairs of two layers; the expert-level "
                    "figure below it shows one layer pair at a time.")
    for key, res, what in (("correlation_topk", corr, "expert selection"), ("correlation_probs", r.get("correlation_probs"), "router probabilities")):
        if res is None:
            continue
        summary = "correlation_layer_summary" if key == "correlation_topk" else f"{key}_layer_summary"
        add(sec, summary, P.router_similarity_heatmap(res.layer_mean_abs, layers, title=f"Mean |r| between layers' {what}", measure="mean |r|"),
            _matrix_frame(res.layer_mean_abs, [str(l) for l in layers]), arrays=[f"{key}/corr"])
        picked = _pair_picker(res.corr, E, layers, res.layer_mean_abs, usage, f"Correlation of {what}", "Pearson r", "mean |r|")
        if picked is not None:
            add(sec, key, picked[0], picked[1], caption=picked[2], arrays=[f"{key}/corr"])
        if len(layers) > 1:
            rep.add_table(sec, V.per_layer_table(res.corr, E, layers), f"{key}_pairs_per_layer",
                          caption=f"Each layer's three strongest expert pairs with any other layer ({what}, over all layer pairs).")
    for pair, diff in (r.get("correlation_difference") or {}).items():
        slug = "".join(c if c.isalnum() else "_" for c in f"{diff.group_a}_vs_{diff.group_b}")
        key = f"correlation_difference/{pair}/diff"
        add(sec, f"correlation_diff_{slug}_layer_summary",
            P.router_similarity_heatmap(diff.layer_mean_abs_diff, layers, title=f"Mean |Δr| between layers: {pair}", measure="mean |Δr|"),
            _matrix_frame(diff.layer_mean_abs_diff, [str(l) for l in layers]), arrays=[key])
        picked = _pair_picker(diff.diff, E, layers, diff.layer_mean_abs_diff, usage, f"Correlation difference {pair}", "Δ Pearson r", "mean |Δr|")
        if picked is not None:
            add(sec, f"correlation_diff_{slug}", picked[0], picked[1], caption=picked[2], arrays=[key])


def _coactivation_section(r: dict[str, Any], add: Callable[..., None], rep: Report) -> None:
    """Within-layer co-activation (one layer at a time, a bounded set of layers) and the most common top-1 paths."""
    co = r.get("coactivation")
    sec = "Co-activation and routing paths"
    if co is not None:
        rep.add_section(sec, "P(expert j selected | expert i selected) within each layer; the most common top-1 paths through the layers.")
        layers, E = list(co.moe_layers), co.num_experts
        shown = V.spread(len(layers))
        keep = [V.top_experts(co.counts[li], E) for li in shown]
        cond = [np.asarray(co.conditional[li])[np.ix_(k, k)] for li, k in zip(shown, keep)]
        which = "every MoE layer" if len(shown) == len(layers) else f"{len(shown)} of the {len(layers)} MoE layers, evenly spaced"
        add(sec, "coactivation", P.coactivation_by_layer(cond, [layers[li] for li in shown], keep, measure="P(j | i)"),
            _coactivation_table(co), arrays=["coactivation/conditional"],
            caption=f"Pick a layer in the menu ({which}).{_experts_note(E)} Rows: expert i; columns: expert j. "
                    "The numbers list each layer's strongest pairs.")
    paths = r.get("routing_paths")
    if paths is not None and paths.top_paths and len(paths.layers) > 1:
        add(sec, "routing_paths", P.routing_paths_sankey(paths.top_paths, paths.top_counts, paths.layers),
            paths.table(), caption=f"Path entropy {paths.entropy:.3f} nats (normalized {paths.entropy_norm:.3f}); {paths.num_unique} distinct paths.")


def _coactivation_table(co: Any, n: int = 10) -> pd.DataFrame:
    """Each layer's ``n`` largest P(j | i) between two different experts."""
    frames = []
    for li, layer in enumerate(co.moe_layers):
        m = np.array(co.conditional[li], dtype=float)
        np.fill_diagonal(m, np.nan)
        flat = np.nan_to_num(m, nan=-1.0).ravel()
        top = np.argsort(-flat, kind="stable")[:n]
        frames.append(pd.DataFrame({"layer": layer, "expert_i": top // m.shape[1], "expert_j": top % m.shape[1],
                                    "p_j_given_i": m.ravel()[top]}))
    return pd.concat(frames, ignore_index=True)


def _specialization_section(r: dict[str, Any], add: Callable[..., None], rep: Report, decode: Callable[[int], str] | None) -> None:
    """Domain and vocabulary specialization, and consistency of consecutive tokens."""
    spec = r.get("domain_specialization")
    if spec is not None:
        kl = (getattr(spec, "estimates", None) or {}).get("layer_score")
        rep.add_section("Specialization", f"Share of each domain's tokens routed to each expert; colour against the uniform k/E = {spec.baseline:.3f}. "
                        "A maximum over experts sits above k/E by chance, so each domain's top ratio and the divergence per layer "
                        "are tested against the same statistic with domain labels shuffled between documents.")
        if kl is not None:
            add("Specialization", "domain_divergence", _estimate_figure(kl, [str(l) for l in spec.moe_layers],
                "Divergence of each domain's routing from the overall routing", "KL, nats (token-weighted over domains)"),
                pd.DataFrame({"layer": spec.moe_layers, "value": kl.value, "low": kl.low, "high": kl.high, "null": kl.null, "p": kl.p_value}))
        shown = V.spread(len(spec.moe_layers))
        which = "every MoE layer" if len(shown) == len(spec.moe_layers) else f"{len(shown)} of the {len(spec.moe_layers)} MoE layers, evenly spaced"
        add("Specialization", "domain_specialization",
            P.domain_specialization_by_layer(np.asarray(spec.share)[shown], spec.group_names, [spec.moe_layers[i] for i in shown], spec.baseline),
            pd.DataFrame(np.asarray(spec.share).reshape(-1, spec.num_experts),
                         index=pd.MultiIndex.from_product([spec.moe_layers, spec.group_names], names=["layer", "domain"])),
            caption=f"Pick a layer in the menu ({which}); the numbers hold every layer.", arrays=["domain_specialization/share"])
    vocab = r.get("vocabulary_specialization")
    if vocab is not None and len(vocab.token_ids):
        top = np.argsort(-vocab.occurrences)[:30]
        tokens = [token_label(decode(int(t))) if decode else str(int(t)) for t in vocab.token_ids[top]]
        li = len(vocab.moe_layers) - 1
        onehot = np.zeros((len(top), vocab.num_experts))
        onehot[np.arange(len(top)), vocab.preferred_expert[top, li]] = vocab.concentration[top, li]
        est = vocab.estimate
        cap = None if est is None else ("Mean over token ids of the preferred expert's share, per layer, against the same "
                                        "statistic with token ids shuffled within each domain: "
                                        + "; ".join(f"layer {l}: {est.at(i).text()}" for i, l in enumerate(vocab.moe_layers)))
        add("Specialization", "vocabulary_specialization", P.vocabulary_specialization(onehot, tokens, vocab.moe_layers[li],
                                                                                         measure="share of the token's routing to its preferred expert"),
            pd.DataFrame({"token": tokens, "count": vocab.occurrences[top], "preferred_expert": vocab.preferred_expert[top, li],
                          "concentration": vocab.concentration[top, li]}), caption=cap)
    cons = r.get("routing_consistency")
    if cons is not None:
        _consistency(cons, add)


def _estimate_figure(est: Any, labels: Sequence[str], title: str, y_title: str, x_title: str = "MoE layer") -> go.Figure:
    """A result's Estimate (value, interval, null) as bars beside its null."""
    return P.estimate_vs_null(list(labels), est.value, est.low, est.high, est.null, est.null_low, est.null_high,
                              title=title, y_title=y_title, x_title=x_title, null_label=f"{est.null_name} (95% range)")


def _consistency(cons: Any, add: Callable[..., None]) -> None:
    """Consecutive tokens against the within-document shuffle, for the two measures."""
    layers = [str(l) for l in cons.moe_layers]
    for key, title in (("same_top1", "Consecutive tokens with the same top-1 expert"),
                       ("next_in_topk", "Next token's top-1 expert among this token's top-k (Mixtral's measure)")):
        est = cons.estimates.get(key)
        if est is not None:
            add("Specialization", f"routing_consistency_{key}", _estimate_figure(est, layers, title, "share of token pairs"),
                pd.DataFrame({"layer": cons.moe_layers, "value": est.value, "low": est.low, "high": est.high, "null": est.null}),
                caption="Chance: the same rate with each document's tokens shuffled, so a document's topic or domain "
                        "is not counted as stickiness. " + "; ".join(f"layer {l}: {est.at(i).text()}" for i, l in enumerate(layers)))


def _collaboration_section(r: dict[str, Any], add: Callable[..., None], rep: Report) -> None:
    """Dictionary-learned collaboration patterns and their domains."""
    collab = r.get("collaboration")
    if collab is not None:
        K = collab.atoms.shape[0]
        p = collab.params
        rule = (f"a selection counts when its share of the token's selected weight is at least {p.get('activation_threshold')} "
                "of the uniform share 1/k (scale-free: the same cut for normalized top-2 and unnormalized top-8 weights)"
                if p.get("threshold_rule") == "relative" else f"a selection counts when its weight is at least {p.get('activation_threshold')}")
        rep.add_section("Collaboration mining", f"Sparse dictionary learning on the token × (layer, expert) activation matrix; {rule}. "
                        f"Reconstruction error {collab.reconstruction_error:.3f}; the parameters are in the table below.")
        rep.add_table("Collaboration mining", parameter_table(p), "collaboration_parameters",
                      caption="Parameters of the collaboration miner.")
        atoms = collab.atoms.reshape(K, -1)
        cols = V.strongest_columns(atoms)
        shown = atoms if cols is None else atoms[:, cols]
        few = "" if cols is None else (f" Only the {len(cols):,} of {atoms.shape[1]:,} (layer, expert) columns with the largest "
                                       "weight in any pattern are drawn.")
        add("Collaboration mining", "collaboration_patterns",
            P.collaboration_patterns(shown, collab.domain_share, collab.moe_layers, collab.num_experts, collab.group_names,
                                     columns=cols),
            {"top_experts": collab.top_experts, "ranking": collab.ranking, "specificity": collab.specificity.tolist()},
            caption=few.strip() or None, arrays=["collaboration/atoms"])
        add("Collaboration mining", "collaboration_by_domain",
            P.collaboration_by_domain(shown, collab.domain_share, collab.moe_layers, collab.num_experts,
                                      collab.group_names, collab.top_experts, columns=cols),
            {"top_experts": collab.top_experts, "domain_share": collab.domain_share.tolist()},
            caption="Choose a domain in the menu: the patterns it uses most, and its experts with the highest share "
                    "against the uniform k/E (1 on the dotted line)." + few, arrays=["collaboration/atoms"])


def _ablation_section(r: dict[str, Any], add: Callable[..., None], rep: Report) -> None:
    """Loss change per domain when an expert is removed."""
    abl = r.get("ablation")
    if abl is not None:
        rep.add_section("Causal ablation", "Loss change per domain when an expert is removed from routing (weights of the rest renormalized), "
                        "through nnsight. Base loss per domain: " + ", ".join(f"{d} {v:.3f}" for d, v in zip(abl.domains, abl.base_loss)) + " nats.")
        data = pd.DataFrame(abl.delta, index=abl.targets, columns=abl.domains)
        est = getattr(abl, "estimate", None)
        if est is not None and np.isfinite(np.asarray(est.low, dtype=float)).all():
            data = pd.concat({"delta": data, "ci_low": pd.DataFrame(est.low, index=abl.targets, columns=abl.domains),
                              "ci_high": pd.DataFrame(est.high, index=abl.targets, columns=abl.domains)}, axis=1)
        add("Causal ablation", "ablation", P.ablation_effects(abl.delta, abl.targets, abl.domains), data,
            caption="95% intervals over documents are in the data table and the findings.")


def _pruning_section(r: dict[str, Any], add: Callable[..., None], rep: Report) -> None:
    """Loss change when each criterion prunes each share of every layer's experts, against random."""
    pr = r.get("pruning")
    if pr is None:
        return
    rep.add_section("Expert pruning", "Every MoE layer loses the same share of its experts at once (routing renormalized "
                    "over the rest), chosen by each criterion: least router weight mass, least share in the collaboration "
                    "patterns, least used, least loss when ablated alone, or at random (several seeds: the baseline). "
                    "A criterion beats random when its interval lies below every random seed's. " + " ".join(pr.notes))
    add("Expert pruning", "pruning", P.pruning_curves(pr.fractions, pr.criteria, pr.overall, pr.overall_low, pr.overall_high),
        pr.table(), caption="Token-weighted over domains, with 95% bands over documents; per-domain numbers in the table.")


def _weights_section(r: dict[str, Any], add: Callable[..., None], rep: Report) -> None:
    sim = r.get("router_similarity")
    if sim is None:
        return
    centred = ("Router rows are centred first (a softmax router is unchanged by adding one vector to all its rows)"
               if getattr(sim, "centered", False) else "Router rows are compared as they are (sigmoid routers: a shift changes routing)")
    rep.add_section("Router and expert weights", f"{centred}. Router similarity between layers; the subspace similarity of "
                    f"random routers of this shape is rank/H = {sim.subspace_baseline:.3f}. The Hungarian-matched cosine is "
                    "tested against the same statistic with one router randomly rotated (its spectrum kept).")
    add("Router and expert weights", "router_similarity_hungarian", P.router_similarity_heatmap(sim.hungarian_cosine, sim.layers, measure="Hungarian-matched cosine"),
        _matrix_frame(sim.hungarian_cosine, [str(l) for l in sim.layers]))
    if len(sim.layers) > 1:
        add("Router and expert weights", "hungarian_cosine_vs_null",
            P.hungarian_cosine_vs_null(sim.hungarian_cosine, sim.hungarian_null_mean, sim.hungarian_null_low, sim.hungarian_null_high, sim.layers),
            {"observed": sim.hungarian_cosine, "null_mean": sim.hungarian_null_mean, "p": sim.hungarian_p})
    add("Router and expert weights", "router_similarity_subspace", P.router_similarity_heatmap(sim.subspace_similarity, sim.layers, measure="subspace similarity (mean cos² of principal angles)"),
        _matrix_frame(sim.subspace_similarity, [str(l) for l in sim.layers]))
    sub = r.get("router_subspaces")
    if sub is not None:
        add("Router and expert weights", "router_svd", P.svd_spectra({l: s for l, s in zip(sub.layers, sub.singular_values)}),
            pd.DataFrame({"layer": sub.layers, "effective_rank": sub.effective_rank, "stable_rank": sub.stable_rank}))
    al = r.get("expert_alignment")
    if al is not None:
        add("Router and expert weights", "router_expert_alignment",
            P.alignment_vs_baseline(al.own, al.other_mean, al.random_mean.mean(axis=1), None, al.layers, null_mean=al.perm_null_mean,
                                    null_low=al.perm_null_low, null_high=al.perm_null_high,
                                    measure="share of router-row energy in the expert's input subspace"),
            pd.DataFrame({"layer": al.layers, "own": al.mean_own, "experts_permuted": al.perm_null_mean, "null_low": al.perm_null_low,
                          "null_high": al.perm_null_high, "p": al.perm_p, "effect": al.effect, "random_subspace_r_over_H": al.mean_random}))


def _dynamics_section(r: dict[str, Any], add: Callable[..., None], rep: Report) -> None:
    dyn = r.get("checkpoint_dynamics")
    if dyn is None:
        return
    rep.add_section("Routing over training", "Saturation: share of each token's top-k experts at a checkpoint that match the final checkpoint's.")
    add("Routing over training", "saturation", P.saturation_over_checkpoints(dyn.steps, dyn.saturation, dyn.moe_layers), dyn.table())
    est = (getattr(dyn, "estimates", None) or {}).get("saturation_mean")
    if est is not None:
        add("Routing over training", "saturation_vs_chance", _estimate_figure(est, [str(s) for s in dyn.steps],
            "Saturation (mean over layers) against chance", "share of top-k shared with the final checkpoint", "training step"),
            pd.DataFrame({"step": dyn.steps, "value": est.value, "low": est.low, "high": est.high, "chance": est.null}),
            caption="Chance: the overlap between a token's experts at this checkpoint and a random token of the same document "
                    "at the final checkpoint (routing that knows only the document).")
    add("Routing over training", "utilization_entropy_over_training",
        P.layer_metric_over_time(dyn.steps, dyn.utilization_entropy_norm, dyn.moe_layers, "normalized utilization entropy", "0–1", x_label="training step"))
    drift = r.get("router_drift")
    if drift is not None:
        add("Routing over training", "router_drift", P.drift_over_checkpoints(dyn.steps, 1 - np.nan_to_num(drift.cosine_prev, nan=1.0), drift.layers),
            drift.to_dict())
