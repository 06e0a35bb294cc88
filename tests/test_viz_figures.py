"""Every figure: titled, axes titled with units, hover text naming layer/expert, bad input rejected."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest

from viz import plotting as P
from viz.gallery import HOSTILE_TOKEN, gallery_figures

FIGURES = {name: fig for _, name, fig, _ in gallery_figures()}

# Figures whose hover text must name a layer and/or an expert.
NAMES_LAYER = {
    "router_similarity", "utilization", "entropy", "coactivation", "routing_paths",
    "domain_specialization", "vocabulary_specialization", "collaboration_patterns",
    "svd_spectra", "router_expert_alignment", "saturation", "drift", "saturation_heatmap",
    "layer_entropy_over_time", "correlation_pairs", "coactivation_layers",
    "domain_specialization_layers", "coactivation_lift", "domain_shares_per_expert", "vocabulary_per_expert",
}
NAMES_EXPERT = {
    "utilization", "coactivation", "routing_paths", "domain_specialization",
    "vocabulary_specialization", "collaboration_patterns", "router_expert_alignment",
    "utilization_over_time", "affinity", "correlation_pairs", "coactivation_layers",
    "domain_specialization_layers", "coactivation_lift", "domain_shares_per_expert", "vocabulary_per_expert",
}


def _hover(fig: go.Figure) -> str:
    parts = []
    for trace in fig.data:
        parts.append(str(getattr(trace, "hovertemplate", "") or ""))
        if isinstance(trace, go.Sankey):
            parts += [str(trace.node.hovertemplate), str(trace.link.hovertemplate)]
    return " ".join(parts)


def test_gallery_covers_every_figure_function():
    assert len(FIGURES) == len(P.__all__) - 1  # all but FigureInputError


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_has_title_axes_and_hover(name):
    fig = FIGURES[name]
    assert isinstance(fig, go.Figure)
    assert fig.layout.title.text, f"{name} has no title"
    if not any(isinstance(t, go.Sankey) for t in fig.data):
        assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text, f"{name}: axis titles"
    hover = _hover(fig)
    assert "<extra></extra>" in hover or "%{" in hover, f"{name}: no hover template"
    if name in NAMES_LAYER:
        assert "layer" in hover, f"{name}: hover does not name the layer"
    if name in NAMES_EXPERT:
        assert "expert" in hover, f"{name}: hover does not name the expert"


def test_units_in_axis_titles():
    assert "nats" in FIGURES["entropy"].layout.yaxis.title.text
    assert "(" in FIGURES["saturation"].layout.yaxis.title.text
    assert "ratio" in FIGURES["svd_spectra"].layout.yaxis.title.text
    assert "nats/token" in FIGURES["ablation_effects"].layout.yaxis.title.text


def test_heatmap_shapes_follow_inputs():
    util = np.random.default_rng(0).random((3, 5))
    fig = P.utilization_heatmap(util, [2, 4, 6])
    assert np.asarray(fig.data[0].z).shape == (3, 5)
    assert list(fig.data[0].y) == [2, 4, 6]
    fig = P.domain_specialization_heatmap(util, ["a", "b", "c"], baseline=0.2)
    assert np.allclose(np.asarray(fig.data[0].z), np.log2(util / 0.2))


def test_sankey_sums_flows_between_neighbouring_layers():
    fig = P.routing_paths_sankey([(0, 1), (0, 1), (2, 1)], [3, 4, 5], [10, 11])
    link = fig.data[0].link
    assert sorted(link.value) == [5.0, 7.0]
    assert set(fig.data[0].node.label) == {"L10 E0", "L10 E2", "L11 E1"}


def test_dataset_text_is_escaped_in_figures():
    blob = json.dumps([f.to_plotly_json() for f in FIGURES.values()], default=str)
    assert HOSTILE_TOKEN not in blob
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in blob


def test_token_whitespace_is_visible():
    fig = P.vocabulary_specialization(np.ones((2, 2)), [" a", "\n"], layer=0)
    assert list(fig.layout.yaxis.ticktext) == ["␣a", "\\n"]


@pytest.mark.parametrize("token, shown", [
    (" the", "␣the"), ("Ġthe", "␣the"), ("ĠĊ", "␣\\n"), ("a\x00b", "a\\x00b"), ("\u200b", "\\u200b"),
    ("naïve café", "naïve␣café"),  # real letters stay; markers are read as bytes only in a token with no real whitespace
])
def test_token_labels_show_byte_level_markers_and_control_characters(token, shown):
    from viz._common import token_label

    assert token_label(token) == shown


def test_parameters_are_a_table_with_rounded_numbers():
    from viz.run_report import parameter_table

    df = parameter_table({"alpha": 1 / 3, "by": "domain", "layers": [0, 1], "max_rows": 20000})
    assert df.to_dict("list") == {"parameter": ["alpha", "by", "layers", "max_rows"],
                                  "value": ["0.3333", "domain", "0, 1", "20000"]}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: P.router_similarity_heatmap(np.ones((2, 3)), [0, 1]), "square"),
        (lambda: P.utilization_heatmap(np.ones((2, 3)), [0, 1, 2]), "layers: has 3 entries"),
        (lambda: P.entropy_per_layer(np.ones((2, 2)), [0, 1]), "1-D"),
        (lambda: P.correlation_matrix(np.ones((2, 2)), ["a"]), "feature_labels"),
        (lambda: P.routing_paths_sankey([(0, 1, 2)], [1], [0, 1]), "paths[0]"),
        (lambda: P.routing_paths_sankey([(0,)], [1], [0]), "at least 2 layers"),
        (lambda: P.collaboration_patterns(np.ones((2, 5)), np.ones((2, 1)), [0, 1], 3, ["d"]),
         "layers × num_experts"),
        (lambda: P.alignment_vs_baseline(np.ones((2, 3)), np.ones((2, 4)), [0, 0], [1, 1], [0, 1]),
         "other: shape"),
        (lambda: P.saturation_over_checkpoints([0, 1, 2], np.ones((2, 2)), [0, 1]), "steps"),
        (lambda: P.svd_spectra({}), "no layers"),
        (lambda: P.utilization_heatmap("not numbers", [0]), "expected numbers"),
        (lambda: P.domain_specialization_heatmap(np.ones((1, 2)), ["d"], baseline=0.0), "positive"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(P.FigureInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_correlation_labels_name_cells_even_when_repeated():
    fig = P.correlation_matrix(np.eye(3), ["L1 E0", "L1 E1", "L3 E0"])
    assert list(fig.data[0].x) == ["L1 E0", "L1 E1", "L3 E0"] and fig.data[0].customdata is None
    fig = P.correlation_matrix(np.eye(2), ["same", "same"])
    assert list(fig.data[0].x) == [0, 1]
    assert np.asarray(fig.data[0].customdata).shape == (2, 2, 2)


def test_unused_expert_does_not_swamp_the_colour_scale():
    share = np.array([[0.5, 0.5, 0.0, 0.0]])
    fig = P.domain_specialization_heatmap(share, ["math"], baseline=0.25)
    assert fig.data[0].zmin == -5.0 and fig.data[0].zmax == 5.0
    assert np.isclose(np.asarray(fig.data[0].z)[0, 0], 1.0)


def test_collaboration_dropdown_shows_one_domain_at_a_time():
    atoms = np.abs(np.random.default_rng(0).normal(size=(5, 2 * 3)))
    share = np.array([[.7, .3], [.1, .9], [.5, .5], [.2, .8], [.9, .1]])
    top = {"<b>web</b>": [{"layer": 0, "expert": 2, "ratio": 2.5}], "code": [{"layer": 1, "expert": 0, "ratio": 1.8}]}
    fig = P.collaboration_by_domain(atoms, share, [0, 1], 3, ["<b>web</b>", "code"], top, patterns_shown=2)
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["&lt;b&gt;web&lt;/b&gt;", "code"]
    assert [list(b.args[0]["visible"]) for b in buttons] == [[True, True, False, False], [False, False, True, True]]
    assert [t.visible for t in fig.data] == [True, True, False, False]  # the first domain is shown on opening
    web, _, code, code_bars = fig.data
    assert list(web.y) == ["pattern 4 (90% of its use)", "pattern 0 (70% of its use)"]  # its most used patterns first
    assert list(code.y)[0] == "pattern 1 (90% of its use)" and list(code_bars.x) == ["L1 E0"]


def _white_background(fig: go.Figure) -> bool:
    """The report's template: white paper and plot, unless a figure overrides either."""
    own, tmpl = fig.layout, fig.layout.template.layout
    return all((getattr(own, key) or getattr(tmpl, key)) in ("white", "#fff", "#ffffff")
               for key in ("paper_bgcolor", "plot_bgcolor"))


