"""The style and script of the expert cards (``viz.expert_cards``): a card drawn on demand, every string as text."""

CSS = """.expert-cards .ec-picker{margin:.4rem 0}.expert-cards .ec-hint{color:#a33;font-size:.85rem}
.expert-cards .ec-panel{position:fixed;top:0;right:0;width:min(560px,96vw);height:100vh;overflow:auto;background:#fff;
box-shadow:-4px 0 16px rgba(0,0,0,.18);padding:.6rem 1rem 2rem;z-index:20;box-sizing:border-box;font-size:.88rem}
.expert-cards .ec-panel[hidden]{display:none}.expert-cards .ec-close{float:right;font-size:1.3rem;border:0;background:none;cursor:pointer}
.expert-cards .ec-panel h3{margin:.2rem 0 .3rem}.expert-cards .ec-panel h4{margin:.9rem 0 .2rem;color:#333}
.expert-cards .ec-panel table{font-size:.82rem;margin:.2rem 0}.expert-cards .ec-panel td,.expert-cards .ec-panel th{padding:.1rem .4rem}
.expert-cards .ec-ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8rem;margin:.25rem 0;white-space:pre-wrap;
word-break:break-all}.expert-cards .ec-meta{color:#666;font-family:system-ui,sans-serif;font-size:.75rem}
.expert-cards .ec-hit{background:#fdd835;font-weight:bold;outline:1px solid #c9a800}
.expert-cards .ec-bar{display:inline-block;height:.7rem;background:#3b7dd8;vertical-align:middle;margin-right:.3rem}
.expert-cards .ec-note{color:#666}.expert-cards button.ec-link{border:0;background:none;color:#1a5fb4;cursor:pointer;
text-decoration:underline;padding:0;font:inherit}"""

