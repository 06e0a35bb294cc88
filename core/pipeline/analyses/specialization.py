"""Specialization: each domain's (and dataset's) routing, token ids that stick to one expert, and consecutive tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.consistency import ConsistencyAccumulator
from core.analysis.resampling import MIN_DOCUMENTS
from core.analysis.specialization import DomainSpecializationAccumulator
from core.analysis.vocabulary import TOKEN_MIN_COUNT, VocabularyAccumulator
from core.pipeline.findings_text import count_of, est_of, f3, flagged, pct, quote, strongest
from core.pipeline.paper_views import paper_views
from core.pipeline.spec import AnalysisSpec, Finding, register
from viz import matrix_views as V
from viz import plotting as P
from viz._common import token_label
from viz.run_report import ReportPage, estimate_figure


def domain_layer(spec: Any) -> int:
    """Position of the layer whose routing depends most on the domain: the one the finding names and the figure opens on."""
    kl = est_of(spec, "layer_score")
    return int(strongest(kl)) if kl is not None else int(np.argmax(spec.layer_score))


def vocabulary_layer(voc: Any) -> int:
    """Position of the layer where token ids stick to an expert most beyond chance (the last layer without a null)."""
    return int(strongest(voc.estimate)) if voc.estimate is not None else len(voc.moe_layers) - 1


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
    text = (f"Domain specialization (null: {by} labels shuffled; Holm, ≈ 0.05 false per run): top expert "
            f"L{spec.moe_layers[li]}:E{e} for "
            f"{spec.group_names[d]}, share over uniform {ratio}")
    if top is not None and D > 1:
        text += f"; {flagged(top.at(seen), by + 's', 'beyond it', correction=False)}"
    b = domain_layer(spec)
    div = quote(kl.at(b), f3, "") if kl is not None else f3(spec.layer_score[b])
    text += f". KL to all tokens (nats) peaks at layer {spec.moe_layers[b]}, {div}"
    return text + (f"; {flagged(kl, 'layers', 'beyond it', correction=False)}." if kl is not None else ".")


def consistency(cons: Any) -> str:
    """Whether the next token keeps its expert more than a shuffle of its document would."""
    same, nxt = est_of(cons, "same_top1"), est_of(cons, "next_in_topk")
    out = []
    if same is not None:
        li = strongest(same)
        out.append(f"the same top-1 expert is furthest above chance at layer {cons.moe_layers[li]}, "
                   f"{quote(same.at(li), pct, '')}; {_layers_beyond(same, cons.num_documents)}")
    if nxt is not None and not nxt.why_none:
        out.append(f"top-1 in the previous token's top-k: {count_of(nxt)} layers beyond chance")
    return ("Consecutive tokens (chance: each document's tokens shuffled): " + "; ".join(out) + ".") if out else ""


def _layers_beyond(est: Any, num_documents: int) -> str:
    """"n of L layers beyond chance" with the false layers a run expects, or why there is no verdict."""
    if est.why_none:
        if "resampling" in est.why_none:
            return "no verdict: resampling turned off"
        few = f"no verdict: fewer than {MIN_DOCUMENTS} documents"  # est.resamples: the document blocks left out in turn
        return few if num_documents < MIN_DOCUMENTS else f"{few} in distinct blocks ({num_documents} fall in {est.resamples})"
    return flagged(est, "layers", "beyond chance")


def vocabulary(voc: Any) -> str:
    """How much a token id sticks to one expert, beyond what its domain explains."""
    est = voc.estimate
    if est is None or not len(voc.token_ids):
        return ""
    li = vocabulary_layer(voc)
    return (f"Vocabulary ({len(voc.token_ids)} ids seen {voc.min_count}+ times; chance: ids shuffled within documents; "
            f"Holm, ≈ 0.05 false per run): an id's share at its top expert is furthest above chance at layer "
            f"{voc.moe_layers[li]}, {quote(est.at(li), pct, '')}; {flagged(est, 'layers', 'beyond it', correction=False)}"
            + _tokens(voc) + ".")


def _tokens(voc: Any) -> str:
    """How many frequent token ids prefer an expert beyond chance, each tested on its own."""
    flags = getattr(voc, "token_flags", None)
    if flags is None or not len(flags):
        return ""
    return f"; {int(flags.any(1).sum())} of {len(flags)} ids seen {TOKEN_MIN_COUNT}+ times prefer an expert on their own"


def _specialization_section(r: Mapping[str, Any], page: ReportPage, decode: Callable[[int], str] | None) -> None:
    """Domain and vocabulary specialization, and consistency of consecutive tokens."""
    spec = r.get("domain_specialization")
    if spec is not None:
        kl = (getattr(spec, "estimates", None) or {}).get("layer_score")
        page.section("Specialization", f"Share of each domain's tokens routed to each expert; colour against the uniform k/E = {spec.baseline:.3f}. "
                        "A maximum over experts sits above k/E by chance, so each domain's top ratio and the divergence per layer "
                        "are tested against the same statistic with domain labels shuffled between documents.")
        if kl is not None:
            page.figure("Specialization", "domain_divergence", estimate_figure(kl, [str(l) for l in spec.moe_layers],
                "Divergence of each domain's routing from the overall routing", "KL, nats (token-weighted over domains)"),
                pd.DataFrame({"layer": spec.moe_layers, "value": kl.value, "low": kl.low, "high": kl.high, "null": kl.null, "p": kl.p_value}))
        peak = domain_layer(spec)
        shown = V.spread_with(len(spec.moe_layers), peak)
        which = "every MoE layer" if len(shown) == len(spec.moe_layers) else f"{len(shown)} of the {len(spec.moe_layers)} MoE layers, evenly spaced"
        page.figure("Specialization", "domain_specialization",
            P.domain_specialization_by_layer(np.asarray(spec.share)[shown], spec.group_names, [spec.moe_layers[i] for i in shown], spec.baseline,
                                             shown=shown.index(peak)),
            pd.DataFrame(np.asarray(spec.share).reshape(-1, spec.num_experts),
                         index=pd.MultiIndex.from_product([spec.moe_layers, spec.group_names], names=["layer", "domain"])),
            caption=f"Opens on layer {spec.moe_layers[peak]}, where the divergence peaks; pick another in the menu ({which}); "
                    "the numbers hold every layer.", arrays=["domain_specialization/share"])
    vocab = r.get("vocabulary_specialization")
    if vocab is not None and len(vocab.token_ids):
        top = np.argsort(-vocab.occurrences)[:30]
        tokens = [token_label(decode(int(t))) if decode else str(int(t)) for t in vocab.token_ids[top]]
        li = vocabulary_layer(vocab)
        onehot = np.zeros((len(top), vocab.num_experts))
        onehot[np.arange(len(top)), vocab.preferred_expert[top, li]] = vocab.concentration[top, li]
        est = vocab.estimate
        cap = None if est is None else ("Mean over token ids of the preferred expert's share, per layer, against the same "
                                        "statistic with token ids shuffled within each domain: "
                                        + "; ".join(f"layer {l}: {est.at(i).text()}" for i, l in enumerate(vocab.moe_layers)))
        page.figure("Specialization", "vocabulary_specialization", P.vocabulary_specialization(onehot, tokens, vocab.moe_layers[li],
                                                                                         measure="share of the token's routing to its preferred expert"),
            pd.DataFrame({"token": tokens, "count": vocab.occurrences[top], "preferred_expert": vocab.preferred_expert[top, li],
                          "concentration": vocab.concentration[top, li]}), caption=cap)
    cons = r.get("routing_consistency")
    if cons is not None:
        _consistency(cons, page)
    paper_views(r, page, decode)


def _consistency(cons: Any, page: ReportPage) -> None:
    """Consecutive tokens against the within-document shuffle, for two measures; Mixtral's Table 5 per domain."""
    layers = [str(l) for l in cons.moe_layers]
    for key, title in (("same_top1", "Consecutive tokens with the same top-1 expert"),
                       ("next_in_topk", "Next token's top-1 expert among this token's top-k")):
        est = cons.estimates.get(key)
        if est is not None:
            page.figure("Specialization", f"routing_consistency_{key}", estimate_figure(est, layers, title, "share of token pairs"),
                pd.DataFrame({"layer": cons.moe_layers, "value": est.value, "low": est.low, "high": est.high, "null": est.null,
                              "p_corrected": est.p_adjusted if est.p_adjusted is not None else np.nan}),
                caption="Chance: the same rate with each document's tokens shuffled, so a document's topic or domain "
                        "is not counted as stickiness; verdicts are a jackknife over documents, Holm-corrected across layers. "
                        + "; ".join(f"layer {l}: {est.at(i).text()}" for i, l in enumerate(layers)))
    table = cons.mixtral_table() if hasattr(cons, "mixtral_table") else None
    if table is not None and len(table):
        page.table("Specialization", table.round(4), "routing_consistency_mixtral",
                   caption="As the Mixtral paper's Table 5, per domain and layer: the next token has the same top-1 expert "
                           "(\"first choice\"), and the two tokens' top-k sets share an expert (\"first or second choice\" "
                           "at k = 2), each beside its chance under uniform routing (1/E and 1 - C(E-k, k)/C(E, k)). "
                           "Uniform routing is the paper's baseline; the within-document shuffle above is the stricter one.")