def test_every_figure_shares_one_background():
    from core.commands.benchmark_moe import IMPLEMENTATIONS, benchmark_figure

    row = {"experts": 4, "top_k": 1, "capacity_factor": None}
    for name in IMPLEMENTATIONS:
        row |= {f"{name}_fwd_tok_s": 1.0, f"{name}_fwdbwd_tok_s": 1.0, f"{name}_fwdbwd_peak_bytes": 2**20}
    figures = dict(FIGURES, benchmark_moe=benchmark_figure([row]))
    assert go.Figure().layout.template.layout.plot_bgcolor not in ("white", None)  # plotly's default is not white
    off = [name for name, fig in figures.items() if not _white_background(fig)]
    assert not off, f"figures with another background: {off}"


def test_the_template_set_without_validation_gives_the_validated_figure():
    """finish() sets plotly_white as plotly sets its default template; the figure is the one update_layout gives."""
    from viz._common import finish

    def drawn(fast: bool) -> go.Figure:
        fig = go.Figure(go.Heatmap(z=[[0.1, 0.9], [0.4, 0.6]]))
        if fast:
            return finish(fig, "t", "x", "y")
        fig.update_layout(title={"text": "t", "x": 0.02, "xanchor": "left"}, template="plotly_white",
                          margin={"l": 70, "r": 30, "t": 70, "b": 60}, hoverlabel={"namelength": -1})
        return fig.update_xaxes(title_text="x").update_yaxes(title_text="y")

    fast, validated = drawn(True), drawn(False)
    assert json.dumps(fast.to_plotly_json(), sort_keys=True) == json.dumps(validated.to_plotly_json(), sort_keys=True)
    fast.layout.template.layout.paper_bgcolor = "red"  # its own copy: the registered template is not touched
    assert go.Figure(layout={"template": "plotly_white"}).layout.template.layout.paper_bgcolor == "white"