# Builds the picker, draws a card into the panel on demand, and links every figure whose hover names an expert.
JS = r"""function (root) {
  const embedded = root.querySelector('.ec-data'), data = embedded ? JSON.parse(embedded.textContent) : window.__expertCardsData;
  if (!data) { root.querySelector('.ec-hint').textContent = 'The cards\' data (data/expert_cards.js beside this page) is missing.';
               return; }
  const E = data.E, W = data.window, CW = 5 + 2 * W + 1, S = data.share;
  const layerSel = root.querySelector('.ec-layer'), expIn = root.querySelector('.ec-expert');
  const panel = root.querySelector('.ec-panel'), body = root.querySelector('.ec-body'), hint = root.querySelector('.ec-hint');
  const el = (tag, text, cls) => { const n = document.createElement(tag); if (text !== undefined) n.textContent = text;
                                   if (cls) n.className = cls; return n; };
  const pct = v => v === null || v === undefined ? '–' : (v / 1000).toFixed(v < 1000 ? 3 : 2) + '%';
  const num = (v, d, p) => v === null || v === undefined ? '–' : (v / d).toFixed(p === undefined ? 2 : p);
  const ci = (lo, hi, f) => lo === null || hi === null ? 'no interval' : f(lo) + ' – ' + f(hi);
  const label = t => t < 0 ? '' : (data.vocab[String(t)] !== undefined ? data.vocab[String(t)] : String(t));
  data.layers.forEach((l, i) => { const o = el('option', 'layer ' + l); o.value = i; layerSel.appendChild(o); });
  expIn.max = E - 1;
  const byCard = rows => { const m = new Map(); (rows || []).forEach(r => { if (!m.has(r[0])) m.set(r[0], []); m.get(r[0]).push(r); }); return m; };
  const ablation = byCard(data.ablation && data.ablation.rows), pruning = byCard(data.pruning && data.pruning.rows);
  function table(head, rows, cls) {
    const t = el('table', undefined, cls), tr = el('tr'); head.forEach(h => tr.appendChild(el('th', h))); t.appendChild(tr);
    rows.forEach(r => { const row = el('tr'); r.forEach(c => { const td = el('td');
      if (c instanceof Node) td.appendChild(c); else td.textContent = c; row.appendChild(td); }); t.appendChild(row); });
    return t;
  }
  function section(title, note) { body.appendChild(el('h4', title)); if (note) body.appendChild(el('p', note, 'ec-note')); }
  function shares(c) {
    const uni = 1e5 / E, rows = [];
    S.groups.forEach(([kind, name], g) => { if (g === 0) return; const v = S.v[g][c];
      rows.push([kind + ' ' + name, pct(v), ci(S.lo[g][c], S.hi[g][c], pct), v === null ? '–' : (v / uni).toFixed(2) + '×']); });
    section('Share by dataset and domain', 'Share of the group\'s routed slots, 95% interval over documents; × uniform (1/E).');
    body.appendChild(table(['group', 'share', '95% interval', '× uniform'], rows, 'ec-shares'));
  }
  function tokens(c) {
    const r = data.tok[c], rows = [];
    for (let i = 0; i < r.length; i += 7) rows.push([label(r[i]), r[i + 1], num(r[i + 3], 100), num(r[i + 4], 100),
                                                     ci(r[i + 5], r[i + 6], v => num(v, 100)), r[i + 2]]);
    section('Top tokens by lift', 'Lift: the count at this expert over the count the token\'s frequency predicts '
            + '(occurrences × the expert\'s selection rate); tokens seen here ' + data.min_count + '+ times.');
    body.appendChild(rows.length ? table(['token', 'count', 'expected', 'lift', '95% interval', 'occurrences'], rows, 'ec-tokens')
                                 : el('p', 'No token was routed here ' + data.min_count + ' or more times.', 'ec-note'));
  }
  function contexts(c) {
    const r = data.ctx[c];
    section('Max-activating contexts', 'The heaviest routings to this expert, ' + W + ' tokens either side (within the document).');
    if (!r.length) body.appendChild(el('p', 'No token was routed here.', 'ec-note'));
    for (let j = 0; j < r.length; j += CW) {
      const box = el('div', undefined, 'ec-ctx'), ds = S.groups.filter(g => g[0] === 'dataset')[r[j + 1]];
      const dm = S.groups.filter(g => g[0] === 'domain')[r[j + 2]];
      box.appendChild(el('div', (data.weights ? 'weight ' + (r[j] / 1000).toFixed(3) : 'weights not recorded') + ' · '
        + (ds ? ds[1] : '') + ' · ' + (dm ? dm[1] : '') + ' · document ' + r[j + 3] + ', position ' + r[j + 4], 'ec-meta'));
      for (let t = 0; t < 2 * W + 1; t++) { const id = r[j + 5 + t]; if (id < 0) continue;
        box.appendChild(el('span', label(id), t === W ? 'ec-hit' : 'ec-tok')); }
      body.appendChild(box);
    }
  }
  function partners(li, c) {
    section('Co-activation partners', 'Experts of the same layer chosen with this one, by lift over independence P(i and j) / (P(i) P(j)).');
    if (!data.partners) { body.appendChild(el('p', 'Not computed in this run.', 'ec-note')); return; }
    const r = data.partners[c], rows = [];
    for (let i = 0; i < r.length; i += 3) { const b = el('button', 'expert ' + r[i], 'ec-link'); const j = r[i];
      b.addEventListener('click', () => open(data.layers[li], j)); rows.push([b, num(r[i + 1], 100), r[i + 2]]); }
    body.appendChild(rows.length ? table(['partner', 'lift', 'tokens together'], rows, 'ec-partners') : el('p', 'None seen together often enough.', 'ec-note'));
  }
  function costs(c) {
    section('Ablation and pruning cost', 'Change in next-token loss (nats) when the expert is removed, 95% interval over documents.');
    const ab = ablation.get(c) || [], pr = pruning.get(c) || [], rows = [];
    ab.forEach(r => data.ablation.domains.forEach((d, k) => rows.push(['ablation ' + r[1] + (r[2] > 1 ? ' (' + r[2] + ' experts)' : ''),
      d, num(r[3][k], 1e4, 4), ci(r[4][k], r[5][k], v => num(v, 1e4, 4))])));
    pr.forEach(r => rows.push(['pruning by ' + r[1] + ', ' + (100 * r[2]).toFixed(0) + '% of experts', 'all', num(r[3], 1e4, 4),
                               ci(r[4], r[5], v => num(v, 1e4, 4))]));
    body.appendChild(rows.length ? table(['removed in', 'domain', 'Δ loss', '95% interval'], rows, 'ec-costs')
                                 : el('p', 'Not measured for this expert in this run.', 'ec-note'));
  }
  function checkpoints(c) {
    section('Share over checkpoints');
    const ck = data.checkpoints;
    if (!ck) { body.appendChild(el('p', 'One checkpoint only in this run.', 'ec-note')); return; }
    const top = Math.max(1, ...ck.v.map(v => v[c] || 0));
    body.appendChild(table(['step', 'share'], ck.steps.map((s, i) => { const cell = el('span');
      const bar = el('span', undefined, 'ec-bar'); bar.style.width = (120 * (ck.v[i][c] || 0) / top) + 'px';
      cell.appendChild(bar); cell.appendChild(document.createTextNode(pct(ck.v[i][c]))); return [s, cell]; })));
  }
  function draw(li, e) {
    const c = li * E + e;
    body.replaceChildren();
    body.appendChild(el('h3', 'Layer ' + data.layers[li] + ' · expert ' + e));
    body.appendChild(el('p', 'Share of routed slots: ' + pct(S.v[0][c]) + ' (95% interval ' + ci(S.lo[0][c], S.hi[0][c], pct)
      + '); uniform 1/E = ' + pct(1e5 / E) + '. ' + data.tokens_read + ' tokens read.'));
    shares(c); tokens(c); contexts(c); partners(li, c); costs(c); checkpoints(c);
    if (data.cut) body.appendChild(el('p', 'Fewer contexts and tokens are kept per card at this model\'s width, to keep the page small.', 'ec-note'));
  }
  function open(layer, expert) {
    const li = data.layers.indexOf(Number(layer)), e = Number(expert);
    if (li < 0 || !(e >= 0 && e < E) || Math.floor(e) !== e) { hint.textContent = 'no card for layer ' + layer + ', expert ' + expert; return false; }
    const t0 = performance.now();
    hint.textContent = ''; draw(li, e); panel.hidden = false; layerSel.value = li; expIn.value = e;
    root.dataset.openMs = (performance.now() - t0).toFixed(2); root.dataset.card = data.layers[li] + ':' + e;
    return true;
  }
  const coord = /(layer|expert) %\{(x|y|customdata\[(\d+)\])\}|(layer) (-?\d+)\b/g;
  function expertOf(p) {
    if (!p) return null;
    const tr = p.data || {}, tpl = String(tr.hovertemplate || (tr.node || {}).hovertemplate || '');
    const found = {};
    for (const m of tpl.matchAll(coord)) {
      const what = m[1] || m[4]; if (what in found) continue;
      if (m[5] !== undefined) { found[what] = Number(m[5]); continue; }
      let v = m[2] === 'x' ? p.x : m[2] === 'y' ? p.y : (p.customdata || [])[Number(m[3])];
      const n = String(v).match(/-?\d+/); if (!n) return null; found[what] = Number(n[0]);
    }
    return 'layer' in found && 'expert' in found ? [found.layer, found.expert] : null;
  }
  function attach(gd) {
    if (gd._expertCards || !gd.on) return;
    gd._expertCards = true;
    gd.on('plotly_click', ev => { const hit = expertOf(ev && ev.points && ev.points[0]); if (hit) open(hit[0], hit[1]); });
  }
  const attachAll = () => document.querySelectorAll('.plotly-graph-div').forEach(attach);
  const fromHash = () => { const m = location.hash.match(/^#expert-L(-?\d+)-E(\d+)$/); if (m) open(m[1], m[2]); };
  root.querySelector('.ec-open').addEventListener('click', () => open(data.layers[+layerSel.value], expIn.value));
  root.querySelector('.ec-close').addEventListener('click', () => { panel.hidden = true; });
  window.openExpertCard = open; window.expertOfPoint = expertOf;
  if (document.readyState === 'complete') { attachAll(); fromHash(); }
  else window.addEventListener('load', () => { attachAll(); fromHash(); });
  window.addEventListener('hashchange', fromHash);
}"""
