"""The report in a real headless Chromium: loads offline, no console errors, every figure draws.

Needs Debian's ``chromium`` (``apt-get install -y chromium``). Skipped without it locally;
under CI (``CI`` set) a missing browser is a failure, not a skip.
"""

from __future__ import annotations

import json
import os

import numpy as np

import pytest

from tests.geometry import inside, title_problems
from viz.browser_check import FIGURE_GEOMETRY_JS, check_page, find_chromium
from viz.gallery import HOSTILE_TOKEN, gallery_report

if find_chromium() is None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise RuntimeError("CI needs chromium for the browser tests: apt-get install -y chromium")
    pytest.skip("chromium not installed (apt-get install -y chromium)", allow_module_level=True)

HOVER_TOKEN_JS = """(() => {
  const gd = document.getElementById('fig-vocabulary_specialization');
  const before = document.scripts.length;
  Plotly.Fx.hover(gd, {xval: 0, yval: 3});
  const t = gd.querySelector('.hovertext');
  return JSON.stringify({text: t ? t.textContent : null, before: before,
                         after: document.scripts.length});
})()"""

def hover_text_js(figure: str, x: int, y: int) -> str:
    """The hover text a figure shows at cell (x, y), or null."""
    return f"""(() => {{
  const gd = document.getElementById('fig-{figure}');
  Plotly.Fx.hover(gd, {{xval: {x}, yval: {y}}});
  const t = gd.querySelector('.hovertext');
  return t ? t.textContent : null;
}})()"""


HOVER_UTIL_JS = hover_text_js("utilization", 2, 1)


# What a layer-pair menu choice does (the button's own update), then where the axes and hover point.
PICK_PAIR_JS = """(() => {
  const gd = document.getElementById('fig-correlation_pairs');
  const before = gd._fullLayout.xaxis._categories.slice();
  const button = gd.layout.updatemenus[0].buttons[1];
  return Plotly.update(gd, button.args[0], button.args[1]).then(() => {
    Plotly.Fx.hover(gd, {xval: 2, yval: 0});
    const t = gd.querySelector('.hovertext');
    return JSON.stringify({before: before, after: gd._fullLayout.xaxis._categories,
                           title: gd._fullLayout.title.text, hover: t ? t.textContent : null});
  });
})()"""


# Hovering a blanked diagonal cell of the co-activation menu figure (layer 3 is shown on opening).
HOVER_DIAGONAL_JS = hover_text_js("coactivation_layers", 2, 2)


# Text coloured by routing: the colours at the first layer, after picking the second, the hover of the hostile token,
# and the colours when one expert's weight is picked instead.
ROUTED_TEXT_JS = """(() => {
  const root = document.getElementById('routed-text');
  const spans = Array.from(root.querySelectorAll('.rt-tok'));
  const colours = () => spans.map(s => getComputedStyle(s).backgroundColor);
  const scripts = document.scripts.length, first = colours(), tops = spans.map(s => s.dataset.top);
  const layer = root.querySelector('.rt-layer');
  layer.value = '1'; layer.dispatchEvent(new Event('change'));
  const second = colours();
  const s = spans.find(x => x.textContent.includes('<script>'));
  s.dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: 20, clientY: 20}));
  const tip = root.querySelector('.rt-tip');
  const mode = root.querySelector('.rt-mode'), exp = root.querySelector('.rt-expert');
  mode.value = 'weight'; mode.dispatchEvent(new Event('change'));
  exp.value = '3'; exp.dispatchEvent(new Event('change'));
  return JSON.stringify({n: spans.length, texts: spans.map(x => x.textContent), first: first, tops: tops, second: second,
    tip: tip.textContent, tipShown: getComputedStyle(tip).display, children: spans.filter(x => x.children.length).length,
    scripts: scripts, scriptsAfter: document.scripts.length, weight: colours(), height: root.getBoundingClientRect().height});
})()"""


