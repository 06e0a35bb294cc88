"""Report building blocks shared by the analyses' report parts: the page they add to, and figures and tables they share.

Each analysis of the study (``core.pipeline.analyses``) draws its own section through a
:class:`ReportPage`; this module computes nothing new, so every number in the page is one the
analyses produced.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from viz import matrix_views as V
from viz import plotting as P
from viz.report import Report


class ReportPage:
    """The report being built, and every figure added to it by name (for static images and W&B)."""

    def __init__(self, report: Report, decode: Callable[[int], str] | None = None) -> None:
        self.report = report
        self.decode = decode  # token id -> text, for figures that label tokens
        self.figures: dict[str, go.Figure] = {}

    def section(self, name: str, text: str | None = None) -> None:
        """Start a section (or set its text): sections keep the order they were first named in."""
        self.report.add_section(name, text)

    def figure(self, section: str, name: str, fig: go.Figure, data: Any = None, caption: str | None = None,
               arrays: Sequence[str] = ()) -> None:
        """A figure and the numbers behind it; ``arrays``: keys of the full matrices in arrays.safetensors."""
        self.report.add_figure(section, fig, name, data=data, caption=caption, arrays=arrays)
        self.figures[name] = fig

    def table(self, section: str, df: pd.DataFrame, name: str, caption: str | None = None) -> None:
        self.report.add_table(section, df, name, caption=caption)

    def html(self, section: str, name: str, body: str, data: Any = None, caption: str | None = None,
             files: dict[str, str] | None = None) -> None:
        """An interactive part drawn by its own escaped markup and script (``viz.report.Report.add_html``)."""
        self.report.add_html(section, body, name, data=data, caption=caption, files=files)


def parameter_table(params: dict[str, Any]) -> pd.DataFrame:
    """Parameters as a two-column table, floats to 4 significant digits (a report quotes them, it does not dump a dict)."""
    def shown(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.4g}"
        return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return pd.DataFrame({"parameter": list(params), "value": [shown(v) for v in params.values()]})


def matrix_frame(m: np.ndarray, labels: Sequence[str]) -> pd.DataFrame:
    """A square matrix with its rows and columns labelled (layers, usually)."""
    return pd.DataFrame(np.asarray(m), index=list(labels), columns=list(labels))


def experts_note(num_experts: int, what: str = "each layer") -> str:
    """What a caption says when a wide model's expert-level figure shows only the most used experts."""
    if num_experts <= V.MAX_EXPERTS:
        return ""
    return f" Only the {V.MAX_EXPERTS} most used experts of {what} (of {num_experts}) are shown, in index order."


def estimate_figure(est: Any, labels: Sequence[str], title: str, y_title: str, x_title: str = "MoE layer") -> go.Figure:
    """A result's Estimate (value, interval, null) as bars beside its null."""
    return P.estimate_vs_null(list(labels), est.value, est.low, est.high, est.null, est.null_low, est.null_high,
                              title=title, y_title=y_title, x_title=x_title, null_label=f"{est.null_name} (95% range)")


def pair_picker(matrix: np.ndarray, E: int, layers: list[int], scores: np.ndarray, usage: np.ndarray | None,
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
               f"{score_name}, shown beside each; it opens on the strongest).{experts_note(E)} The numbers list the "
               "strongest expert pairs within each pair shown.")
    return fig, V.pair_table(matrix, E, layers, pairs, value="corr_diff" if measure.startswith("Δ") else "corr"), caption