def test_layer_pair_picker_shows_one_pair_at_a_time_and_names_its_experts():
    blocks = [np.full((2, 3), 0.5), np.full((2, 2), -0.25)]
    fig = P.correlation_by_layer_pair(blocks, [(0, 1), (4, 9)], experts_a=[[3, 7], [0, 1]], experts_b=[[1, 2, 5], [2, 6]],
                                      scores=[0.1, 0.3], shown=1)
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["L0 – L1 (0.100)", "L4 – L9 (0.300)"] and fig.layout.updatemenus[0].active == 1
    assert [t.visible for t in fig.data] == [False, True]  # opens on the option asked for
    assert [list(b.args[0]["visible"]) for b in buttons] == [[True, False], [False, True]]
    assert "layer 4 vs layer 9" in fig.layout.title.text and "layer 0 vs layer 1" in buttons[0].args[1]["title.text"]
    assert list(fig.data[0].y) == ["3", "7"] and list(fig.data[0].x) == ["1", "2", "5"]
    assert "layer 4 expert %{y} vs layer 9 expert %{x}" in fig.data[1].hovertemplate
    assert np.asarray(fig.data[0].z).dtype == np.float32  # half the bytes in the page
    with pytest.raises(P.FigureInputError, match=r"experts_a\[0\]"):
        P.correlation_by_layer_pair(blocks, [(0, 1), (4, 9)], experts_a=[[3], [0, 1]])


def test_layer_picker_figures_hold_one_option_per_layer():
    co = np.random.default_rng(0).random((3, 4, 4))
    fig = P.coactivation_by_layer(co, [2, 5, 8])
    # each layer: its heatmap and the hover marks of its blank diagonal
    assert len(fig.data) == 6 and [t.visible for t in fig.data] == [True, True, False, False, False, False]
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["layer 2", "layer 5", "layer 8"]
    fig = P.domain_specialization_by_layer(np.full((2, 2, 4), 0.25), ["a", "b"], [1, 3], baseline=0.25, shown=1)
    assert [t.visible for t in fig.data] == [False, True] and "layer 3" in fig.data[1].hovertemplate
    with pytest.raises(P.FigureInputError, match="square"):
        P.coactivation_by_layer([np.ones((2, 3))], [0])


