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
def test_images_are_byte_for_byte_those_of_plotlys_write_images(tmp_path):
    """PNGs drawn one after another in one page (kaleido's reload between figures skipped): nothing carries over."""
    import plotly.io as pio

    figs = {"heatmap": _fig(), "bars": go.Figure(go.Bar(x=["a", "b"], y=[3, 1]), layout={"template": "plotly_white"}),
            "sankey": go.Figure(go.Sankey(node={"label": ["x", "y", "z"]}, link={"source": [0, 0], "target": [1, 2],
                                                                                   "value": [2, 1]}))}
    written, reason = export_many(figs, tmp_path / "one_page", fmt="png")
    assert reason is None
    reference = [tmp_path / "plotly" / f"{name}.png" for name in figs]
    reference[0].parent.mkdir()
    pio.write_images(list(figs.values()), reference, format="png", scale=2.0)
    for name, ref in zip(figs, reference):
        assert written[name].read_bytes() == ref.read_bytes(), name


def test_reports_why_when_no_browser(tmp_path, monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setattr(viz.browser_check, "find_chromium", lambda: None)
    assert "Chromium" in static_export_unavailable()
    assert export_static(_fig(), tmp_path / "x.png") is None
    written, reason = export_many({"x": _fig()}, tmp_path)
    assert written == {} and "apt-get install -y chromium" in reason
    assert not (tmp_path / "x.png").exists()


def test_export_static_takes_the_format_from_the_suffix(tmp_path, monkeypatch):
    import viz.static_export as static_export

    seen = []

    def fake_render(figs, paths, format, scale):  # noqa: A002 - plotly's keyword
        seen.append((format, scale))
        for p in paths:
            p.write_bytes(b"<svg/>")

    monkeypatch.setattr(static_export, "_prepare", lambda: None)
    monkeypatch.setattr(static_export, "_render", fake_render)
    path = export_static(_fig(), tmp_path / "c.svg", scale=3.0)
    assert path == tmp_path / "c.svg" and path.read_bytes() == b"<svg/>" and seen == [("svg", 3.0)]


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not one of png, svg, pdf"):
        export_many({"x": _fig()}, tmp_path, fmt="gif")


def test_a_failed_render_removes_only_its_own_temporary_files(tmp_path, monkeypatch):
    """The temporary images had fixed names (``.x.png.tmp``): a user's file of that name was overwritten, then deleted."""
    import viz.static_export as static_export
    from tests.canary import CanaryTree

    users = {"figs/.x.png.tmp": b"a user's file named like the old temporary image\n", "figs/x.png": b"a user's old image\n"}
    canary = CanaryTree(tmp_path, owned=["figs"], planted=users)
    seen = []

    def render_then_fail(figs, paths, format, scale):  # noqa: A002 - plotly's keyword
        for p in paths:
            p.write_bytes(b"half an image")
            seen.append(p)
        raise RuntimeError("the browser went away")

    monkeypatch.setattr(static_export, "_prepare", lambda: None)
    monkeypatch.setattr(static_export, "_render", render_then_fail)
    written, reason = export_many({"x": _fig()}, tmp_path / "figs")
    assert written == {} and reason == "static export failed: RuntimeError: the browser went away"
    assert len(seen) == 1 and not seen[0].exists() and seen[0].name != ".x.png.tmp"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [".x.png.tmp", "x.png"]
    canary.check()  # the planted files, though inside figs/, are unchanged


def test_a_rerun_redraws_only_the_images_whose_figure_or_file_changed(tmp_path, monkeypatch):
    """Issue 31: unchanged figures keep their images (PNG export was 12-18 s of a cached rerun)."""
    import viz.static_export as static_export

    drawn = []

    def fake_render(figs, paths, format, scale):  # noqa: A002 - plotly's keyword
        for fig, p in zip(figs, paths):
            p.write_bytes(f"image of {fig.layout.title.text}".encode())
            drawn.append(fig.layout.title.text)

    monkeypatch.setattr(static_export, "_prepare", lambda: None)
    monkeypatch.setattr(static_export, "_render", fake_render)

    def figs(b_title="b"):
        return {"a": go.Figure(layout={"title": {"text": "a"}}), "b": go.Figure(layout={"title": {"text": b_title}})}

    assert export_many(figs(), tmp_path)[1] is None and drawn == ["a", "b"]
    drawn.clear()
    written, reason = export_many(figs(), tmp_path)
    assert reason is None and drawn == [] and set(written) == {"a", "b"}  # nothing changed: nothing drawn
    export_many(figs(b_title="b2"), tmp_path)
    assert drawn == ["b2"]  # only the changed figure
    drawn.clear()
    (tmp_path / "a.png").write_bytes(b"edited by hand")
    export_many(figs(b_title="b2"), tmp_path)
    assert drawn == ["a"] and (tmp_path / "a.png").read_bytes() == b"image of a"  # a file not as written is redrawn
    drawn.clear()
    export_many(figs(b_title="b2"), tmp_path, fmt="svg")
    assert drawn == ["a", "b2"]  # another format is another image
    drawn.clear()
    (tmp_path / static_export.MANIFEST).write_text("not json")
    export_many(figs(b_title="b2"), tmp_path)
    assert drawn == ["a", "b2"]  # an unreadable record: everything is drawn again
