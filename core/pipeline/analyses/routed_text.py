"""Text coloured by routing: a few documents of each domain, each token coloured by its expert at a picked layer."""

from __future__ import annotations

from typing import Any

from core.analysis.routed_text import RoutedTextAccumulator
from core.pipeline.spec import AnalysisSpec, register
from viz.routed_text import routed_text_html, routed_text_payload
from viz.run_report import ReportPage

SECTION = "Text coloured by routing"
DOCS_PER_DOMAIN, MAX_TOKENS = 2, 200


def _section(text: Any, record: Any, page: ReportPage) -> None:
    """The documents drawn by the page's script: top-1 expert or one expert's weight, per picked layer."""
    if text is None or not text.num_documents:
        return
    payload = routed_text_payload(text, page.decode)
    domains = list(dict.fromkeys(text.doc_domain))
    page.section(SECTION, f"The first {text.docs_per_domain} documents of each domain ({', '.join(domains)}), up to "
                          f"{text.max_tokens} tokens each, as the model read them. Each token's background is its "
                          "top-1 expert at the picked layer, or, by the menu, one expert's routing weight; hover a "
                          "token for its experts and their weights at that layer.")
    E = text.num_experts
    note = (f" With {E} experts and {len(payload['palette'])} colours, experts {len(payload['palette'])} apart share a "
            "colour: hover names the expert." if E > len(payload["palette"]) else "")
    cut = " Documents are cut short to keep the page small." if payload["cut"] else ""
    page.html(SECTION, "routed_text", routed_text_html(payload, "routed-text"), data=payload,
              caption="Tokens as text: spaces shown as ␣, newlines as \\n (and a line break)." + note + cut)


register(AnalysisSpec(
    "routed_text", "pass", order=44,
    build=lambda ctx: RoutedTextAccumulator(DOCS_PER_DOMAIN, MAX_TOKENS),
    report=_section,
    notes="sample documents of each domain with every token's experts and weights per layer (text coloured by routing)",
))
