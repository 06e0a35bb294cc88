"""One self-contained HTML page per run: summary, warnings, figures and their numbers.

The page must open from disk with no network and be safe to share, so plotly.js is
embedded once (or shipped beside the page), every string from the run is HTML-escaped,
and the numbers behind each figure are written as CSV/JSON files the page links to.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline

from core.array_files import ARRAY_FILE as ARRAYS_FILE  # the run's full matrices, beside report.html and metrics.json
from core.safe_io import atomic_write_text, to_jsonable
from viz.first_screen import LEAD_CSS, LEAD_JS, render_lead

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}$")
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;
padding:1rem 2rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}.meta{color:#666;font-size:.9rem;margin-top:0}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f4f6f8}.warnings{background:#fff4e5;border-left:4px solid #f0a020;
padding:.5rem 1rem;margin:1rem 0}.warnings li{margin:.2rem 0}
figure.report-figure{margin:1.5rem 0;border-top:1px solid #eee;padding-top:.5rem}
figcaption{font-size:.9rem;color:#444}figcaption a{margin-left:.6rem}.full-data a{margin-left:0}
nav ol{columns:2}section{margin-top:2rem}.table-wrap{overflow-x:auto;max-height:480px}
"""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"report item name {name!r}: use letters, digits, '_', '-' or '.' "
            "(it becomes a file name)"
        )
    return name


