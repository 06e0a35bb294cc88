"""Expert cards in headless Chromium: the planted experts' cards, opened by the picker and by clicking a heatmap cell.

Also: the cards at 4 x 8 and 16 x 64 (every figure draws with clear titles, a card opens in under a second, every
figure naming an expert links to the cards) on ``tests/test_report_scale.py``'s synthetic runs, whose sizes at 16 x 64
and 60 x 256 are checked there.
Needs Debian's ``chromium``; skipped without it.
"""

from __future__ import annotations

import json
import time

import pytest

from core.analysis.coactivation import coactivation
from core.analysis.expert_cards import expert_cards
from core.analysis.routing_stats import routing_stats
from core.analysis.specialization import domain_specialization
from core.pipeline.outputs import build_report
from core.pipeline.record import RunRecord
from tests.test_expert_cards import DIGIT_EXPERT, DIGITS, KEYWORD_EXPERT, KEYWORDS, LAYER, RD, VOCAB
from tests.test_report_scale import synthetic_results
from tests.geometry import title_problems
from viz.browser_check import FIGURE_GEOMETRY_JS, check_page, find_chromium

MB = 1 << 20
needs_browser = pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install -y chromium)")

# Opens a card with the picker, reads what it shows, and times it with performance.now().
OPEN_CARD_JS = """(layer, expert) => {
  const root = document.getElementById('expert-cards');
  root.querySelector('.ec-layer').value = String(%(li)s);
  root.querySelector('.ec-expert').value = String(expert);
  const t0 = performance.now();
  root.querySelector('.ec-open').click();
  const ms = performance.now() - t0;
  const panel = root.querySelector('.ec-panel');
  const rows = sel => Array.from(panel.querySelectorAll(sel + ' tr')).slice(1).map(r => r.cells[0].textContent);
  const tokens = rows('.ec-tokens');
  return {ms: ms, shown: !panel.hidden, card: root.dataset.card, title: panel.querySelector('h3').textContent, tokens: tokens,
          hits: Array.from(panel.querySelectorAll('.ec-hit')).map(s => s.textContent),
          contexts: Array.from(panel.querySelectorAll('.ec-ctx')).map(d => d.textContent),
          partners: rows('.ec-partners'), groups: rows('.ec-shares'), markup: panel.querySelectorAll('script, img, iframe').length, text: panel.textContent};
}"""


def _open(layer_pos: int, layer: int, expert: int) -> str:
    return f"JSON.stringify(({OPEN_CARD_JS % {'li': layer_pos}})({layer}, {expert}))"


# A real click on the utilization heatmap's cell (layer 1, expert 5): mouse events at the cell's pixel, as a reader's.
CLICK_CELL_JS = """(() => {
  const gd = document.getElementById('fig-utilization'), root = document.getElementById('expert-cards');
  root.querySelector('.ec-panel').hidden = true; delete root.dataset.card;
  const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, drag = gd.querySelector('.nsewdrag');
  const box = drag.getBoundingClientRect();
  const x = box.left + xa.l2p(5), y = box.top + ya.l2p(ya.d2l('1'));
  const opts = {bubbles: true, cancelable: true, clientX: x, clientY: y, view: window, buttons: 1};
  drag.dispatchEvent(new MouseEvent('mousemove', opts));
  drag.dispatchEvent(new MouseEvent('mousedown', opts));
  drag.dispatchEvent(new MouseEvent('mouseup', opts));
  drag.dispatchEvent(new MouseEvent('click', opts));
  return new Promise(r => setTimeout(() => r(JSON.stringify({card: root.dataset.card || null,
    shown: !root.querySelector('.ec-panel').hidden, title: (root.querySelector('.ec-panel h3') || {}).textContent})), 300));
})()"""

# What each expert-naming figure's click would open: its first trace's hover template read at cell (x=2, y=row 1).
FIGURE_LINKS_JS = """(() => {
  const out = {};
  for (const gd of document.querySelectorAll('.plotly-graph-div')) {
    const tr = gd.data.find(t => /expert %\\{/.test(String(t.hovertemplate || (t.node || {}).hovertemplate || '')));
    if (!tr) continue;
    out[gd.id] = {linked: !!gd._expertCards,
                  hit: window.expertOfPoint({data: tr, x: 2, y: (tr.y || [1, 1])[1], customdata: [1, 2]})};
  }
  return JSON.stringify(out);
})()"""


def _planted_page(tmp_path):
    record = RunRecord(options={}, model={"name": "planted"}, datasets=("planted",), tokens={"planted": RD.num_tokens},
                       checkpoints=(), results={
        "routing_stats": routing_stats(RD), "coactivation": coactivation(RD),
        "domain_specialization": domain_specialization(RD, by="domain"), "expert_cards": expert_cards(RD, min_count=5)})
    report, _ = build_report(record, decode=lambda t: VOCAB[t])
    return report, report.write(tmp_path)


