"""Text coloured by routing (after Mixtral's Fig. 8): sample documents, each token's background set by its routing.

The page holds the documents once, as compact JSON (token labels, then per token and layer the
k experts and their weights in thousandths, heaviest first), and a small script draws them
for the layer and colouring picked: each token's top-1 expert (a categorical palette; with
more experts than colours, expert e takes colour e mod the palette's size and hover names the
number) or one chosen expert's weight (a sequential scale). Hovering a token lists its k
experts and weights at that layer. Every string of the run reaches the page as JSON with
``<``, ``>`` and ``&`` escaped and is put into the page as text (``textContent``), never as markup.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from viz._common import token_label

# 24 light qualitative colours (ColorBrewer Set3, Pastel1, Pastel2, Paired): black text stays readable on each
PALETTE = ("#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#d9d9d9",
           "#bc80bd", "#ccebc5", "#ffed6f", "#fbb4ae", "#b3cde3", "#decbe4", "#fed9a6", "#e5d8bd", "#fddaec",
           "#b3e2cd", "#fdcdac", "#cbd5e8", "#e6f5c9", "#f1e2cc", "#a6cee3")
MAX_BYTES = 1_000_000  # the documents' JSON in the page; OLMoE's 6 x 200 tokens x 16 layers x k=8 take 0.96 MB


def expert_colour(expert: int) -> str:
    """The background of a token whose top-1 expert is ``expert`` (the script computes the same)."""
    return PALETTE[expert % len(PALETTE)]


def _ordered(experts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Each token's k slots at each layer, heaviest first, slots that reached no expert last (as -1)."""
    e = np.asarray(experts, np.int64)
    w = np.asarray(weights, np.float64)
    if np.isnan(w).all():  # stored without weights: the recorded order
        return np.where(e >= 0, e, -1), None
    dead = (e < 0) | ~(w != 0)
    order = np.argsort(np.where(dead, np.inf, -w), axis=-1, kind="stable")
    e, w, dead = (np.take_along_axis(a, order, -1) for a in (e, w, dead))
    return np.where(dead, -1, e), np.where(dead, 0, np.rint(w * 1000)).astype(np.int64)