def _fmt(value: Any) -> str:
    """Readable text for a summary value (lists joined, floats to 4 significant digits)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _paragraphs(text: str | None) -> str:
    if not text:
        return ""
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "".join(f"<p>{html.escape(p)}</p>" for p in parts)


def _html_table(df: pd.DataFrame, max_rows: int) -> str:
    shown = df.head(max_rows)
    index = not isinstance(df.index, pd.RangeIndex)
    head = ([html.escape(str(df.index.name or ""))] if index else []) + [
        html.escape(str(c)) for c in df.columns
    ]
    rows = []
    for idx, row in shown.iterrows():
        cells = ([f"<th>{html.escape(_fmt(idx))}</th>"] if index else []) + [
            f"<td>{html.escape(_fmt(v))}</td>" for v in row.tolist()
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = (
        f"<p class='meta'>showing {len(shown)} of {len(df)} rows; the download has all</p>"
        if len(df) > len(shown)
        else ""
    )
    return (
        "<div class='table-wrap'><table><thead><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
        + more
    )


def _full_arrays(keys: tuple[str, ...], present: bool) -> str:
    """Caption text naming the file that holds the full matrices behind a summarized figure.

    It links the file only when it lies beside the page (the main run writes it first); a report
    written without it names the keys and says where they would be, rather than a dead link.
    """
    if not keys:
        return ""
    names = ", ".join(f"<code>{html.escape(k)}</code>" for k in keys)
    many = len(keys) > 1
    where = (f"<a href='{ARRAYS_FILE}'>{ARRAYS_FILE}</a>" if present
             else f"{ARRAYS_FILE} (not written beside this report: <code>core.array_files.write_metrics</code> writes it)")
    return (f" <span class='full-data'>Full expert-level matri{'ces' if many else 'x'}: "
            f"{where}, key{'s' if many else ''} {names} "
            "(<code>core.array_files.load_array(run_dir, key)</code>).</span>")


@dataclass
class _Item:
    kind: str  # "figure" | "table" | "html"
    name: str
    caption: str | None
    fig: go.Figure | None = None
    data: Any = None
    body: str = ""  # kind "html": markup built by a viz module that escapes every string of the run
    files: Mapping[str, str] = field(default_factory=dict)  # kind "html": text files written under data/ (scripts it loads)
    max_rows: int = 50
    arrays: tuple[str, ...] = ()


@dataclass
class _Section:
    name: str
    text: str | None
    items: list[_Item] = field(default_factory=list)


class Report:
    """Collects a run's summary, warnings, figures and tables; ``write`` renders the page.

    ``plotlyjs="inline"`` embeds plotly.js in the page (one shareable file, ~5 MB);
    ``"file"`` writes ``plotly.min.js`` beside it instead. Either way no network is needed.
    """

    def __init__(
        self,
        title: str,
        summary: Mapping[str, Any] | None = None,
        warnings: Iterable[str] = (),
        plotlyjs: str = "inline",
    ) -> None:
        if plotlyjs not in ("inline", "file"):
            raise ValueError(f"plotlyjs must be 'inline' or 'file', got {plotlyjs!r}")
        self.title = str(title)
        self.summary: dict[str, Any] = dict(summary or {})
        self.warnings: list[str] = [str(w) for w in warnings]
        self.plotlyjs = plotlyjs
        self._sections: dict[str, _Section] = {}
        self._names: set[str] = set()
        self.lead: list[tuple[str, str | None]] = []  # the first screen: (finding, name of the figure behind it)
        self.lead_shown = 0  # how many of the first findings are shown as cards, each with a small copy of its figure

    # ----------------------------------------------------------------- building
    def add_warning(self, text: str) -> None:
        """Add a warning shown at the top of the page (e.g. expert collapse)."""
        self.warnings.append(str(text))

    def add_section(self, name: str, text: str | None = None) -> None:
        """Start a section (or set the text of an existing one); sections keep their order."""
        if name in self._sections:
            if text is not None:
                self._sections[name].text = text
            return
        self._sections[name] = _Section(str(name), text)

    def _add(self, section: str, item: _Item) -> None:
        _check_name(item.name)
        if item.name in self._names:
            raise ValueError(f"report item name {item.name!r} is used twice")
        self._names.add(item.name)
        self.add_section(section)
        self._sections[section].items.append(item)

    def add_figure(
        self,
        section: str,
        fig: go.Figure,
        name: str,
        data: pd.DataFrame | Mapping[str, Any] | np.ndarray | list | None = None,
        caption: str | None = None,
        arrays: Iterable[str] = (),
    ) -> None:
        """Add a figure; ``data`` is the numbers behind it (CSV for tables, else JSON).

        Without ``data`` the figure's own JSON is offered for download instead. ``arrays``
        names the keys in the run's ``arrays.safetensors`` that hold the full matrices a
        summarized figure shows only part of; the caption links the file and names them.
        """
        if not isinstance(fig, go.Figure):
            raise TypeError(f"add_figure({name!r}): expected a plotly Figure, got {type(fig).__name__}")
        self._add(section, _Item("figure", name, caption, fig=fig, data=data, arrays=tuple(map(str, arrays))))

    def add_table(
        self,
        section: str,
        df: pd.DataFrame,
        name: str,
        caption: str | None = None,
        max_rows: int = 50,
    ) -> None:
        """Add a table (e.g. example tokens) shown escaped in the page and downloadable as CSV."""
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"add_table({name!r}): expected a pandas DataFrame, got {type(df).__name__}")
        self._add(section, _Item("table", name, caption, data=df, max_rows=max_rows))

    def add_html(self, section: str, body: str, name: str, data: Any = None, caption: str | None = None,
                 files: Mapping[str, str] | None = None) -> None:
        """Add an interactive part drawn by its own markup and script (``body``), its numbers (``data``) as JSON.

        ``body`` goes into the page as it is: the viz module that builds it escapes every string of the run.
        ``files``: text files written under ``data/`` before the page (data too big for the page, loaded by a script tag).
        """
        for fname in files or {}:
            _check_name(fname)
        self._add(section, _Item("html", name, caption, data=data, body=str(body), files=dict(files or {})))

    @property
    def num_figures(self) -> int:
        """How many figures the page will draw (the browser test counts them)."""
        return sum(i.kind == "figure" for s in self._sections.values() for i in s.items)

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _write_data(data_dir: Path, name: str, data: Any) -> str:
        """Write the numbers for one item; return the file name relative to the page."""
        if isinstance(data, np.ndarray) and data.ndim <= 2:
            data = pd.DataFrame(np.atleast_2d(data) if data.ndim == 1 else data)
        if isinstance(data, pd.Series):
            data = data.to_frame()
        if isinstance(data, pd.DataFrame):
            index = not isinstance(data.index, pd.RangeIndex)
            atomic_write_text(data_dir / f"{name}.csv", data.to_csv(index=index))
            return f"data/{name}.csv"
        # compact: the C encoder (an indent takes Python's, 5-10x slower on a wide model's tables); a JSON viewer indents
        text = json.dumps(to_jsonable(data, strict=False), separators=(",", ":"), allow_nan=False)
        atomic_write_text(data_dir / f"{name}.json", text)
        return f"data/{name}.json"

    def _render_item(self, item: _Item, data_dir: Path, arrays_present: bool) -> str:
        if item.kind == "table":
            href = self._write_data(data_dir, item.name, item.data)
            body = _html_table(item.data, item.max_rows)
        elif item.kind == "html":
            href = self._write_data(data_dir, item.name, item.data)
            for fname, text in item.files.items():
                atomic_write_text(data_dir / fname, text)
            body = item.body
        else:
            figure = item.fig.to_dict()  # one copy of the figure serves its JSON file and its page (each made its own)
            if item.data is None:
                href = f"data/{item.name}.figure.json"
                atomic_write_text(data_dir / f"{item.name}.figure.json", pio.to_json(figure, validate=False))
            else:
                href = self._write_data(data_dir, item.name, item.data)
            height = item.fig.layout.height or 480
            body = pio.to_html(
                figure,
                validate=False,
                full_html=False,
                include_plotlyjs=False,
                div_id=f"fig-{item.name}",
                config=_PLOTLY_CONFIG,
                default_height=f"{int(height)}px",
            )
        kind = "CSV" if href.endswith(".csv") else "JSON"
        link = f"<a href='{html.escape(href)}' download>numbers ({kind})</a>"
        caption = html.escape(item.caption) if item.caption else html.escape(item.name)
        return (
            f"<figure class='report-figure report-{item.kind}' id='item-{html.escape(item.name)}'>"
            f"{body}<figcaption>{caption}{_full_arrays(item.arrays, arrays_present)}{link}"
            "</figcaption></figure>"
        )

    def _render_lead(self) -> str:
        """What the run found, first: the strongest findings with a small figure each, then the rest, linked."""
        known = {i.name for s in self._sections.values() for i in s.items if i.kind == "figure"}
        return render_lead(self.lead, self.lead_shown, known)

    def render(self, data_dir: Path) -> str:
        """Build the page, writing each item's numbers into ``data_dir`` on the way."""
        esc = html.escape
        created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        if self.plotlyjs == "inline":
            script = f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>"
        else:
            script = "<script type='text/javascript' src='plotly.min.js'></script>"
        summary_rows = "".join(
            f"<tr><th>{esc(str(k))}</th><td>{esc(_fmt(v))}</td></tr>" for k, v in self.summary.items()
        )
        parts = [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{esc(self.title)}</title><style>{_CSS}{LEAD_CSS}</style>{script}</head><body>",
            f"<header><h1>{esc(self.title)}</h1><p class='meta'>written {created}</p></header>",
            self._render_lead(),
            "<section id='summary'><h2>Summary</h2>",
            f"<table class='summary'>{summary_rows}</table>" if summary_rows else "",
        ]
        if self.warnings:
            items = "".join(f"<li>{esc(w)}</li>" for w in self.warnings)
            parts.append(f"<div class='warnings'><h3>Warnings</h3><ul>{items}</ul></div>")
        parts.append("</section>")
        sections = list(self._sections.values())
        arrays_present = (data_dir.parent / ARRAYS_FILE).is_file()  # the page's captions link it only if it is there
        if sections:
            toc = "".join(
                f"<li><a href='#sec-{i}'>{esc(s.name)}</a></li>" for i, s in enumerate(sections)
            )
            parts.append(f"<nav><h2>Contents</h2><ol>{toc}</ol></nav>")
        for i, section in enumerate(sections):
            parts.append(f"<section id='sec-{i}'><h2>{esc(section.name)}</h2>")
            parts.append(_paragraphs(section.text))
            parts.extend(self._render_item(item, data_dir, arrays_present) for item in section.items)
            parts.append("</section>")
        parts.append((LEAD_JS if self.lead_shown else "") + "</body></html>")
        return "\n".join(parts)

    def write(self, run_dir: str | Path, filename: str = "report.html") -> Path:
        """Write ``report.html`` and ``data/*`` under ``run_dir``; return the page's path.

        Data files are written first and the page last, each atomically, so the page never
        links to a file that is not there yet.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.plotlyjs == "file":
            atomic_write_text(run_dir / "plotly.min.js", plotly.offline.get_plotlyjs())
        page = self.render(run_dir / "data")
        return atomic_write_text(run_dir / filename, page)
