"""The first screen: which findings lead as cards with a small figure, and how the page lays them out."""

import numpy as np

from core.analysis.resampling import Estimate
from core.pipeline.findings import first_screen
from core.pipeline.spec import Finding
from viz.first_screen import render_lead


def _est(p: float | list[float], why: str = "") -> Estimate:
    p = np.asarray(p, float)
    z = np.zeros(p.shape)
    return Estimate(z, z, z, z, z, z, "null", 8, p_value=p, p_adjusted=p, why_none=why)


def test_strong_findings_with_figures_lead_in_lead_order():
    found = [Finding("a", "weak", ("fa",), _est(0.5)), Finding("b", "strong", ("fb",), _est([0.9, 0.001])),
             Finding("c", "strong, no figure", (), _est(0.001)), Finding("d", "no verdict", ("fd",), _est(0.001, "too few")),
             Finding("e", "plain", ("fe",)), Finding("f", "strong too", ("ff",), _est(0.01))]
    ordered, shown = first_screen(found, n=4)
    assert shown == 2 and [f.key for f in ordered] == ["b", "f", "a", "c", "d", "e"]
    assert first_screen(found, n=1)[1] == 1 and first_screen([], n=4) == ([], 0)


def test_cards_then_the_list_all_escaped():
    html = render_lead([("<b>x</b> first", "fig1"), ("second", "gone"), ("third", None)], 2, {"fig1"})
    assert html.count("class='lead-card'") == 1  # a finding whose figure is not on the page is listed instead
    assert "data-fig='fig-fig1'" in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x" not in html
    assert html.index("lead-grid") < html.index("More findings") < html.index("second") < html.index("third")
    plain = render_lead([("only", "fig1")], 0, {"fig1"})
    assert "lead-card" not in plain and "<h3>Findings</h3>" in plain