# The first screen: each card's small figure drawn from its full figure, inside its card, and the list below.
LEAD_THUMBS_JS = """(() => {
  const box = el => { const r = el.getBoundingClientRect(); return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; };
  const cards = Array.from(document.querySelectorAll('#learned .lead-card'));
  return JSON.stringify({cards: cards.map(c => ({card: box(c), svg: c.querySelector('.lead-thumb svg.main-svg') ?
      box(c.querySelector('.lead-thumb svg.main-svg')) : null, text: c.querySelector('p').textContent,
      traces: (c.querySelector('.lead-thumb').data || []).length})),
    listed: Array.from(document.querySelectorAll('#learned li')).map(li => li.textContent)});
})()"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, browser):
    report = gallery_report()
    path = report.write(tmp_path_factory.mktemp("browser"))
    check, values = check_page(path, expected_figures=report.num_figures, browser=browser,
                               evaluate=[HOVER_TOKEN_JS, HOVER_UTIL_JS, PICK_PAIR_JS, FIGURE_GEOMETRY_JS,
                                         HOVER_DIAGONAL_JS, ROUTED_TEXT_JS, LEAD_THUMBS_JS])
    return report, check, values


def test_page_loads_without_errors_or_network(loaded):
    _, check, _ = loaded
    assert check.errors == []
    assert check.external_requests == []
    assert check.dialogs == []


def test_every_figure_draws(loaded):
    report, check, _ = loaded
    assert check.figures_total == report.num_figures
    assert check.figures_drawn == report.num_figures, f"not drawn: {check.undrawn}"
    assert check.ok


def test_hover_names_layer_and_expert_and_shows_tokens_as_text(loaded):
    _, _, (token_hover, util_hover, *_) = loaded
    token = json.loads(token_hover)
    assert HOSTILE_TOKEN in token["text"]  # shown literally, as text
    assert token["after"] == token["before"]  # and no script element was created
    assert "layer 3" in util_hover and "expert 2" in util_hover


def test_the_layer_pair_menu_swaps_the_matrix_its_axes_and_hover(loaded):
    _, _, (_, _, picked, *_) = loaded
    picked = json.loads(picked)
    assert picked["before"] == ["0", "4", "6"]  # only the shown pair's experts label the axis
    assert picked["after"] == ["1", "2", "7"] and "layer 3 vs layer 5" in picked["title"]
    assert "layer 3 expert 0 vs layer 5 expert 7" in picked["hover"]


def test_checker_catches_broken_pages(tmp_path, browser):
    """In the shared browser (one Chromium, a context per page): what one page did is not charged to the next."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<html><head><script src='http://example.invalid/x.js'></script></head><body>"
        "<div class='plotly-graph-div' id='never'></div>"
        "<script>localStorage.setItem('seen', '1'); console.error('boom'); alert('hi'); undefinedFunction();</script>"
        "</body></html>"
    )
    check, _ = check_page(page, expected_figures=0, timeout=10, browser=browser)
    assert not check.ok
    assert any("boom" in e for e in check.errors)
    assert any("undefinedFunction" in e for e in check.errors)
    assert check.external_requests == ["http://example.invalid/x.js"]
    assert check.dialogs == ["hi"]
    clean = tmp_path / "clean.html"
    clean.write_text("<html><body><p>fine</p></body></html>")
    after, (stored,) = check_page(clean, expected_figures=0, timeout=10, browser=browser,
                                  evaluate=["localStorage.getItem('seen')"])
    assert after.ok and after.errors == [] and after.dialogs == [] and stored is None
    assert check.undrawn == ["never"]


def _geometry(loaded) -> dict:
    return json.loads(loaded[2][3])


def test_titles_are_whole_and_axis_titles_clear_the_figure_title(loaded):
    """A y-axis title longer than the plot is tall runs off the figure and over its title (the alignment figure did)."""
    bad = title_problems(_geometry(loaded))
    assert not bad, bad


@pytest.mark.parametrize("fig_id", ["utilization", "router_similarity", "coactivation", "coactivation_layers",
                                    "vocabulary_specialization"])
