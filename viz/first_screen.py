"""The report's first screen: the strongest findings, each beside a small copy of its figure, then the rest as a list.

The small figures carry no data of their own: once the page has loaded, a script draws each one
from the traces of the full figure further down (``Plotly.newPlot`` on the same trace objects,
static, without title, menus or axis titles), so the first screen adds a few hundred bytes per
finding whatever the model's size.
"""

from __future__ import annotations

import html
from collections.abc import Collection, Sequence

LEAD_CSS = """
#learned{background:#f1f7ff;border-left:4px solid #3b7dd8;padding:.5rem 1rem}#learned li{margin:.45rem 0}
#learned a.fig{white-space:nowrap;margin-left:.4rem}
.lead-grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:1rem;margin:.5rem 0 1rem}
.lead-card{background:#fff;border:1px solid #d5e3f5;border-radius:4px;padding:.5rem .7rem;font-size:.92rem}
.lead-card p{margin:0 0 .4rem}.lead-thumb{height:220px;cursor:pointer}
"""

THUMB_HEIGHT = 220

# Each .lead-thumb is drawn from the figure it names, once every figure of the page has been drawn.
LEAD_JS = """<script type='text/javascript'>
window.addEventListener('load', () => {
  for (const box of document.querySelectorAll('.lead-thumb')) {
    const gd = document.getElementById(box.dataset.fig);
    if (!gd || !gd.data) continue;
    const axis = a => Object.assign({}, a || {}, {title: {text: ''}});
    const layout = Object.assign({}, gd.layout, {height: %d, width: null, autosize: true, title: {text: ''},
      updatemenus: [], sliders: [], showlegend: false, margin: {l: 40, r: 10, t: 10, b: 30},
      xaxis: axis(gd.layout.xaxis), yaxis: axis(gd.layout.yaxis)});
    Plotly.newPlot(box, gd.data.map(t => Object.assign({}, t)), layout, {staticPlot: true, responsive: true});
    box.addEventListener('click', () => document.getElementById('item-' + box.dataset.fig.slice(4)).scrollIntoView());
  }
});
</script>""" % THUMB_HEIGHT


def render_lead(lead: Sequence[tuple[str, str | None]], shown: int, figures: Collection[str]) -> str:
    """The "What we learned" section: the first ``shown`` findings as cards with a small figure, then the others."""
    if not lead:
        return ""
    esc = html.escape

    def link(name: str | None) -> str:
        return f"<a class='fig' href='#item-{esc(name)}'>→ figure</a>" if name in figures else ""

    cards = [(text, name) for text, name in lead[:shown] if name in figures]
    rest = [item for item in lead if item not in cards]
    grid = "".join(f"<div class='lead-card'><p>{esc(text)}{link(name)}</p>"
                   f"<div class='lead-thumb' data-fig='fig-{esc(name)}' title='open the figure'></div></div>"
                   for text, name in cards)
    items = "".join(f"<li>{esc(text)}{link(name)}</li>" for text, name in rest)
    more = (f"<h3>{'More findings' if cards else 'Findings'}</h3><ul>{items}</ul>" if items else "")
    return ("<section id='learned'><h2>What we learned</h2>"
            + (f"<div class='lead-grid'>{grid}</div>" if grid else "") + more + "</section>")
