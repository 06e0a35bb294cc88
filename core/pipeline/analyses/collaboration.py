"""Collaboration mining: sparse dictionary learning of which (layer, expert) selections fire together, and their domains."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.analysis.collaboration import CollaborationMiner
from core.pipeline.spec import AnalysisSpec, register
from viz import matrix_views as V
from viz import plotting as P
from viz.run_report import ReportPage, parameter_table


def _collaboration_section(r: Mapping[str, Any], page: ReportPage) -> None:
    """Dictionary-learned collaboration patterns and their domains."""
    collab = r.get("collaboration")
    if collab is not None:
        K = collab.atoms.shape[0]
        p = collab.params
        rule = (f"a selection counts when its share of the token's selected weight is at least {p.get('activation_threshold')} "
                "of the uniform share 1/k (scale-free: the same cut for normalized top-2 and unnormalized top-8 weights)"
                if p.get("threshold_rule") == "relative" else f"a selection counts when its weight is at least {p.get('activation_threshold')}")
        page.section("Collaboration mining", f"Sparse dictionary learning on the token × (layer, expert) activation matrix; {rule}. "
                        f"Reconstruction error {collab.reconstruction_error:.3f}; the parameters are in the table below.")
        page.table("Collaboration mining", parameter_table(p), "collaboration_parameters",
                      caption="Parameters of the collaboration miner.")
        atoms = collab.atoms.reshape(K, -1)
        cols = V.strongest_columns(atoms)
        shown = atoms if cols is None else atoms[:, cols]
        few = "" if cols is None else (f" Only the {len(cols):,} of {atoms.shape[1]:,} (layer, expert) columns with the largest "
                                       "weight in any pattern are drawn.")
        page.figure("Collaboration mining", "collaboration_patterns",
            P.collaboration_patterns(shown, collab.domain_share, collab.moe_layers, collab.num_experts, collab.group_names,
                                     columns=cols),
            {"top_experts": collab.top_experts, "ranking": collab.ranking, "specificity": collab.specificity.tolist()},
            caption=few.strip() or None, arrays=["collaboration/atoms"])
        page.figure("Collaboration mining", "collaboration_by_domain",
            P.collaboration_by_domain(shown, collab.domain_share, collab.moe_layers, collab.num_experts,
                                      collab.group_names, collab.top_experts, columns=cols),
            {"top_experts": collab.top_experts, "domain_share": collab.domain_share.tolist()},
            caption="Choose a domain in the menu: the patterns it uses most, and its experts with the highest share "
                    "against the uniform k/E (1 on the dotted line)." + few, arrays=["collaboration/atoms"])


def _build(ctx: Any) -> Any:
    return CollaborationMiner(n_components=8 if ctx.micro else 16, max_iter=50 if ctx.micro else 200).accumulator()


register(AnalysisSpec(
    "collaboration", "pass", order=70, build=_build,
    skip=lambda ctx: None if ctx.options.analysis.collaboration else "turned off (--no-collaboration)",
    report=lambda collab, record, page: _collaboration_section(record.results, page),
    notes="patterns of experts that fire together across layers, and the domains that use them",
))