def test_colour_bars_of_never_negative_values_have_no_negative_ticks(loaded, fig_id):
    ticks = _geometry(loaded)[f"fig-{fig_id}"]["colorbar_ticks"]
    assert ticks and ticks[0] == "0", ticks  # the scale starts at 0
    assert not [t for t in ticks if t.startswith(("−", "-"))], ticks


def test_log_axes_write_powers_not_si_prefixes(loaded):
    ticks = _geometry(loaded)["fig-svd_spectra"]["yticks"]
    assert not [t for t in ticks if t and t[-1] in "µμmnpfaz"], ticks  # "100µ", "10f": SI prefixes on a ratio
    powers = [t for t in ticks if t.startswith("10")]
    assert powers and min(int(t.replace("\u200b", "").replace("−", "-")[2:]) for t in powers) >= -6, ticks


def test_hovering_a_blank_diagonal_cell_says_why(loaded):
    text = loaded[2][4]
    assert text and "expert 2 with itself" in text and "left out of the colour scale" in text, text


def test_text_coloured_by_routing_draws_switches_layers_and_hovers(loaded):
    """The gallery's two documents: token t's top-1 expert at layer i is (t + 3 i) mod 8, so every colour changes."""
    from viz.gallery import GALLERY_VOCAB, routed_text_sample
    from viz.routed_text import PALETTE

    got = json.loads(loaded[2][5])
    sample = routed_text_sample()
    assert got["n"] == len(sample.token_ids) and got["height"] > 50
    assert HOSTILE_TOKEN in got["texts"] and "\\n" in got["texts"] and got["children"] == 0  # text, not markup
    assert got["tops"] == [str(e) for e in sample.experts[:, 0, 0]]
    rgb = [f"rgb({int(c[1:3], 16)}, {int(c[3:5], 16)}, {int(c[5:7], 16)})" for c in PALETTE]
    assert got["first"] == [rgb[e] for e in sample.experts[:, 0, 0]]
    assert got["second"] == [rgb[e] for e in sample.experts[:, 1, 0]] and got["second"] != got["first"]
    t = GALLERY_VOCAB.index(HOSTILE_TOKEN)
    row = int(np.nonzero(sample.token_ids == t)[0][0])
    e1, e2 = sample.experts[row, 1]
    assert got["tipShown"] == "block" and HOSTILE_TOKEN in got["tip"] and "layer 3" in got["tip"]
    assert f"expert {e1}  0.625" in got["tip"] and f"expert {e2}  0.375" in got["tip"], got["tip"]
    assert got["scriptsAfter"] == got["scripts"]
    has3 = [3 in sample.experts[i, 1] for i in range(len(sample.token_ids))]
    white = "rgb(255, 255, 255)"
    assert [c != white for c in got["weight"]] == has3 and any(has3)  # only the tokens expert 3 took are shaded


def test_first_screen_draws_the_strongest_findings_small_beside_their_text(loaded):
    """Issue 30: the first screen was ten bullets and no figure. Now: cards with a small figure each, then the list."""
    got = json.loads(loaded[2][6])
    assert [c["text"].split(" (")[0].split("→")[0] for c in got["cards"]] == [
        "A finding drawn small beside its text", "A second one, with the co-activation lift behind it"]
    for c in got["cards"]:
        assert c["svg"] is not None and c["traces"] > 0, c  # drawn, from the full figure's traces
        assert inside(c["svg"], c["card"]) and c["svg"]["bottom"] - c["svg"]["top"] >= 150, c
    assert HOSTILE_TOKEN in got["cards"][0]["text"]  # as text
    assert [t.split("→")[0] for t in got["listed"]] == ["A finding listed below the cards", "A finding with no figure"]


def test_lift_colours_are_a_log_scale_about_one(loaded):
    ticks = _geometry(loaded)["fig-coactivation_lift"]["colorbar_ticks"]
    assert "1" in ticks and "8" in ticks and "0.125" in ticks, ticks  # lift units, 1 (independence) in the middle
    assert not [t for t in ticks if t.startswith(("−", "-"))], ticks
