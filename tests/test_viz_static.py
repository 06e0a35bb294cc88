"""Static images for papers: written where kaleido + Chromium exist, a clear reason where not."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

import viz.browser_check
from viz.static_export import export_many, export_static, static_export_unavailable


def _fig() -> go.Figure:
    return go.Figure(go.Heatmap(z=[[0.1, 0.9], [0.4, 0.6]]), layout={"title": {"text": "t"}})


@pytest.mark.skipif(static_export_unavailable() is not None,
                    reason=str(static_export_unavailable()))
def test_writes_png_and_svg_in_one_session(tmp_path):
    written, reason = export_many({"a": _fig(), "b": _fig()}, tmp_path, fmt="svg")
    assert reason is None
    assert written["a"].read_text().lstrip().startswith("<svg")
    png = export_static(_fig(), tmp_path / "c.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reports_why_when_no_browser(tmp_path, monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setattr(viz.browser_check, "find_chromium", lambda: None)
    assert "Chromium" in static_export_unavailable()
    assert export_static(_fig(), tmp_path / "x.png") is None
    written, reason = export_many({"x": _fig()}, tmp_path)
    assert written == {} and "apt-get install -y chromium" in reason
    assert not (tmp_path / "x.png").exists()


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not one of png, svg, pdf"):
        export_many({"x": _fig()}, tmp_path, fmt="gif")