def routed_text_payload(text: Any, decode: Callable[[int], str] | None = None, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """The page's data: layers, E, k, palette and each document's token labels, experts and weights (thousandths).

    ``text``: a ``core.analysis.routed_text.RoutedText`` or anything with its fields (viz imports no analysis).
    Documents are cut to one length when their JSON would pass ``max_bytes`` (``cut`` says so).
    """
    cap = int(max(np.diff(np.asarray(text.doc_start)), default=0))
    while True:
        payload = _payload(text, decode, cap)
        size = len(_script_json(payload))
        if size <= max_bytes or cap <= 1:
            return payload
        cap = max(1, min(cap - 1, int(cap * max_bytes / size * 0.97)))


def _payload(text: Any, decode: Callable[[int], str] | None, cap: int) -> dict[str, Any]:
    """The payload with every document cut at ``cap`` tokens."""
    start = np.asarray(text.doc_start)
    sizes = np.diff(start)
    docs = []
    for d in range(len(sizes)):
        rows = slice(int(start[d]), int(start[d]) + min(int(sizes[d]), cap))
        raw = [decode(int(t)) if decode else str(int(t)) for t in np.asarray(text.token_ids)[rows]]
        e, w = _ordered(np.asarray(text.experts)[rows], np.asarray(text.weights)[rows])
        docs.append({"domain": str(text.doc_domain[d]), "dataset": str(text.doc_dataset[d]), "doc": int(text.doc_id[d]),
                     "tokens": [token_label(s) for s in raw], "br": [i for i, s in enumerate(raw) if "\n" in s],
                     "pos": np.asarray(text.positions)[rows].tolist(), "e": e.ravel().tolist(),
                     "w": None if w is None else w.ravel().tolist(), **_prompt(text, d)})
    return {"layers": [int(x) for x in text.moe_layers], "E": int(text.num_experts), "k": int(text.top_k),
            "palette": list(PALETTE), "cut": bool((sizes > cap).any()), "docs": docs}


def _prompt(text: Any, d: int) -> dict[str, int]:
    """Where document ``d``'s prompt ends, for generated text (tokens from there on were written by the model)."""
    lengths = getattr(text, "prompt_length", None)
    return {} if lengths is None else {"prompt": int(np.asarray(lengths)[d])}


def _script_json(payload: dict[str, Any]) -> str:
    """JSON safe inside a script element: no ``</script>``, comment or entity can start from the data."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def routed_text_html(payload: dict[str, Any], element_id: str) -> str:
    """The markup of one coloured-text part: its controls, its data (escaped JSON) and the script that draws it."""
    eid = html.escape(element_id, quote=True)
    return (f"<div class='routed-text' id='{eid}'><div class='rt-controls'>"
            "<label>layer <select class='rt-layer'></select></label> "
            "<label>colour by <select class='rt-mode'><option value='top1'>top-1 expert</option>"
            "<option value='weight'>one expert's weight</option></select></label> "
            "<label>expert <select class='rt-expert' disabled></select></label></div>"
            "<div class='rt-docs'></div><div class='rt-tip' role='tooltip'></div>"
            f"<script type='application/json' class='rt-data'>{_script_json(payload)}</script></div>"
            f"<style>{_CSS}</style><script>({_JS})(document.getElementById({json.dumps(element_id)}));</script>")


_CSS = """.routed-text .rt-docs{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem;line-height:1.9}
.routed-text .rt-doc{margin:.6rem 0;padding:.3rem 0;border-top:1px solid #eee}
.routed-text .rt-head{font-family:system-ui,sans-serif;color:#555;font-size:.85rem}
.routed-text .rt-tok{padding:1px 0;border-right:1px solid #fff;white-space:pre;cursor:default}
.routed-text .rt-gen{text-decoration:underline dotted #444;font-style:italic}
.routed-text .rt-mark{color:#888;font-family:system-ui,sans-serif;padding:0 .2rem}
.routed-text .rt-tip{position:fixed;display:none;background:#222;color:#fff;padding:.3rem .5rem;
font-size:.8rem;border-radius:3px;pointer-events:none;white-space:pre;z-index:10}"""

# Draws one part: builds the token spans once, recolours them for the picked layer and mode, fills the hover.
_JS = r"""function (root) {
  const data = JSON.parse(root.querySelector('.rt-data').textContent);
  const L = data.layers.length, k = data.k, P = data.palette;
  const layerSel = root.querySelector('.rt-layer'), modeSel = root.querySelector('.rt-mode');
  const expSel = root.querySelector('.rt-expert'), box = root.querySelector('.rt-docs');
  const tip = root.querySelector('.rt-tip');
  const opt = (sel, v, t) => { const o = document.createElement('option'); o.value = v; o.textContent = t; sel.appendChild(o); };
  data.layers.forEach((l, i) => opt(layerSel, i, 'layer ' + l));
  for (let e = 0; e < data.E; e++) opt(expSel, e, 'expert ' + e);
  let wmax = 1;
  data.docs.forEach(d => (d.w || []).forEach(v => { if (v / 1000 > wmax) wmax = v / 1000; }));
  const spans = [];
  data.docs.forEach((d, di) => {
    const div = document.createElement('div'); div.className = 'rt-doc';
    const head = document.createElement('div'); head.className = 'rt-head';
    const gen = d.prompt === undefined ? -1 : d.prompt;
    head.textContent = d.domain + (d.dataset ? ' · ' + d.dataset : '') + ' · document ' + d.doc +
      (gen >= 0 ? ' · prompt ' + gen + ' tokens, then ' + (d.tokens.length - gen) + ' generated' : '');
    div.appendChild(head);
    const br = new Set(d.br);
    d.tokens.forEach((t, ti) => {
      if (ti === gen) { const m = document.createElement('span'); m.className = 'rt-mark'; m.textContent = '▸'; div.appendChild(m); }
      const s = document.createElement('span'); s.className = ti >= gen && gen >= 0 ? 'rt-tok rt-gen' : 'rt-tok'; s.textContent = t;
      s.dataset.doc = di; s.dataset.tok = ti; div.appendChild(s); spans.push(s);
      if (br.has(ti)) div.appendChild(document.createElement('br'));
    });
    box.appendChild(div);
  });
  const slot = (d, ti, l, j) => (ti * L + l) * k + j;
  const weightOf = (d, ti, l, e) => {
    for (let j = 0; j < k; j++) if (d.e[slot(d, ti, l, j)] === e) return d.w ? d.w[slot(d, ti, l, j)] / 1000 : 1;
    return 0;
  };
  const blue = x => { const t = Math.max(0, Math.min(1, x / wmax));
    return 'rgb(' + [255 - 247 * t, 255 - 174 * t, 255 - 99 * t].map(Math.round).join(',') + ')'; };
  function draw() {
    const l = +layerSel.value, mode = modeSel.value, e = +expSel.value;
    expSel.disabled = mode !== 'weight';
    for (const s of spans) {
      const d = data.docs[+s.dataset.doc], ti = +s.dataset.tok, top = d.e[slot(d, ti, l, 0)];
      if (mode === 'top1') { s.style.background = top >= 0 ? P[top % P.length] : '#fff'; s.style.color = '#000';
                             s.dataset.top = top; }
      else { const w = weightOf(d, ti, l, e); s.style.background = blue(w); s.style.color = w / wmax > 0.6 ? '#fff' : '#000'; }
    }
  }
  function hover(ev) {
    const s = ev.target.closest('.rt-tok');
    if (!s) { tip.style.display = 'none'; return; }
    const d = data.docs[+s.dataset.doc], ti = +s.dataset.tok, l = +layerSel.value, lines = [];
    for (let j = 0; j < k; j++) { const e = d.e[slot(d, ti, l, j)];
      if (e >= 0) lines.push('expert ' + e + (d.w ? '  ' + (d.w[slot(d, ti, l, j)] / 1000).toFixed(3) : '')); }
    const kind = d.prompt === undefined ? '' : (ti >= d.prompt ? ' (generated)' : ' (prompt)');
    tip.textContent = '"' + d.tokens[ti] + '"' + kind + '  position ' + d.pos[ti] + ', layer ' + data.layers[l] + '\n' + lines.join('\n');
    tip.style.display = 'block'; tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px';
  }
  layerSel.addEventListener('change', draw); modeSel.addEventListener('change', draw); expSel.addEventListener('change', draw);
  box.addEventListener('mouseover', hover); box.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
  draw();
}"""
