"""Shared checks and styling for the figure modules.

Every figure function takes plain arrays, so bad shapes are caught here with one clear
message instead of surfacing later as an unreadable Plotly error. Text that may come from
datasets (tokens, domain names) goes through :func:`esc` before it reaches a label or hover
text: Plotly renders those strings as a small subset of HTML.
"""

from __future__ import annotations

import html
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

# One colour scale per meaning, so the same quantity looks the same in every figure.
SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"
TEMPLATE = "plotly_white"  # every figure's


class FigureInputError(ValueError):
    """An array or label list handed to a figure function has the wrong shape or content."""


def esc(text: Any) -> str:
    """HTML-escape ``text`` for Plotly labels and hover text (tokens may contain markup)."""
    return html.escape(str(text), quote=True)


_BYTE_LEVEL = {"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "č": "\r"}  # GPT-2 byte-level BPE's stand-ins for whitespace bytes


def token_label(token: object) -> str:
    """A token as a reader can see it: spaces as ␣, newlines and tabs as \\n and \\t, other control characters as \\xNN.

    A token given in its byte-level BPE spelling (``Ġthe``: a tokenizer without a decoder, or
    ``convert_ids_to_tokens``) holds no real whitespace; its markers are read as the bytes they stand for.
    """
    text = str(token)
    if not any(c.isspace() for c in text) and any(c in _BYTE_LEVEL for c in text):
        text = "".join(_BYTE_LEVEL.get(c, c) for c in text)
    for raw, shown in (("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), (" ", "␣")):
        text = text.replace(raw, shown)
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) in ("Cc", "Cf") and ord(c) < 256 else
                   f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)


def as_array(values: Any, ndim: int, name: str, allow_nan: bool = True) -> np.ndarray:
    """Return ``values`` as a float array with ``ndim`` dimensions, or raise naming ``name``."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise FigureInputError(f"{name}: expected numbers, got {type(values).__name__} ({exc})")
    if arr.ndim != ndim:
        raise FigureInputError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise FigureInputError(f"{name}: is empty (shape {arr.shape})")
    if not allow_nan and not np.all(np.isfinite(arr)):
        raise FigureInputError(f"{name}: contains NaN or infinite values")
    # C order whatever the caller's layout: numpy sums a strided view in another order than a contiguous copy, so a
    # layer mean of a result just computed and of the same result read back differed in its last bit, and the figure's
    # image was drawn again (3 s) on the first rerun
    return np.ascontiguousarray(arr)


def check_len(labels: Sequence[Any], expected: int, name: str, what: str) -> list[Any]:
    """Check that ``labels`` has ``expected`` entries (``what`` says which axis they label)."""
    labels = list(labels)
    if len(labels) != expected:
        raise FigureInputError(f"{name}: has {len(labels)} entries but {what} has {expected}")
    return labels


def check_square(arr: np.ndarray, name: str) -> None:
    """Raise unless ``arr`` is a square matrix."""
    if arr.shape[0] != arr.shape[1]:
        raise FigureInputError(f"{name}: expected a square matrix, got shape {arr.shape}")


def finish(
    fig: go.Figure,
    title: str,
    x_title: str,
    y_title: str,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """Apply the shared title, axis titles and template so figures look alike in a report.

    One ``update_layout`` holds it all, every x and y axis included (what ``update_xaxes`` and
    ``update_yaxes`` would set): each plotly update has a fixed cost, and five of them were two
    thirds of this function's time, for a figure function called dozens of times per report.
    """
    _set_template(fig, TEMPLATE)
    update: dict[str, Any] = {"title": {"text": esc(title), "x": 0.02, "xanchor": "left"},
                              "margin": {"l": 70, "r": 30, "t": 70, "b": 60}, "hoverlabel": {"namelength": -1}}
    update.update({k: v for k, v in (("height", height), ("width", width)) if v is not None})
    for axes, text in ((fig.select_xaxes(), x_title), (fig.select_yaxes(), y_title)):
        update.update({axis.plotly_name: {"title": {"text": esc(text)}} for axis in axes})
    fig.update_layout(update)
    return fig


def _set_template(fig: go.Figure, name: str) -> None:
    """``fig.layout.template = name``, a template registered with plotly, set as plotly sets its default template.

    Plotly validates an assigned template entry by entry, 10 ms of the 14 ms ``finish`` took a figure
    (a report draws dozens); its own default template it sets with validation off, being valid
    already. So is this one; the figure is the same (tests/test_viz_figures.py). Where plotly has
    no ``_validate`` switch, setting it changes nothing and the template is validated as before.
    """
    import plotly.io as pio

    layout = fig.layout
    validate = getattr(layout, "_validate", True)
    layout._validate = False
    try:
        layout.template = pio.templates[name]
    finally:
        layout._validate = validate


def wrap_title(text: str, width: int = 36) -> tuple[str, int]:
    """``text`` broken into lines of at most ``width`` characters (``<br>``), and the number of lines.

    A rotated y-axis title longer than the plot is tall runs past both ends, over the figure's
    title and off the bottom; Plotly does not wrap it. The caller escapes ``text`` first.
    """
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "<br>".join(lines), max(len(lines), 1)


def colour_range(z: np.ndarray) -> dict[str, Any]:
    """Heatmap colour settings for ``z``: sequential from 0 when no value is negative, else diverging about 0.

    Shares, rates and mean |r| are never negative; a diverging scale would spend half its
    colours (and negative colour-bar ticks) on values that cannot occur.
    """
    finite = np.asarray(z, dtype=float)[np.isfinite(z)]
    if finite.size and finite.min() >= 0:
        return {"colorscale": SEQUENTIAL, "zmin": 0.0, "zmax": float(finite.max()) or 1.0}
    return {"colorscale": DIVERGING, "zmid": 0.0}


def blank_diagonal(z: np.ndarray) -> np.ndarray:
    """A copy of the square ``z`` with NaN on its diagonal (left blank, out of the colour range).

    A matrix of a thing against itself has 1 (or its largest value) on the diagonal, which would
    stretch the colour scale and wash out the off-diagonal values the figure is about.
    """
    out = np.array(z, dtype=float)
    if out.shape[0] > 1:
        np.fill_diagonal(out, np.nan)
    return out


def diagonal_marks(ids: Sequence[Any], values: np.ndarray, hover: str, visible: bool = True) -> go.Scatter:
    """Invisible points on a blanked diagonal so hovering there says why it is blank (``hover`` names the cell)."""
    ids = list(ids)
    return go.Scatter(
        x=ids, y=ids, mode="markers", marker={"opacity": 0, "size": 12}, showlegend=False, visible=visible,
        customdata=compact(np.asarray(values, dtype=float)),
        hovertemplate=hover + "<br>diagonal: left out of the colour scale (value %{customdata:.4f})<extra></extra>",
    )


def heatmap_height(rows: int, per_row: int = 22, base: int = 220, cap: int = 1400) -> int:
    """Height that keeps heatmap rows readable without making small matrices huge."""
    return int(min(cap, max(380, base + per_row * rows)))


def layer_names(layers: Sequence[int]) -> list[str]:
    """Axis labels for MoE layers given by their model layer index."""
    return [f"L{int(layer)}" for layer in layers]


def compact(values: Any) -> np.ndarray:
    """Floats as float32 and integers in the smallest int type that holds them.

    Plotly embeds numpy arrays as base64 of their own dtype, so this halves (floats) or
    quarters (labels) what a large heatmap adds to the page; hover shows 3-4 digits anyway.
    """
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind in "iu" and arr.size:
        for kind in (np.int8, np.int16, np.int32):
            info = np.iinfo(kind)
            if info.min <= arr.min() and arr.max() <= info.max:
                return arr.astype(kind, copy=False)
    return arr


def pick_one(fig: go.Figure, labels: Sequence[str], titles: Sequence[str], shown: int = 0) -> go.Figure:
    """Show one option's traces at a time, chosen in a dropdown (``fig.data`` holds the options' traces in order).

    Every option stays in the figure, so the page needs no server; the menu only switches
    which traces are visible and retitles the figure.
    """
    n = len(labels)
    if n == 0 or len(fig.data) % n or len(titles) != n:
        raise FigureInputError(f"labels: {n} options for {len(fig.data)} traces and {len(titles)} titles")
    per = len(fig.data) // n
    for i, trace in enumerate(fig.data):
        trace.visible = i // per == shown
    buttons = [{"label": esc(label), "method": "update",
                "args": [{"visible": [i // per == o for i in range(len(fig.data))]}, {"title.text": esc(titles[o])}]}
               for o, label in enumerate(labels)]
    fig.update_layout(
        title_text=esc(titles[shown]),
        updatemenus=[{"buttons": buttons, "active": shown, "direction": "down", "showactive": True,
                      "x": 1.0, "xanchor": "right", "y": 1.02, "yanchor": "bottom"}],
    )
    return fig