def _domain_headline(spec: Any, record: Any) -> dict[str, Any]:
    return {"domain_kl_nats": [round(float(x), 4) for x in spec.layer_score], "max_domain_ratio": round(float(np.nanmax(spec.ratio)), 3)}


def _domain_table(spec: Any, record: Any, decode: Any) -> dict[str, pd.DataFrame]:
    """Each domain's share per (layer, expert), as a W&B table."""
    D, L, E = len(spec.group_names), len(spec.moe_layers), spec.share.shape[-1]
    grid = np.stack(np.meshgrid(np.arange(L), np.arange(D), np.arange(E), indexing="ij"), -1).reshape(-1, 3)
    return {"tables/domain_expert_share": pd.DataFrame({
        "layer": np.asarray(spec.moe_layers)[grid[:, 0]], "domain": np.asarray(spec.group_names)[grid[:, 1]],
        "expert": grid[:, 2], "share": np.asarray(spec.share)[grid[:, 0], grid[:, 1], grid[:, 2]],
        "baseline_k_over_E": spec.baseline})}


def _vocabulary_table(vocab: Any, record: Any, decode: Any) -> dict[str, pd.DataFrame]:
    """Each tracked token id's preferred expert at the last layer, as a W&B table."""
    if not len(vocab.token_ids):
        return {}
    li = len(vocab.moe_layers) - 1
    return {"tables/vocabulary": pd.DataFrame({
        "token_id": vocab.token_ids,
        "token": [token_label(decode(int(t))) if decode else str(int(t)) for t in vocab.token_ids],
        "count": vocab.occurrences, "preferred_expert_last_layer": vocab.preferred_expert[:, li],
        "concentration_last_layer": vocab.concentration[:, li]})}


