"""The run report stays light at real model shapes: under 15 MB at OLMoE's 16 x 64 and at 60 x 256.

Built from synthetic results: the routing analyses run on random routing; the cross-layer
matrices (too big to compute in a test) are random read-only views of the right shape. The
16 x 64 page, with its expert cards, is opened in headless Chromium by tests/test_expert_cards_browser.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core.analysis.coactivation import coactivation, routing_paths
from core.analysis.coactivation_lift import coactivation_lift
from core.analysis.dataset_difference import DatasetDifference
from core.analysis.resampling import Estimate
from core.analysis.correlations import CorrelationDifference, CrossLayerCorrelation
from core.analysis.expert_cards import expert_cards
from core.analysis.routed_text import routed_text
from core.analysis.routing_stats import routing_stats
from core.analysis.specialization import domain_specialization
from core.routing_data import RoutingData
from core.pipeline.outputs import build_report
from core.pipeline.record import RunRecord
from core.pipeline.spec import Finding

DATASETS = ["wikitext2", "gsm8k", "humaneval"]
MB = 1 << 20


def _routing(L: int, E: int, k: int = 8, n: int = 1200, seed: int = 0) -> RoutingData:
    """Random routing of ``n`` tokens (3 datasets, 2 domains, 40-token documents)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, L, E, generator=g) * torch.linspace(0.5, 3.0, E)  # uneven load, like a real router
    idx = logits.topk(k, dim=-1).indices
    docs = torch.arange(n) // 40
    return RoutingData(moe_layers=list(range(L)), num_experts=E, top_k=k, router_logits=logits, topk_idx=idx,
                       topk_weight=torch.softmax(logits, -1).gather(-1, idx), token_ids=torch.randint(0, 500, (n,), generator=g),
                       doc_ids=docs, positions=torch.arange(n) % 40, dataset_ids=docs % 3, domain_ids=docs % 2,
                       dataset_names=DATASETS, domain_names=["general", "math"])


def _long_documents(L: int, E: int) -> RoutingData:
    """Six documents of 200 tokens, two of each of three domains: all kept whole by the coloured text (its worst case)."""
    rd = _routing(L, E, n=1200, seed=1)
    rd.doc_ids = torch.arange(1200) // 200
    rd.domain_ids = rd.dataset_ids = rd.doc_ids % 3
    rd.domain_names = DATASETS
    return rd


def _matrix(n: int, rng: np.random.Generator) -> np.ndarray:
    """An ``[n, n]`` symmetric read-only view (``m[i, j] = base[i + j]``): the shape of a full correlation, 8n bytes."""
    base = rng.uniform(-0.4, 0.4, 2 * n).astype(np.float32)
    return np.lib.stride_tricks.as_strided(base, (n, n), (base.itemsize, base.itemsize), writeable=False)


def _correlation(feature: str, L: int, E: int, rng: np.random.Generator, group: str | None = None) -> CrossLayerCorrelation:
    mean = rng.uniform(0.01, 0.1, (L, L))
    mean = (mean + mean.T) / 2
    return CrossLayerCorrelation(feature, list(range(L)), E, 1200, _matrix(L * E, rng), mean, mean * 5, group=group)


def _collaboration(L: int, E: int, rng: np.random.Generator, K: int = 16) -> SimpleNamespace:
    """The fields the report reads of a CollaborationResult (dictionary learning is too slow for a test)."""
    share = rng.dirichlet(np.ones(len(DATASETS)), K)
    top = {d: [{"layer": int(rng.integers(L)), "expert": int(rng.integers(E)), "ratio": 2.0} for _ in range(5)] for d in DATASETS}
    return SimpleNamespace(atoms=rng.normal(size=(K, L, E)) * (rng.random((K, L, E)) < 0.3), domain_share=share,
                           moe_layers=list(range(L)), num_experts=E, group_names=DATASETS, top_experts=top,
                           ranking=list(range(K)), specificity=rng.random(K), reconstruction_error=0.5,
                           params={"activation_threshold": 0.5, "threshold_rule": "relative"})


def _dataset_difference(L: int, E: int, rng: np.random.Generator) -> DatasetDifference:
    """The report's part of a DatasetDifference (its moments are too big to compute at these shapes in a test)."""
    out = DatasetDifference(list(range(L)), E, [])
    for a, b in zip(DATASETS, DATASETS[1:]):
        key = f"{a} - {b}"
        out.pairs.append(key)
        out.layer_diff[key], out.layer_null[key] = rng.uniform(0, 0.1, (L, L)), rng.uniform(0, 0.1, (L, L))
        out.estimates[key] = Estimate(np.asarray(0.1), np.asarray(0.09), np.asarray(0.11), np.asarray(0.1),
                                      np.asarray(0.08), np.asarray(0.12), "dealt blocks", 8, p_value=np.asarray(0.5))
    return out


