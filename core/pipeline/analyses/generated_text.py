"""Generated text coloured by routing: the model continues the start of a few sample documents, routed as it wrote."""

from __future__ import annotations

from typing import Any

from core.analysis.generated_text import generated_text, prompts_of
from core.pipeline.analyses.routed_text import SECTION
from core.pipeline.spec import AnalysisSpec, register
from viz.routed_text import routed_text_html, routed_text_payload
from viz.run_report import ReportPage

PER_DOMAIN, PROMPT_TOKENS = 2, 16


def _skip(ctx: Any) -> str | None:
    """Off when asked, and for a remote model: generation is traced with local hooks."""
    if ctx.options.analysis.generate_tokens == 0:
        return "turned off (--generate-tokens 0)"
    if ctx.options.model.remote or getattr(ctx.wrapper, "hf_model", None) is None:
        return "the model is remote: generation is traced with local hooks only"
    return None


def _compute(ctx: Any, results: Any) -> Any:
    text = results.get("routed_text")
    if text is None or not text.num_documents:
        return None
    return generated_text(ctx.wrapper, text, PER_DOMAIN, PROMPT_TOKENS, ctx.options.analysis.generate_tokens)


def _reuse_key(ctx: Any, results: Any) -> dict[str, Any]:
    """What the continuations depend on: the model, the prompts' token ids, their count and length, the code version."""
    from core.collection.loaded_identity import wrapper_identity
    from core.pipeline.code_version import code_version
    from core.pipeline.reuse import value_digest

    text = results.get("routed_text")
    docs = prompts_of(text, PER_DOMAIN, PROMPT_TOKENS) if text is not None else []
    prompts = [text.token_ids[text.document(d)][:PROMPT_TOKENS] for d in docs]
    return {"model": wrapper_identity(ctx.wrapper), "prompts": value_digest(prompts),
            "domains": [text.doc_domain[d] for d in docs], "new_tokens": int(ctx.options.analysis.generate_tokens),
            "per_domain": PER_DOMAIN, "prompt_tokens": PROMPT_TOKENS, "code": code_version()}


def _section(gen: Any, record: Any, page: ReportPage) -> None:
    """The continuations, drawn by the coloured text's script, generated tokens underlined after a ▸."""
    if gen is None or not gen.num_documents:
        return
    payload = routed_text_payload(gen, page.decode)
    page.section(SECTION)
    page.html(SECTION, "generated_text", routed_text_html(payload, "generated-text"), data=payload,
              caption=f"Generated text: the first {int(gen.prompt_length.max())} tokens of {gen.docs_per_domain} documents "
                      f"of each domain as the prompt, then {gen.new_tokens} tokens the model wrote (greedy, after ▸, "
                      "dotted underline), each coloured by the routing recorded at its decoding step (key-value cache "
                      "on); the prompt's colours are those of the prefill.")


register(AnalysisSpec(
    "generated_text", "after", order=45, compute=_compute, skip=_skip, report=_section,
    reuse_key=_reuse_key,
    notes="continuations of a few prompts per domain, routed as the model wrote them (text coloured by routing)",
))