def _findings(key: str, sentence: Callable[[Any], str], figures: tuple[str, ...], estimate: str | None = None
              ) -> Callable[[Any, Any], list[Finding]]:
    """The findings hook of an analysis whose sentence may be empty (nothing to say)."""
    def hook(result: Any, record: Any) -> list[Finding]:
        text = sentence(result)
        est = est_of(result, estimate) if estimate else getattr(result, "estimate", None)
        return [Finding(key, text, figures, est)] if text else []
    return hook


register(AnalysisSpec(
    "domain_specialization", "pass", order=40, lead=10,
    build=lambda ctx: DomainSpecializationAccumulator("domain", permutations=ctx.resamples, resamples=ctx.resamples,
                                                      seed=ctx.seed),
    headline=_domain_headline,
    estimates=lambda spec: {"domain_divergence": est_of(spec, "layer_score")},
    decisions=lambda spec: {"domain_divergence": est_of(spec, "layer_score"), "domain_top_ratio": est_of(spec, "max_ratio")},
    findings=lambda spec, record: (_findings("domain_specialization", specialization, ("domain_divergence",), "layer_score")
                                   (spec, record) if len(spec.group_names) > 1 else []),
    report=lambda spec, record, page: _specialization_section(record.results, page, page.decode),
    wandb_tables=_domain_table,
    notes="each domain's share of tokens per (layer, expert) against domain labels shuffled between documents",
))
register(AnalysisSpec(
    "dataset_specialization", "pass", order=41,
    build=lambda ctx: DomainSpecializationAccumulator("dataset", permutations=0, resamples=0),
    notes="the same per dataset, without nulls (in metrics.json)",
))
register(AnalysisSpec(
    "vocabulary_specialization", "pass", order=42, lead=40,
    build=lambda ctx: VocabularyAccumulator(min_count=5 if ctx.micro else 20, permutations=20 if ctx.resamples else 0,
                                            seed=ctx.seed, token_ids=ctx.frequent_ids),
    estimates=lambda voc: {"vocabulary": voc.estimate},
    decisions=lambda voc: {"vocabulary": voc.estimate, "vocabulary_tokens": voc.token_flags},
    findings=_findings("vocabulary_specialization", vocabulary, ("vocabulary_specialization",)),
    wandb_tables=_vocabulary_table,
    notes="how much a token id sticks to one expert beyond its domain (drawn in the specialization section)",
))
register(AnalysisSpec(
    "routing_consistency", "pass", order=43, lead=30,
    build=lambda ctx: ConsistencyAccumulator(resamples=ctx.resamples, seed=ctx.seed),
    estimates=lambda cons: {"consistency_same_top1": est_of(cons, "same_top1"),
                            "consistency_next_in_topk": est_of(cons, "next_in_topk")},
    findings=_findings("routing_consistency", consistency, ("routing_consistency_same_top1",), "same_top1"),
    notes="whether the next token keeps its expert beyond a shuffle of its document (drawn in the specialization section)",
))