def synthetic_results(L: int, E: int, seed: int = 0) -> RunRecord:
    """The record of a run of an L x E model, with the results whose size grows with the shape."""
    rng = np.random.default_rng(seed)
    rd = _routing(L, E, seed=seed)
    topk, probs = _correlation("topk", L, E, rng), _correlation("probs", L, E, rng)
    diffs = {}
    for a, b in zip(DATASETS, DATASETS[1:]):
        mean = np.abs(rng.normal(0, 0.02, (L, L)))
        diffs[f"{a} - {b}"] = CorrelationDifference(a, b, "topk", list(range(L)), E, _matrix(L * E, rng), mean + mean.T, mean - mean.T)
    by_dataset = {name: routing_stats(rd.select(rd.dataset_ids == d)) for d, name in enumerate(DATASETS)}
    return RunRecord(options={}, model={"name": f"synthetic {L}x{E}"}, datasets=tuple(DATASETS), tokens={}, checkpoints=(),
                     findings=(Finding("correlation_topk", "Cross-layer correlation: synthetic", ("correlation_layer_summary",)),),
                     results={
        "routing_stats": routing_stats(rd), "routing_stats_by_dataset": by_dataset,
        "correlation_topk": topk, "correlation_probs": probs, "correlation_difference": diffs,
        "coactivation": coactivation(rd), "routing_paths": routing_paths(rd),
        "domain_specialization": domain_specialization(rd, by="domain"), "collaboration": _collaboration(L, E, rng),
        "routed_text": routed_text(_long_documents(L, E)), "expert_cards": expert_cards(rd),
        # at 60 x 256 the lift's pair arrays take a minute and 3 GB to compute: drawn at 16 x 64 only
        **({"coactivation_lift": coactivation_lift(rd)} if L * E <= 1024 else {}),
        "dataset_difference": _dataset_difference(L, E, rng),
    })


def _write(L: int, E: int, out) -> tuple[object, object]:
    rep, figs = build_report(synthetic_results(L, E), summary={"model": f"synthetic {L}x{E}"})
    return rep, rep.write(out)


@pytest.fixture(scope="module")
def olmoe_shape(tmp_path_factory):
    return _write(16, 64, tmp_path_factory.mktemp("r16x64"))


def test_olmoe_shape_report_is_under_15_mb(olmoe_shape):
    rep, path = olmoe_shape
    size = path.stat().st_size
    print(f"\n16 x 64 report: {size / MB:.2f} MB, {rep.num_figures} figures")
    assert size < 15 * MB
    page = path.read_text(encoding="utf-8")
    assert "key <code>correlation_topk/corr</code>" in page and "arrays.safetensors (not written beside" in page  # no main run here
    assert 'id="fig-coactivation"' in page and "coactivation_L" not in page  # one figure, a layer menu
    text = (path.parent / "data" / "routed_text.json").stat().st_size
    print(f"coloured text: 6 documents x 200 tokens x 16 layers x k=8, {text / MB:.2f} MB of JSON (indented file)")
    assert "id='routed-text'" in page and "Documents are cut short" not in page  # all 1,200 tokens, whole


def test_deep_wide_report_stays_bounded(tmp_path):
    """DeepSeek-V3's routing shape (58 MoE layers x 256 experts), rounded up: still under 15 MB."""
    rep, path = _write(60, 256, tmp_path)
    size = path.stat().st_size
    print(f"\n60 x 256 report: {size / MB:.2f} MB, {rep.num_figures} figures")
    assert size < 15 * MB
    html = path.read_text()
    assert "Only the 2,048 of 15,360 (layer, expert) columns" in html  # the pattern figures say what they left out
    assert "Documents are cut short" in html  # the coloured text: 1,200 tokens x 60 layers x 8 would pass its bound
    assert "data/expert_cards.js beside this page" in html  # the 15,360 cards' data: beside the page, not in it
    cards = (path.parent / "data" / "expert_cards.js").stat().st_size
    print(f"expert cards: 60 x 256 = 15,360 cards, {cards / MB:.2f} MB of data beside the page")
