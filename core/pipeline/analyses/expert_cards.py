"""Expert cards: for every (layer, expert), what it takes, where it fires hardest, what it works with, what it costs."""

from __future__ import annotations

from typing import Any

from core.analysis.expert_cards import ExpertCardsAccumulator
from core.pipeline.spec import AnalysisSpec, register
from viz.expert_cards import expert_cards_html, expert_cards_payload
from viz.run_report import ReportPage

SECTION = "Expert cards"
OTHERS = ("coactivation", "ablation", "pruning", "checkpoint_dynamics")  # results a card quotes where the run has them


def _section(cards: Any, record: Any, page: ReportPage) -> None:
    """The picker and the data of every card; a card is drawn when picked or when a figure's expert cell is clicked."""
    if cards is None:
        return
    payload = expert_cards_payload(cards, page.decode, {name: record.get(name) for name in OTHERS})
    L, E = len(cards.moe_layers), cards.num_experts
    page.section(SECTION, f"One card for each of the {L} x {E} = {L * E:,} experts: its share of each dataset's and "
                          "domain's routing (95% intervals over documents), the tokens it takes more often than their "
                          "frequency predicts (lift), its max-activating contexts, its co-activation partners, its "
                          "ablation or pruning cost where measured, and its share over checkpoints. Pick a layer and "
                          "expert, or click an expert's cell in any figure of this page (utilization, co-activation, "
                          "domain or vocabulary specialization, routing paths); #expert-L5-E17 in the address opens one.")
    body, files = expert_cards_html(payload)
    cut = (" At this model's width each card keeps fewer contexts and tokens." if payload["cut"] else "")
    beside = (" At this model's width the cards' data is in data/expert_cards.js beside this page (keep it there)."
              if files else "")
    page.html(SECTION, "expert_cards", body, data=payload, files=files,
              caption=f"Cards are drawn on demand from compact data in the page. Top tokens are ranked among those "
                      f"routed to the expert at least {cards.min_count} times.{cut}{beside}")


register(AnalysisSpec(
    "expert_cards", "pass", order=45,
    build=lambda ctx: ExpertCardsAccumulator(seed=ctx.seed, resamples=ctx.resamples),
    report=_section,
    notes="per (layer, expert): shares per dataset and domain, top tokens by lift, max-activating contexts (expert cards)",
))
