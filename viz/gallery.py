"""Every figure in the toolkit drawn from small synthetic data, as one demo report.

Lets a researcher see what each figure looks like before running a model, and gives the
report and browser tests one realistic page with every figure kind (including a token that
tries to inject markup). ``python -m viz.gallery OUT_DIR`` writes the page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from viz import plotting as P
from viz.figures_lift import lift_by_layer
from viz.figures_paper import domain_shares_per_expert, vocabulary_per_expert
from viz.report import Report
from viz.routed_text import routed_text_html, routed_text_payload

HOSTILE_TOKEN = "<script>alert(1)</script>"


def gallery_figures(seed: int = 0) -> list[tuple[str, str, go.Figure, object]]:
    """(section, name, figure, numbers) for every figure function, on synthetic data."""
    rng = np.random.default_rng(seed)
    data = _synthetic_data(rng)
    return (
        _routing_figures(data) + _specialization_figures(data) + _weights_figures(data, rng) + _null_figures()
        + _checkpoint_figures(data) + _training_figures(data, rng)
        + _picker_figures(data["corr"], data["coact"], data["share"], data["domains"], data["num_experts"])
    )


def _synthetic_data(rng: np.random.Generator) -> dict:
    """The synthetic arrays the figures share, drawn in one fixed order so a seed always gives the same page."""
    layers, num_experts = [1, 3, 5, 7], 8
    nl = len(layers)
    domains = ["math", "code", "web"]
    util = rng.dirichlet(np.ones(num_experts) * 3, nl)
    util[0] = np.r_[0.5, np.full(num_experts - 1, 0.5 / (num_experts - 1))]  # a collapsing layer: one expert takes half
    sim = np.abs(np.corrcoef(rng.normal(size=(nl, 16))))  # a mean |r| between layers, as the report draws: never negative
    entropy = rng.uniform(1.5, 2.0, nl)
    corr = np.corrcoef(rng.normal(size=(6, 40)))
    coact = rng.random((num_experts, num_experts)) * 0.2
    share = rng.dirichlet(np.ones(num_experts), len(domains))
    tokens = [" the", "\n", "def", HOSTILE_TOKEN, "=", " x"]
    vocab = rng.dirichlet(np.ones(num_experts), len(tokens))
    atoms = rng.normal(size=(5, nl * num_experts))
    pds = rng.random((5, len(domains)))
    delta = rng.normal(0.05, 0.03, (4, len(domains)))
    # centred router rows have rank E - 1: their last singular value is a numerical zero
    spectra = {layer: np.append(np.sort(rng.random(15) ** 2)[::-1], 1e-16) for layer in layers}
    own, other = rng.uniform(0.3, 0.8, (nl, num_experts)), rng.uniform(0.1, 0.4, (nl, num_experts))
    steps = [0, 100, 1000, 4000]  # log-spaced, as checkpoints are chosen
    sat = np.clip(np.linspace(0.3, 1.0, 4)[:, None] + rng.normal(0, 0.03, (4, nl)), 0, 1)
    drift = rng.uniform(0.0, 0.1, (4, nl))
    lf = pd.Index([f"L{layer}" for layer in layers], name="layer")
    return {
        "layers": layers, "num_experts": num_experts, "nl": nl, "domains": domains, "util": util, "sim": sim,
        "entropy": entropy, "corr": corr, "coact": coact, "share": share, "tokens": tokens, "vocab": vocab,
        "atoms": atoms, "pds": pds, "delta": delta, "spectra": spectra, "own": own, "other": other, "steps": steps,
        "sat": sat, "drift": drift, "lf": lf,
    }


def _routing_figures(data: dict) -> list[tuple[str, str, go.Figure, object]]:
    """The Routing section: similarity, load, entropy, correlation, co-activation and paths."""
    layers, lf, sim, util, coact = data["layers"], data["lf"], data["sim"], data["util"], data["coact"]
    return [
        ("Routing", "router_similarity", P.router_similarity_heatmap(sim, layers, measure="mean |r|"),
         pd.DataFrame(sim, index=lf, columns=lf)),
        ("Routing", "utilization", P.utilization_heatmap(util, layers),
         pd.DataFrame(util, index=lf)),
        ("Routing", "entropy", P.entropy_per_layer(data["entropy"], layers, max_entropy=np.log(data["num_experts"])),
         {"layers": layers, "entropy": data["entropy"]}),
        ("Routing", "cross_layer_correlation",
         P.correlation_matrix(data["corr"], [f"L{i} E{i % 3}" for i in range(6)]), None),
        ("Routing", "coactivation", P.coactivation_heatmap(coact, 3), pd.DataFrame(coact)),
        ("Routing", "routing_paths",
         P.routing_paths_sankey([(1, 2, 3, 0), (1, 2, 4, 0), (0, 2, 3, 5)], [50, 20, 10], layers),
         None),
    ]


def _specialization_figures(data: dict) -> list[tuple[str, str, go.Figure, object]]:
    """The Specialization section: domains, vocabulary, collaboration, pruning and ablation."""
    layers, nl, num_experts, domains = data["layers"], data["nl"], data["num_experts"], data["domains"]
    share, vocab, tokens, atoms, pds = data["share"], data["vocab"], data["tokens"], data["atoms"], data["pds"]
    return [
        ("Specialization", "domain_specialization",
         P.domain_specialization_heatmap(share, domains, baseline=1 / num_experts, layer=3),
         pd.DataFrame(share, index=domains)),
        ("Specialization", "vocabulary_specialization",
         P.vocabulary_specialization(vocab, tokens, layer=3),
         pd.DataFrame(vocab, index=pd.Index(tokens, name="token"))),
        ("Specialization", "collaboration_patterns",
         P.collaboration_patterns(atoms, pds, layers, num_experts, domains), None),
        ("Specialization", "collaboration_by_domain",
         P.collaboration_by_domain(atoms, pds, layers, num_experts, domains,
                                   {d: [{"layer": layers[i % nl], "expert": i, "ratio": 3.0 - i / 2} for i in range(4)]
                                    for d in domains}), None),
        ("Specialization", "pruning_curves",
         P.pruning_curves([0.125, 0.25, 0.5], ["usage", "causal", "random"],
                          np.array([[.01, .03, .09], [.01, .02, .07], [.05, .12, .30]]),
                          np.array([[.0, .02, .07], [.0, .01, .05], [.03, .09, .25]]),
                          np.array([[.02, .04, .11], [.02, .03, .09], [.07, .15, .35]])), None),
        ("Specialization", "ablation_effects",
         P.ablation_effects(data["delta"], ["L1 E0", "L1 E5", "L3 E2", "L7 E7"], domains), None),
    ]


def _weights_figures(data: dict, rng: np.random.Generator) -> list[tuple[str, str, go.Figure, object]]:
    """The Weights section: SVD spectra and router/expert alignment (draws its random baseline from ``rng``)."""
    nl = data["nl"]
    return [
        ("Weights", "svd_spectra",
         P.svd_spectra(data["spectra"], baseline=np.sort(rng.random(16))[::-1]), None),
        ("Weights", "router_expert_alignment",
         P.alignment_vs_baseline(data["own"], data["other"], np.full(nl, 0.12), np.full(nl, 0.02), data["layers"],
                                 measure="share of router-row energy in the expert's input subspace"), None),
        ("Weights", "hungarian_cosine_vs_null",
         P.hungarian_cosine_vs_null(np.array([[1, .3], [.3, 1]]), np.full((2, 2), .12), np.full((2, 2), .08),
                                    np.full((2, 2), .16), [0, 1]), None),
    ]


def _null_figures() -> list[tuple[str, str, go.Figure, object]]:
    """The Nulls section: an estimate drawn against its null, both with intervals."""
    return [
        ("Nulls", "estimate_vs_null",
         P.estimate_vs_null(["0", "1", "2"], np.array([.5, .3, .2]), np.array([.45, .25, .15]), np.array([.55, .35, .25]),
                            np.array([.3, .3, .2]), np.array([.28, .27, .18]), np.array([.32, .33, .22]),
                            y_title="share of token pairs"), None),
    ]


def _checkpoint_figures(data: dict) -> list[tuple[str, str, go.Figure, object]]:
    """The Checkpoints section: saturation and drift over training steps."""
    steps, sat, layers = data["steps"], data["sat"], data["layers"]
    return [
        ("Checkpoints", "saturation", P.saturation_over_checkpoints(steps, sat, layers, low=sat - 0.05, high=np.minimum(sat + 0.05, 1),
                                                                    null=np.full_like(sat, 0.25)), None),
        ("Checkpoints", "drift", P.drift_over_checkpoints(steps, data["drift"], layers), None),
        ("Checkpoints", "saturation_heatmap",
         P.checkpoint_heatmap(sat, steps, layers, "top-k overlap with final"), None),
    ]


def _training_figures(data: dict, rng: np.random.Generator) -> list[tuple[str, str, go.Figure, object]]:
    """The Training section: curves, utilization and entropy over time, affinity (drawn from ``rng``)."""
    return [
        ("Training", "training_curves",
         P.training_curves([1, 2, 3, 4], {"loss": [2.6, 2.2, 2.0, 1.9]}, y_label="loss (nats/token)"),
         None),
        ("Training", "utilization_over_time",
         P.utilization_over_time([1, 2, 3, 4], rng.dirichlet(np.ones(6), 4)), None),
        ("Training", "layer_entropy_over_time",
         P.layer_metric_over_time([1, 2, 3, 4], rng.uniform(1, 2, (4, data["nl"])), data["layers"],
                                  "router entropy", "nats"), None),
        ("Training", "affinity", P.affinity_heatmap(rng.random((12, 6))), None),
    ]


def _picker_figures(corr: np.ndarray, coact: np.ndarray, share: np.ndarray, domains: list[str],
                    num_experts: int) -> list[tuple[str, str, go.Figure, object]]:
    """The figures where the reader picks a layer or a layer pair from a dropdown."""
    return [
        ("Routing", "correlation_pairs",
         P.correlation_by_layer_pair([corr[:3, 3:], corr[:3, :3]], [(1, 3), (3, 5)], experts_b=[[0, 4, 6], [1, 2, 7]],
                                     scores=[0.4, 0.2]), None),
        ("Routing", "coactivation_layers",
         P.coactivation_by_layer([coact, coact.T, coact[:4, :4]], [1, 3, 7], experts=[range(8), range(8), [0, 2, 5, 6]],
                                 shown=1), None),
        ("Specialization", "domain_specialization_layers",
         P.domain_specialization_by_layer(np.stack([share, share[::-1]]), domains, [3, 5], baseline=1 / num_experts),
         None),
        ("Specialization", "domain_shares_per_expert",
         domain_shares_per_expert(np.stack([share, share[::-1]]), domains, [0, 5], 2 / num_experts, shown=1), None),
        ("Specialization", "vocabulary_per_expert",
         vocabulary_per_expert(np.full((2, num_experts), 0.6), [[HOSTILE_TOKEN] * num_experts, ["the"] * num_experts],
                               [0, 5], 2 / num_experts), None),
        ("Routing", "coactivation_lift",
         lift_by_layer([2 * coact + 0.01, coact.T[:4, :4] * 4], [1, 3], [range(8), [0, 2, 5, 6]],
                       [np.ones_like(coact), np.ones((4, 4))], shown=1), None),
    ]


def gallery_report(seed: int = 0) -> Report:
    """A report holding every gallery figure, a token table and a warning."""
    report = Report(
        "Figure gallery (synthetic data)",
        {"model": "synthetic", "datasets": ["math", "code", "web"], "tokens": 12_345,
         "note": f"hostile token {HOSTILE_TOKEN}"},
        warnings=[f"example warning mentioning {HOSTILE_TOKEN}"],
    )
    report.add_section("Routing", "Synthetic numbers; shapes and labels are what matter here.")
    for section, name, fig, data in gallery_figures(seed):
        report.add_figure(section, fig, name, data=data)
    report.lead = [(f"A finding drawn small beside its text ({HOSTILE_TOKEN})", "utilization"),
                   ("A second one, with the co-activation lift behind it", "coactivation_lift"),
                   ("A finding listed below the cards", "entropy"), ("A finding with no figure", None)]
    report.lead_shown = 2
    report.add_table("Examples", pd.DataFrame({"token": [" the", HOSTILE_TOKEN], "count": [10, 1]}),
                     "example_tokens", caption="tokens from the data (escaped)")
    payload = routed_text_payload(routed_text_sample(), GALLERY_VOCAB.__getitem__)
    report.add_html("Text coloured by routing", routed_text_html(payload, "routed-text"), "routed_text", data=payload,
                    caption="each token's top-1 expert at the picked layer (hover for its experts)")
    return report


GALLERY_VOCAB = ["def", " f", "(x", "):", "\n", "    return", " x", " +", " 12", HOSTILE_TOKEN, " the", " sum"]


def routed_text_sample() -> SimpleNamespace:
    """Two documents (code, web) of the gallery vocabulary; token t's top-1 expert at layer i is (t + 3 i) mod 8."""
    layers, k, E = [1, 3, 5, 7], 2, 8
    ids = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 9, 11, 7, 8])
    t = np.arange(len(ids))
    top = (t[:, None] + 3 * np.arange(len(layers))) % E
    experts = np.stack([top, (top + 5) % E], -1)
    weights = np.broadcast_to(np.array([0.625, 0.375], np.float32), experts.shape)
    return SimpleNamespace(moe_layers=layers, num_experts=E, top_k=k, doc_domain=["code", "web"], doc_dataset=["humaneval", "wiki"],
                           doc_id=np.array([0, 3]), doc_start=np.array([0, 9, len(ids)]), token_ids=ids,
                           positions=np.r_[np.arange(9), np.arange(len(ids) - 9)], experts=experts, weights=weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the figure gallery report.")
    parser.add_argument("out", type=Path, help="output folder")
    args = parser.parse_args(argv)
    print(gallery_report().write(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
