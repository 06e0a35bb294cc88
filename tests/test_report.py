"""The HTML report: self-contained, escaped, numbers downloadable, written atomically."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from viz.gallery import HOSTILE_TOKEN, gallery_report
from viz.first_screen import LEAD_JS
from viz.report import Report


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    report = gallery_report()
    run_dir = tmp_path_factory.mktemp("run")
    path = report.write(run_dir)
    return report, path, path.read_text(encoding="utf-8")


def test_page_is_self_contained(written):
    report, path, page = written
    assert path.name == "report.html"
    assert not re.search(r"<script[^>]+src=", page), "the page loads a script from elsewhere"
    assert not re.search(r"<link[^>]+href=['\"]?https?:", page)
    # one call per figure, and one in the first screen's script (its small figures are redrawn from these)
    assert page.count("Plotly.newPlot(") - LEAD_JS.count("Plotly.newPlot(") == report.num_figures == 29
    # plotly.js is embedded exactly once (its version banner appears once)
    assert len(re.findall(r"plotly\.js v\d", page)) == 1


def test_summary_and_warnings_at_the_top(written):
    _, _, page = written
    summary = page.index("<h2>Summary</h2>")
    assert summary < page.index("Warnings") < page.index("Plotly.newPlot(")
    assert "<th>model</th><td>synthetic</td>" in page
    assert "<td>12,345</td>" in page
    assert "<td>math, code, web</td>" in page


def test_what_we_learned_comes_first_and_links_to_the_figure_behind_each_finding(tmp_path):
    rep = Report("t", summary={"model": "m"})
    rep.add_figure("Section", go.Figure(go.Bar(y=[1, 2])), "bars")
    rep.lead = [("finding <b>one</b>: 0.5 (95% CI 0.4–0.6) against 0.1", "bars"), ("finding two", "no_such_figure")]
    page = rep.write(tmp_path).read_text(encoding="utf-8")
    assert page.index("<h2>What we learned</h2>") < page.index("<h2>Summary</h2>") < page.index("Plotly.newPlot(")
    assert "finding &lt;b&gt;one&lt;/b&gt;" in page and "<b>one</b>" not in page
    assert page.count("→ figure") == 1 and "href='#item-bars'" in page and "id='item-bars'" in page


def test_text_from_datasets_is_escaped(written):
    _, _, page = written
    assert HOSTILE_TOKEN not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_numbers_behind_figures_are_downloadable(written):
    report, path, page = written
    data = path.parent / "data"
    links = re.findall(r"href='(data/[^']+)' download", page)
    assert len(links) == report.num_figures + 2  # + the token table and the coloured text
    for link in links:
        assert (path.parent / link).is_file(), link
    util = pd.read_csv(data / "utilization.csv", index_col=0)
    assert util.shape == (4, 8) and list(util.index) == ["L1", "L3", "L5", "L7"]
    entropy = json.loads((data / "entropy.json").read_text())
    assert entropy["layers"] == [1, 3, 5, 7] and len(entropy["entropy"]) == 4
    fig_json = json.loads((data / "routing_paths.figure.json").read_text())
    assert fig_json["data"][0]["type"] == "sankey"
    tokens = pd.read_csv(data / "example_tokens.csv")
    assert HOSTILE_TOKEN in tokens["token"].tolist()  # the raw data keeps the real token
    assert not list(path.parent.glob("**/*.tmp")), "temporary files left behind"


def test_plotlyjs_beside_the_page(tmp_path):
    report = Report("r", plotlyjs="file")
    report.add_figure("s", go.Figure(go.Scatter(x=[1], y=[2])), "fig", data={"x": [np.float32(1)]})
    page = report.write(tmp_path).read_text()
    assert "src='plotly.min.js'" in page
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    assert json.loads((tmp_path / "data" / "fig.json").read_text()) == {"x": [1.0]}


def test_nan_becomes_null_in_json(tmp_path):
    report = Report("r")
    report.add_figure("s", go.Figure(), "f", data={"v": [1.0, float("nan")]})
    report.write(tmp_path)
    assert json.loads((tmp_path / "data" / "f.json").read_text()) == {"v": [1.0, None]}


@pytest.mark.parametrize("name", ["../evil", "a b", "", "x/y"])
def test_bad_item_names_are_rejected(name):
    with pytest.raises(ValueError, match="use letters, digits"):
        Report("r").add_figure("s", go.Figure(), name)


def test_duplicate_names_and_wrong_types_are_rejected():
    report = Report("r")
    report.add_figure("s", go.Figure(), "a")
    with pytest.raises(ValueError, match="used twice"):
        report.add_figure("t", go.Figure(), "a")
    with pytest.raises(TypeError, match="plotly Figure"):
        report.add_figure("s", {"data": []}, "b")
    with pytest.raises(TypeError, match="DataFrame"):
        report.add_table("s", [[1]], "c")
    with pytest.raises(ValueError, match="plotlyjs"):
        Report("r", plotlyjs="cdn")


def test_sections_keep_order_and_text(tmp_path):
    report = Report("r")
    report.add_section("B", "second\n\nparagraph <i>")
    report.add_figure("A", go.Figure(), "f1")
    report.add_figure("B", go.Figure(), "f2")
    page = report.write(tmp_path).read_text()
    assert page.index("<h2>B</h2>") < page.index("<h2>A</h2>")
    assert "<p>second</p><p>paragraph &lt;i&gt;</p>" in page


def test_a_summarized_figure_links_its_full_matrices(tmp_path):
    rep = Report("r")
    rep.add_figure("s", go.Figure(go.Bar(y=[1])), "summary", data={"v": [1]}, arrays=["correlation_topk/corr"])
    rep.add_figure("s", go.Figure(go.Bar(y=[1])), "plain")
    (tmp_path / "arrays.safetensors").write_bytes(b"written by the main run before the report")
    page = rep.write(tmp_path).read_text(encoding="utf-8")
    assert page.count("href='arrays.safetensors'") == 1  # beside report.html in the run folder
    assert "Full expert-level matrix: <a href='arrays.safetensors'>arrays.safetensors</a>, key <code>correlation_topk/corr</code>" in page


def test_a_report_without_the_array_file_has_no_dead_link(tmp_path):
    rep = Report("r")
    rep.add_figure("s", go.Figure(go.Bar(y=[1])), "summary", data={"v": [1]}, arrays=["correlation_topk/corr"])
    page = rep.write(tmp_path).read_text(encoding="utf-8")
    assert "href='arrays.safetensors'" not in page
    assert "arrays.safetensors (not written beside this report" in page and "<code>correlation_topk/corr</code>" in page