@needs_browser
def test_the_planted_cards_render_their_tokens_and_contexts_and_a_heatmap_click_opens_a_card(tmp_path, browser):
    report, path = _planted_page(tmp_path)
    page = path.read_text()
    assert "<h2>Expert cards</h2>" in page and "<script>alert(1)" not in page
    check, values = check_page(path, expected_figures=report.num_figures, timeout=60, browser=browser, evaluate=[
        _open(LAYER, LAYER, DIGIT_EXPERT), _open(LAYER, LAYER, KEYWORD_EXPERT), CLICK_CELL_JS, FIGURE_LINKS_JS])
    assert check.ok, (check.errors, check.undrawn)
    digit, keyword, click, links = (json.loads(v) for v in values)
    print(f"\nplanted card opened in {digit['ms']:.1f} ms and {keyword['ms']:.1f} ms")
    assert digit["shown"] and digit["card"] == f"{LAYER}:{DIGIT_EXPERT}" and digit["title"] == "Layer 1 · expert 3"
    assert set(digit["tokens"]) == {w.replace(" ", "␣") for w in DIGITS}
    assert set(keyword["tokens"]) == {w.replace(" ", "␣") for w in KEYWORDS}
    assert digit["hits"] and set(digit["hits"]) <= {w.replace(" ", "␣") for w in DIGITS}
    assert set(keyword["hits"]) <= {w.replace(" ", "␣") for w in KEYWORDS} and "␣f" in " ".join(keyword["contexts"])
    assert "math" in digit["contexts"][0] and digit["markup"] == 0 and digit["ms"] < 1000
    assert click == {"card": f"{LAYER}:{KEYWORD_EXPERT}", "shown": True, "title": "Layer 1 · expert 5"}
    assert links["fig-utilization"] == {"linked": True, "hit": [1, 2]}
    assert all(v["linked"] and v["hit"] is not None for v in links.values()), links
    assert {"fig-utilization", "fig-coactivation", "fig-domain_specialization"} <= set(links)


@pytest.mark.parametrize("L,E", [(4, 8), (16, 64)])
@needs_browser
def test_cards_at_real_shapes_draw_and_open_in_under_a_second(tmp_path, L, E, browser):
    """The page of tests/test_report_scale.py's synthetic run, with cards: every figure draws with its titles clear
    (one page load serves both files' checks at 16 x 64), a card opens fast, and expert figures link to the cards."""
    report, _ = build_report(synthetic_results(L, E), decode=lambda t: f"tok{t}")  # cards included
    path = report.write(tmp_path)
    size = path.stat().st_size
    t0 = time.perf_counter()
    check, values = check_page(path, expected_figures=report.num_figures, timeout=60, browser=browser,
                               evaluate=[_open(L - 1, L - 1, E - 1), _open(0, 0, 0), FIGURE_LINKS_JS, FIGURE_GEOMETRY_JS])
    last, first, links, geometry = (json.loads(v) for v in values)
    seconds = time.perf_counter() - t0
    print(f"\n{L} x {E} with cards: {size / MB:.2f} MB, {check.figures_drawn} figures in {seconds:.1f} s; "
          f"card opened in {last['ms']:.1f} ms and {first['ms']:.1f} ms")
    assert check.ok, (check.errors, check.undrawn)
    assert seconds < 50 and not title_problems(geometry), title_problems(geometry)  # every figure of the page
    if (L, E) == (16, 64):
        assert {"fig-coactivation_lift", "fig-correlation_diff_null"} <= set(geometry)  # issue 30's views, at OLMoE's shape
        assert "1" in geometry["fig-coactivation_lift"]["colorbar_ticks"]
    assert last["card"] == f"{L - 1}:{E - 1}" and last["ms"] < 1000 and first["ms"] < 1000 and first["hits"]
    assert len(last["partners"]) == 5 and last["groups"] == ["dataset wikitext2", "dataset gsm8k", "dataset humaneval",
                                                               "domain general", "domain math"]
    assert size < 15 * MB
    print("figures linked to the cards:", sorted(links))
    assert all(v["linked"] and v["hit"] is not None for v in links.values()), links
    assert {"fig-utilization", "fig-coactivation", "fig-domain_specialization", "fig-routing_paths"} <= set(links)


@needs_browser
def test_cards_whose_data_lies_beside_the_page_open(tmp_path, monkeypatch, browser):
    """A wide model's cards load data/expert_cards.js by a script tag: from disk, offline, the card opens."""
    monkeypatch.setattr("viz.expert_cards.EMBED_BYTES", 100)
    monkeypatch.setattr("viz.expert_cards.expert_cards_html.__defaults__", ("expert-cards", 100))
    report, path = _planted_page(tmp_path)
    assert (tmp_path / "data" / "expert_cards.js").is_file() and "class='ec-data'" not in path.read_text()
    check, values = check_page(path, expected_figures=report.num_figures, timeout=60, browser=browser,
                               evaluate=[_open(LAYER, LAYER, DIGIT_EXPERT)])
    assert check.ok and check.external_requests == [], check.errors
    assert set(json.loads(values[0])["tokens"]) == {w.replace(" ", "␣") for w in DIGITS}
