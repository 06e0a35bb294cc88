"""The findings stage: the headline numbers, the findings and the warnings of a run, asked of each registered analysis.

Every finding is built from a number in the results (nothing is asserted that was not
measured), and each states its null (the same statistic on shuffled data: documents' tokens,
domain labels or token ids shuffled) and its 95% interval over documents, as
"X (95% CI a–b) against null Y", and says so plainly when the two cannot be told apart. A
finding names the figures behind it (:class:`core.pipeline.spec.Finding`), so the report links
them without reading the sentence; the sentences themselves live with their analyses
(``core.pipeline.analyses``), built from the quoting helpers of ``core.pipeline.findings_text``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from core.pipeline.record import RunRecord
from core.pipeline.spec import Finding


def headline_numbers(record: RunRecord) -> dict[str, Any]:
    """The few numbers a summary shows, as plain values: each analysis's own, then every Estimate it quotes."""
    out: dict[str, Any] = {"tokens": int(sum(record.tokens.values()))}
    estimates: dict[str, Any] = {}
    for spec, result in record.present():
        if spec.headline:
            out.update(spec.headline(result, record))
        if spec.estimates:
            estimates.update({k: v for k, v in spec.estimates(result).items() if v is not None})
    out["estimates"] = {k: _significant(v.to_dict()) for k, v in estimates.items()}
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


def findings(record: RunRecord) -> list[Finding]:
    """A few sentences per analysis, each with its numbers, interval and null, in each analysis's ``lead`` order."""
    out: list[tuple[int, Finding]] = []
    for spec, result in record.present():
        if spec.findings:
            out += [(spec.lead, f) for f in spec.findings(result, record) if f.text]
    return [f for _, f in sorted(out, key=lambda pair: pair[0])]


def warnings_of(record: RunRecord) -> list[str]:
    """The model's warnings (routers it has that were not traced), each analysis's (one line per kind of problem),
    then one line per analysis that did not run."""
    out: list[str] = list(record.model.get("warnings", ()))
    for spec, result in record.present():
        if spec.warnings:
            out += spec.warnings(result, record)
    return out + [f"{name} skipped: {why}" for name, why in record.skipped.items()]


def conclude(record: RunRecord) -> RunRecord:
    """The record with its headline, findings and warnings (a new record: the one passed in is not changed)."""
    return dataclasses.replace(record, headline=headline_numbers(record), findings=tuple(findings(record)),
                               warnings=tuple(warnings_of(record)))


def first_screen(found: list[Finding] | tuple[Finding, ...], n: int = 4) -> tuple[list[Finding], int]:
    """The findings reordered for the report's first screen, and how many lead it with a small figure each.

    The leaders are the first ``n`` (in ``lead`` order) that name a figure and whose estimate
    stands out from its null somewhere (a verdict, after its correction); the rest follow in order.
    """
    def strong(f: Finding) -> bool:
        est = f.estimate
        if not f.figure_keys or est is None or getattr(est, "why_none", ""):
            return False
        try:
            return bool(np.asarray(est.distinguishable, bool).any())
        except (TypeError, ValueError):
            return False

    top = [f for f in found if strong(f)][:n]
    return top + [f for f in found if all(f is not t for t in top)], len(top)