def test_matrix_views_bound_what_a_page_embeds():
    from viz import matrix_views as V

    assert V.spread(5) == [0, 1, 2, 3, 4]
    assert V.spread(60) == sorted(set(V.spread(60))) and len(V.spread(60)) == 16 and V.spread(60)[::15] == [0, 59]
    m = np.zeros((16, 16))
    m[2, 9] = m[9, 2] = 0.9
    pairs = V.layer_pairs(m)
    assert len(pairs) == 16 and all((i, i + 1) in pairs for i in range(15)) and (2, 9) in pairs
    assert pairs[V.strongest(pairs, m)] == (2, 9)
    deep = V.layer_pairs(np.random.default_rng(0).random((60, 60)))
    assert len(deep) == 16 and sum(b == a + 1 for a, b in deep) >= 12
    assert list(V.top_experts(None, 8)) == list(range(8))
    usage = np.arange(256.0)
    assert list(V.top_experts(usage, 256)) == list(range(128, 256))
    corr = np.arange(36.0).reshape(6, 6) / 36  # 3 layers x 2 experts
    top = V.pair_table(corr, 2, [10, 20, 30], [(0, 2)], n=2)
    assert top.to_dict("list") == {"layer_a": [10, 10], "expert_a": [1, 1], "layer_b": [30, 30], "expert_b": [1, 0],
                                   "corr": [corr[1, 5], corr[1, 4]]}
    per_layer = V.per_layer_table(corr, 2, [10, 20, 30], n=1)
    assert list(per_layer.layer_b) == [30, 30, 20]  # never a layer with itself


def test_pattern_figures_draw_a_subset_of_columns_with_their_own_labels():
    """A wide model's report draws only some (layer, expert) columns: hover must still name the right ones."""
    rng = np.random.default_rng(0)
    layers, E = [3, 5, 9], 4
    cols = np.array([1, 6, 11])  # L3 E1, L5 E2, L9 E3
    atoms, pds = rng.normal(size=(2, 3)), rng.random((2, 2))
    for fig in (P.collaboration_patterns(atoms, pds, layers, E, ["a", "b"], columns=cols),
                P.collaboration_by_domain(atoms, pds, layers, E, ["a", "b"], {"a": [], "b": []}, columns=cols)):
        heat = fig.data[0]
        assert list(heat.x) == [1, 6, 11]
        assert [tuple(c) for c in np.asarray(heat.customdata)[0].tolist()] == [(3, 1), (5, 2), (9, 3)]
    with pytest.raises(P.FigureInputError, match="columns"):
        P.collaboration_patterns(atoms, pds, layers, E, ["a", "b"], columns=[6, 1, 11])
    with pytest.raises(P.FigureInputError, match="columns names 2"):
        P.collaboration_patterns(atoms, pds, layers, E, ["a", "b"], columns=[1, 6])


def test_svd_spectra_leave_out_numerical_zeros_and_write_exponents():
    # centred router rows have rank E - 1: the last singular value is rounding noise (~1e-16)
    fig = P.svd_spectra({0: np.array([4.0, 2.0, 0.4, 3e-16]), 1: np.array([1.0, 0.5, 1e-17])},
                        baseline=np.array([2.0, 1.0, 0.0]))
    ys = [np.asarray(t.y, dtype=float) for t in fig.data]
    assert [len(y) for y in ys] == [3, 2, 2]
    assert min(y.min() for y in ys) >= 1e-6  # the axis spans the real values
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis.exponentformat in ("power", "e", "E")  # not SI prefixes ("100µ") on a ratio


def test_alignment_y_title_fits_beside_a_plot_of_its_height():
    fig = FIGURES["router_expert_alignment"]
    lines = fig.layout.yaxis.title.text.split("<br>")
    # about 7 px a character at 14 px: each line must fit the plot's height, or it runs into the title
    plot_height = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    assert max(len(line) for line in lines) * 7 < plot_height, lines
    assert fig.layout.margin.l >= 50 + 16 * len(lines)  # room for every line left of the ticks


def _colours(trace: go.Heatmap) -> tuple[str, float | None]:
    """Which of the report's two colour scales a heatmap uses, and where its colours start."""
    named = {"sequential": go.Heatmap(colorscale="Viridis").colorscale, "diverging": go.Heatmap(colorscale="RdBu_r").colorscale}
    return next((k for k, v in named.items() if trace.colorscale == v), "other"), trace.zmin


