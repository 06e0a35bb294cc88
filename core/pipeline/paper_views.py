"""The OLMoE and Mixtral papers' views of specialization, drawn from results the run already has.

OLMoE's Fig. 22 and Mixtral's Fig. 7: each domain's share of tokens per expert at the first,
middle and last MoE layers, beside the uniform k/E. OLMoE's Table 8 and Fig. 23: per expert, the
token ids it takes most specifically, a token's vocabulary specialization toward an expert being
the fraction of its occurrences routed there (top-k). Mixtral's Table 5 shaped as the paper has
it: one row per domain, the repeated-assignment rates at those layers, and uniform chance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from viz import matrix_views as V
from viz._common import token_label
from viz.figures_paper import domain_shares_per_expert, vocabulary_per_expert
from viz.run_report import ReportPage

SECTION = "Specialization"


def paper_layers(num_layers: int) -> list[int]:
    """The positions the papers draw: the first, middle and last MoE layer (fewer when the model has fewer)."""
    return sorted({0, num_layers // 2, num_layers - 1})


def expert_token_table(vocab: Any, positions: list[int], n: int = 5,
                       decode: Callable[[int], str] | None = None) -> pd.DataFrame:
    """OLMoE's Table 8: per layer and expert, its ``n`` token ids of highest vocabulary specialization toward it.

    Specialization of id x toward expert e = occurrences of x with e in the top-k / occurrences of x
    (ids seen ``min_count``+ times). Ties go to the more frequent id.
    """
    counts = np.asarray(vocab.expert_counts, float)
    occ = np.asarray(vocab.occurrences, float)
    spec = counts / np.clip(occ, 1, None)[:, None, None]  # [T, L, E]
    rows = []
    for li in positions:
        for e in range(vocab.num_experts):
            order = np.lexsort((-occ, -spec[:, li, e]))[:n]
            for rank, t in enumerate(order):
                if counts[t, li, e] <= 0:
                    break
                tid = int(vocab.token_ids[t])
                rows.append({"layer": vocab.moe_layers[li], "expert": e, "rank": rank + 1, "token_id": tid,
                             "token": token_label(decode(tid)) if decode else str(tid), "routed": int(counts[t, li, e]),
                             "occurrences": int(occ[t]), "specialization": float(spec[t, li, e])})
    return pd.DataFrame(rows, columns=["layer", "expert", "rank", "token_id", "token", "routed", "occurrences",
                                       "specialization"])


def mixtral_table5(cons: Any, positions: list[int]) -> pd.DataFrame:
    """Mixtral's Table 5 as the paper lays it out: one row per domain, first choice and first-or-second per layer."""
    table = cons.mixtral_table()
    layers = [cons.moe_layers[i] for i in positions]
    table = table[table.layer.isin(layers)]
    if not len(table):
        return table
    wide = table.pivot(index="domain", columns="layer", values=["same_top1", "topk_any_overlap"])
    wide.columns = [f"{'first choice' if m == 'same_top1' else 'top-k shares one'} L{layer}" for m, layer in wide.columns]
    uniform = {c: cons.uniform_same_top1 if c.startswith("first") else cons.uniform_any_overlap for c in wide.columns}
    return pd.concat([wide, pd.DataFrame([uniform], index=["uniform routing"])]).round(4)


def paper_views(r: Any, page: ReportPage, decode: Callable[[int], str] | None) -> None:
    """Add the papers' views to the specialization section, from the domain, vocabulary and consistency results."""
    spec, vocab, cons = r.get("domain_specialization"), r.get("vocabulary_specialization"), r.get("routing_consistency")
    if spec is not None and len(spec.group_names) > 1:
        pos = paper_layers(len(spec.moe_layers))
        share = np.asarray(spec.share)[pos]
        keep = [V.top_experts(np.asarray(spec.score)[li], spec.num_experts, cap=64) for li in pos]
        page.figure(SECTION, "domain_shares_per_expert",
                    domain_shares_per_expert(share, spec.group_names, [spec.moe_layers[i] for i in pos], spec.baseline, keep),
                    pd.DataFrame(share.reshape(-1, spec.num_experts),
                                 index=pd.MultiIndex.from_product([[spec.moe_layers[i] for i in pos], spec.group_names],
                                                                  names=["layer", "domain"])),
                    caption="As OLMoE's Fig. 22 and Mixtral's Fig. 7: the share of each domain's tokens routed to each "
                            f"expert (top-k, so shares sum to k = {spec.top_k}) at the first, middle and last MoE layers; "
                            f"dashed: uniform k/E = {spec.baseline:.3f}. Past 64 experts, the 64 most domain-specific.")
    if vocab is not None and getattr(vocab, "expert_counts", None) is not None and len(vocab.token_ids):
        pos = paper_layers(len(vocab.moe_layers))
        table = expert_token_table(vocab, pos, decode=decode)
        top = table[table["rank"] == 1]
        value = np.zeros((len(pos), vocab.num_experts))
        tokens = [["" for _ in range(vocab.num_experts)] for _ in pos]
        for i, li in enumerate(pos):
            for row in top[top.layer == vocab.moe_layers[li]].itertuples():
                value[i, row.expert], tokens[i][row.expert] = row.specialization, row.token
        page.figure(SECTION, "vocabulary_per_expert",
                    vocabulary_per_expert(value, tokens, [vocab.moe_layers[i] for i in pos], vocab.floor), table,
                    caption="As OLMoE's Fig. 23 and Table 8 (expert-centric): for each expert, the token id routed to "
                            "it most specifically (the fraction of the id's occurrences that pick the expert; ids seen "
                            f"{vocab.min_count}+ times); dashed: k/E. The numbers list each expert's five top ids.")
    if cons is not None and getattr(cons, "domain_names", None):
        t5 = mixtral_table5(cons, paper_layers(len(cons.moe_layers)))
        if len(t5):
            page.table(SECTION, t5.reset_index(names="domain"), "mixtral_table5",
                       caption="Mixtral's Table 5 per domain: the share of consecutive tokens with the same top-1 expert "
                               "(first choice) and whose top-k sets share an expert (first or second choice at k = 2), "
                               "at the first, middle and last MoE layers, beside uniform routing (last row).")