@pytest.mark.parametrize("make", [
    lambda z: P.utilization_heatmap(z, [0, 1]),
    lambda z: P.router_similarity_heatmap(z[:, :2] @ z[:, :2].T, [0, 1], measure="mean |r|"),
    lambda z: P.coactivation_heatmap(z[:, :2] @ z[:, :2].T, 0),
    lambda z: P.coactivation_by_layer([z[:, :2] @ z[:, :2].T], [0]),
], ids=["utilization", "mean_abs_r", "coactivation", "coactivation_by_layer"])
def test_never_negative_values_get_a_sequential_scale_from_zero(make):
    z = np.array([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    heat = make(z).data[0]
    assert _colours(heat) == ("sequential", 0.0), (heat.colorscale, heat.zmin)
    assert heat.zmid is None


def test_signed_similarity_keeps_a_diverging_scale():
    heat = P.router_similarity_heatmap(np.array([[1.0, -0.4], [-0.4, 1.0]]), [0, 1]).data[0]
    assert _colours(heat)[0] == "diverging" and heat.zmid == 0.0


@pytest.mark.parametrize("make", [
    lambda m: P.router_similarity_heatmap(m, [0, 1, 2]),
    lambda m: P.coactivation_heatmap(m, 4),
    lambda m: P.coactivation_by_layer([m, m], [4, 6]),
], ids=["router_similarity", "coactivation", "coactivation_by_layer"])
def test_the_diagonal_is_left_out_of_the_colour_scale_and_hover_says_so(make):
    m = np.array([[1.0, 0.2, 0.1], [0.2, 1.0, 0.3], [0.1, 0.3, 1.0]])
    fig = make(m)
    heat, marks = fig.data[0], fig.data[1]
    z = np.asarray(heat.z, dtype=float)
    assert np.isnan(np.diag(z)).all() and np.allclose(z[~np.eye(3, dtype=bool)], m[~np.eye(3, dtype=bool)])
    assert heat.zmax is None or heat.zmax < 1.0  # the colours span the off-diagonal values
    assert np.nanmax(z) == pytest.approx(0.3)
    assert list(marks.x) == list(marks.y) and len(marks.x) == 3  # one hover point per diagonal cell
    assert "left out of the colour scale" in marks.hovertemplate and np.allclose(marks.customdata, 1.0)


def test_saturation_is_drawn_on_a_log_percent_axis_with_intervals_and_chance():
    sat = np.array([[0.3, 0.4], [0.6, 0.7], [0.9, 0.8], [1.0, 1.0]])
    null = np.full_like(sat, 0.2)
    fig = P.saturation_over_checkpoints([0, 10, 100, 1000], sat, [3, 5], low=sat - 0.05, high=sat + 0.05, null=null)
    assert fig.layout.xaxis.type == "log" and "step 0" in fig.layout.xaxis.title.text
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["L3", "L5"]
    assert np.allclose(lines[0].x, [1.0, 10.0, 100.0])  # % of training; step 0 has no place on a log axis
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 2 and np.allclose(bands[1].y, [0.75, 0.85, 1.05, 0.95, 0.75, 0.65])
    chance = [t for t in fig.data if t.line.dash == "dash"]
    assert len(chance) == 2 and np.allclose(chance[0].y, 0.2)
    assert {t.legendgroup for t in fig.data} == {"L3", "L5"}  # a layer's band and chance hide with its line
    with pytest.raises(P.FigureInputError, match="all three"):
        P.saturation_over_checkpoints([1, 2], sat[:2], [3, 5], low=sat[:2])


def test_top_cells_equal_a_full_stable_sort_with_and_without_ties():
    """The strongest cells are searched only where the n-th largest row maximum allows; the answer is a full sort's."""
    from viz.matrix_views import _top_cells

    rng = np.random.default_rng(0)
    for shape, n in [((64, 1024), 3), ((8, 8), 10), ((3, 5), 20), ((5, 5), 5), ((40, 300), 7)]:
        for ties in (False, True):
            v = rng.normal(size=shape).astype(np.float32)
            v = np.round(v) if ties else v
            v.flat[0] = np.nan
            mag = np.nan_to_num(np.abs(v), nan=-1.0).ravel()
            full = np.unravel_index(np.argsort(-mag, kind="stable")[:min(n, mag.size)], shape)
            assert all(np.array_equal(a, b) for a, b in zip(_top_cells(v, n), full)), (shape, n, ties)


def test_a_figure_depends_on_the_values_not_on_how_the_array_is_laid_out():
    """A result just computed may hold strided views; read back, the same numbers are contiguous. numpy sums the two
    in different orders, so a layer mean drawn from them differed in its last bit and the image was drawn again."""
    rng = np.random.default_rng(3)
    base = rng.random((40, 7)) * 1e-3 + rng.random((40, 7))
    strided = base.T  # [7, 40], not C-contiguous
    assert not strided.flags.c_contiguous
    args = ([0.1] * 7, None, list(range(7)))
    a = P.alignment_vs_baseline(strided, strided * 0.5, *args)
    b = P.alignment_vs_baseline(np.ascontiguousarray(strided), np.ascontiguousarray(strided * 0.5), *args)
    assert a.to_json() == b.to_json()
