"""Findings stay a few sentences at any number of layers and experts, and still name the strongest effect and the nulls.

Results come from the real analyses run on synthetic routing (random top-k picks per token, with
effects planted where a test needs one); ablation, pruning and expert alignment, which need a
model, are built from their own estimators on planted losses and weights.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import lru_cache

import numpy as np
import pytest
import torch

from core.analysis.ablation import AblationResult, _delta_estimate, most_and_least_used_experts
from core.analysis.checkpoint_dynamics import CheckpointDynamicsAccumulator
from core.analysis.consistency import ConsistencyAccumulator
from core.analysis.correlations import CorrelationAccumulator
from core.analysis.expert_alignment import ExpertAnalyzer
from core.analysis.pruning import PruningResult, pruned_count, versus_random
from core.analysis.resampling import NUM_BLOCKS, BlockSums, block_of, document_key
from core.analysis.router_weights import RouterAnalyzer
from core.analysis.routing_stats import RoutingStatsAccumulator
from core.analysis.specialization import DomainSpecializationAccumulator
from core.analysis.streaming import fold
from core.analysis.vocabulary import VocabularyAccumulator
from core.pipeline.record import RunRecord
from core.pipeline.findings import findings, headline_numbers, warnings_of
from core.pipeline.findings_text import layer_list
from tests.fakes import routing

DOMAINS = ["general", "math", "code"]
MAX_FINDING, MAX_TOTAL = 400, 3200  # characters: a few sentences each, one screen in all (3200: each count and test names its correction)


def _picks(rng, weights: np.ndarray, k: int) -> np.ndarray:
    """Top-k distinct experts per (token, layer) drawn without replacement by ``weights [N, L, E]`` (Gumbel top-k)."""
    scores = np.log(weights) + rng.gumbel(size=weights.shape)
    return np.argsort(-scores, axis=-1)[..., :k]


def _routing(L: int, E: int, k: int, plant: bool, seed: int = 0, docs: int = 60, doc_len: int = 40):
    """Documents of three domains; with ``plant``: code tokens favour the last layer's expert 5, and layer 1 collapses."""
    rng = np.random.default_rng(seed)
    n = docs * doc_len
    doc = np.repeat(np.arange(docs), doc_len)
    dom = doc % 3
    w = np.ones((n, L, E))
    if plant:
        w[dom == 2, L - 1, 5] = 40.0
        w[:, 1, E // 2:] = 1e-9  # half the experts of layer 1 are never picked: it collapses
    idx = _picks(rng, w, k)
    rd = routing(idx, E, doc_ids=doc, positions=np.tile(np.arange(doc_len), docs), domain_ids=dom,
                 token_ids=rng.integers(0, 30, n), dataset_ids=dom, domain_names=DOMAINS,
                 dataset_names=["wikitext2", "gsm8k", "humaneval"])
    return rd, idx, rng


def _dynamics(rd, idx: np.ndarray, rng, E: int, k: int):
    """Three checkpoints of the same tokens: 20% and 70% of their picks already as at the final one."""
    chunks = []
    for keep in (0.2, 0.7):
        early = np.where(rng.random(idx.shape[:2])[..., None] < keep, idx, _picks(rng, np.ones(idx.shape[:2] + (E,)), k))
        chunks.append(dataclasses.replace(rd, topk_idx=torch.as_tensor(early)))
    acc = CheckpointDynamicsAccumulator(["step0", "step1000", "step2000"], [0, 1000, 2000], resamples=50)
    return acc.update(chunks + [rd]).result()


def _ablation(stats, rng, plant: bool, D: int = 3, tokens: int = 3000) -> AblationResult:
    """Single-expert ablations of the most and least used expert of every layer, on planted per-token losses."""
    targets, labels = most_and_least_used_experts(stats.utilization, stats.moe_layers)
    T = len(targets)
    doc, dom = rng.integers(0, 90, tokens), rng.integers(0, D, tokens)
    base = rng.normal(3.0, 0.5, tokens)
    effect = np.zeros((T, D))
    if plant:
        effect[T - 2, 2] = 0.05  # the last layer's most used expert matters for code
    loss = base[:, None] + effect[:, dom].T + (rng.normal(0, 0.002, (tokens, T)) if plant else 0.0)
    units = BlockSums(NUM_BLOCKS * D)
    unit = block_of(document_key(doc, dom)) * D + dom
    units.add("loss", unit, np.concatenate([base[:, None], loss], 1))
    units.add("tokens", unit, np.ones(tokens))
    sums = units["loss"].reshape(NUM_BLOCKS, D, -1).sum(0).T
    count = units["tokens"].reshape(NUM_BLOCKS, D).sum(0)
    means = sums / count[None]
    return AblationResult(DOMAINS, labels, targets, means[0], means[1:], count.astype(int),
                          estimate=_delta_estimate(units, D, 100, 0))


def _pruning(E: int, L: int, plant: bool) -> PruningResult:
    """Four criteria and random at three fractions; with ``plant``, usage beats random at the largest."""
    crit, fr = ["weight_mass", "collaboration", "usage", "causal", "random"], [0.125, 0.25, 0.5]
    overall = np.tile(np.array([0.02, 0.05, 0.12]), (5, 1))
    half = np.full((5, 3), 0.02)
    if plant:
        overall[2, 2] = 0.03
    seeds = overall[4] + np.random.default_rng(0).normal(0, 0.004, (8, 3))  # the random draws, around random's mean
    overall[:4] += np.random.default_rng(1).normal(0, 0.004, (4, 3)) * (overall[:4] != 0.03)  # the rest: like a random draw
    vs = versus_random(overall[:4], overall[:4] - half[:4], overall[:4] + half[:4], seeds)
    beats = np.zeros((5, 3), bool)
    beats[:4] = vs.distinguishable
    delta = np.repeat(overall[:, :, None], 3, 2)
    return PruningResult(fr, crit, DOMAINS, np.array([1000, 1000, 1000]), delta, delta - 0.02, delta + 0.02, overall,
                         overall - half, overall + half, seeds, beats, vs, {},
                         [crit[int(np.argmin(overall[:, j]))] for j in range(3)], [pruned_count(f, E) for f in fr], E)


def _weights(L: int, E: int, plant: bool, H: int = 32, inner: int = 4):
    """Router similarity and expert alignment of random weights; with ``plant``, layer L-1's rows lie in their experts' inputs."""
    g = torch.Generator().manual_seed(0)
    routers = {l: torch.randn(E, H, generator=g) for l in range(L)}
    experts = {l: {"up": torch.randn(E, inner, H, generator=g), "gate": None} for l in range(L)}
    if plant:
        routers[L - 1] = experts[L - 1]["up"].sum(1)
    sim = RouterAnalyzer(score_fn="softmax").compute_router_similarity_matrix(routers, num_null=20, seed=0)
    align = ExpertAnalyzer(score_fn="softmax").analyze_expert_router_alignment(
        expert_weights=experts, router_weights=routers, num_permutations=200, energy=None, rank=inner)
    return sim, align


@lru_cache(maxsize=None)
def build(L: int, E: int, k: int, plant: bool) -> RunRecord:
    """A run's results at ``L`` layers x ``E`` experts, built once per session: a test replaces what it changes."""
    record = _built(L, E, k, plant)
    return dataclasses.replace(record, results=dict(record.results))


@lru_cache(maxsize=None)
def _built(L: int, E: int, k: int, plant: bool) -> RunRecord:
    """A run's results at ``L`` layers x ``E`` experts, from the real analyses where no model is needed (seeded)."""
    rd, idx, rng = _routing(L, E, k, plant)
    r = dict(resamples=50, seed=0)
    accs = {"routing_stats": RoutingStatsAccumulator(**r), "correlation_topk": CorrelationAccumulator("topk", **r),
            "domain_specialization": DomainSpecializationAccumulator("domain", permutations=50, **r),
            "vocabulary_specialization": VocabularyAccumulator(min_count=20, permutations=20, seed=0),
            "routing_consistency": ConsistencyAccumulator(**r)}
    results = fold([rd], accs)
    results["checkpoint_dynamics"] = _dynamics(rd, idx, rng, E, k)
    results["ablation"] = _ablation(results["routing_stats"], rng, plant)
    results["pruning"] = _pruning(E, L, plant)
    results["router_similarity"], results["expert_alignment"] = _weights(L, E, plant)
    return RunRecord(options={}, model={"top_k": k, "num_experts": E}, datasets=["wikitext2", "gsm8k", "humaneval"],
                      tokens={"wikitext2": rd.num_tokens}, checkpoints=[], results=results,
                      skipped={"collaboration": "turned off"})


SHAPES = [(4, 8, 2), (16, 64, 8)]


@pytest.mark.parametrize("plant", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_findings_are_short_at_any_shape_and_keep_their_openings(shape, plant):
    typed = findings(build(*shape, plant))
    found = [f.text for f in typed]
    assert len(found) == 10
    assert all(f.figure_keys for f in typed)  # the report links each finding to the figure it names
    for f in found:
        assert len(f) <= MAX_FINDING, (len(f), f)
        assert "95% CI" in f or "95% range" in f, f  # every finding quotes an interval or a null range
    assert sum(map(len, found)) <= MAX_TOTAL, sum(map(len, found))
    assert headline_numbers(build(*shape, plant))["tokens"] == 2400


def test_findings_do_not_grow_with_layers_and_experts():
    small, large = (sum(len(f.text) for f in findings(build(*s, True))) for s in SHAPES)
    assert large < 1.15 * small, (small, large)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_planted_effects_are_the_ones_named(shape):
    L = shape[0]
    found = {f.text.split(" ")[0]: f.text for f in findings(build(*shape, True))}
    assert f"The largest is L{L - 1}:E" in found["Ablation"] and "(most used" in found["Ablation"]
    assert "on code, +0.050 (95% CI +0.0" in found["Ablation"]
    assert f"top expert L{L - 1}:E5 for code, share over uniform" in found["Domain"]
    assert f"peaks at layer {L - 1}," in found["Domain"] and "1 of 3 domains beyond it" in found["Domain"]
    assert f"1 of {L} layers beyond the null (Holm: ≈ 0.05 false per run)" in found["Router–expert"]
    assert f"strongest: layer {L - 1}," in found["Router–expert"]
    assert "lowest at layer 1," in found["Load"] and "not distinguishable" not in found["Load"]
    assert "Beats random, of 3 fractions: usage at 1 (t test on the seeds, Holm over 12" in found["Pruning"] and "pruning 50.0% of each layer's" in found["Pruning"]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_null_effects_are_said_to_be_indistinguishable(shape):
    L, E = shape[:2]
    found = {f.text.split(" ")[0]: f.text for f in findings(build(*shape, False))}
    n = 2 * L * 3
    assert f"{n} of {n} changes are not distinguishable from no change" in found["Ablation"]
    assert found["Ablation"].endswith("not distinguishable from no change.")
    assert f"0 of {L} layers beyond the null (Holm: ≈ 0.05 false per run)" in found["Router–expert"]
    assert found["Router–expert"].endswith(", not distinguishable.") and "expected by chance" not in found["Router–expert"]
    hung = found["Hungarian-matched"]
    assert "null: experts' rows mixed by a random rotation that keeps the router's covariance" in hung
    assert f"0 of {L - 1} adjacent pairs beyond the null (Holm: ≈ 0.05 false per run)" in hung
    assert f"0 of {L} layers less even than a balanced load" in found["Load"] and "not distinguishable" in found["Load"]
    assert "not distinguishable" in found["Consecutive"] and "0 of 3 domains beyond it" in found["Domain"]
    assert "No criterion beats random at any of 3 fractions" in found["Pruning"]
    assert "not shown to beat random" in found["Pruning"]


def test_warnings_name_layers_compactly_one_line_per_kind():
    res = build(16, 64, 8, True)
    warns = warnings_of(res)
    assert sum(w.startswith("layer") for w in warns) <= 2 and "collaboration skipped: turned off" in warns
    collapsed = next(w for w in warns if "collapsed" in w.split(":")[0])
    assert collapsed.startswith("layer 1 of 16 is collapsed:") and "32/64 experts dead (>= 50%) at layer 1" in collapsed
    # judged against sampling noise (core.analysis.routing_stats): the warning says so, once
    stats = copy.copy(res["routing_stats"])
    stats.null_note = "judged against multinomial sampling noise"
    warns = warnings_of(dataclasses.replace(res, results={"routing_stats": stats}, skipped={}))
    assert "multinomial sampling noise" in warns[0] and all("multinomial" not in w for w in warns[1:])


def test_imbalanced_layers_are_counted_not_listed():
    stats = copy.copy(build(16, 64, 8, True)["routing_stats"])
    L = len(stats.moe_layers)
    stats.null_note = ""
    stats.diagnosis = ["imbalanced" if i in (5, 9, 12, 13, 14, 15) else "healthy" for i in range(L)]
    stats.reasons = [(["1 dead experts"] if i in (5, 9, 12) else []) + ["2 dominant experts", "load CV 1.20 > 1.0"]
                     if d == "imbalanced" else [] for i, d in enumerate(stats.diagnosis)]
    stats.dead = np.zeros_like(stats.dead)
    stats.dead[[5, 9, 12], 3] = True
    stats.dominant = np.zeros_like(stats.dominant)
    stats.dominant[[5, 9, 12, 13, 14, 15], :2] = True
    res = RunRecord(options={}, model={"top_k": 8}, datasets=[], tokens={}, checkpoints=[], results={"routing_stats": stats})
    assert warnings_of(res) == [
        "layers 5, 9, 12–15 of 16 are imbalanced: dead experts in 3 (3 in all); dominant experts in 6 (12 in all); "
        "load CV 1.20 > 1.0 at layer 5 and 5 more (see the routing statistics section)"]


def test_layer_list():
    assert layer_list([15, 12, 13, 14, 9, 5]) == "5, 9, 12–15"
    assert layer_list([0, 1]) == "0, 1" and layer_list([3]) == "3" and layer_list([]) == ""


def test_a_change_from_one_document_per_domain_has_no_interval_and_no_verdict():
    """One document block per domain: nothing to resample, so the findings give no interval and call nothing certain."""
    res = copy.copy(build(4, 8, 2, True))
    targets = [{0: [1]}]
    loss = np.full((300, 2), 3.0) + np.array([0.0, 0.05])  # a planted change, every token alike
    dom, doc = np.arange(300) % 3, np.arange(300) % 3  # one document per domain
    units = BlockSums(NUM_BLOCKS * 3)
    unit = block_of(document_key(doc, dom)) * 3 + dom
    units.add("loss", unit, loss)
    units.add("tokens", unit, np.ones(300))
    abl = AblationResult(DOMAINS, ["L0:E1"], targets, np.full(3, 3.0), np.full((1, 3), 3.05), np.full(3, 100),
                         estimate=_delta_estimate(units, 3, 100, 0))
    assert np.isnan(abl.estimate.low).all() and not abl.estimate.distinguishable.any()
    pr = dataclasses.replace(build(4, 8, 2, True).results["pruning"])
    pr.overall_low = np.full_like(pr.overall_low, np.nan)
    pr.overall_high = np.full_like(pr.overall_high, np.nan)
    pr.beats_random = np.zeros_like(pr.beats_random)
    pr.versus_random = versus_random(pr.overall[:-1], pr.overall_low[:-1], pr.overall_high[:-1], pr.random_seed_overall)
    res = dataclasses.replace(res, results={**res.results, "ablation": abl, "pruning": pr})
    found = {f.text.split(" ")[0]: f.text for f in findings(res)}
    assert "(no interval: each domain's tokens are in too few document blocks)" in found["Ablation"]
    assert "95% CI" not in found["Pruning"] and "(no interval: too few documents)" in found["Pruning"]
    assert "No criterion beats random" in found["Pruning"]


def _opening_layer(fig) -> int:
    """The model layer a layer-menu figure shows on opening (its title says 'in layer N')."""
    return int(fig.layout.title.text.rsplit("layer ", 1)[1].split()[0].rstrip(":"))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_figures_open_on_the_layer_their_finding_names(shape):
    from core.pipeline.outputs import build_report

    record = build(*shape, True)
    record = dataclasses.replace(record, findings=tuple(findings(record)))
    found = {f.text.split(" ")[0]: f.text for f in record.findings}
    _, figs = build_report(record)
    peak = int(found["Domain"].split("peaks at layer ")[1].split(",")[0])
    assert peak == shape[0] - 1  # the planted layer
    domain = figs["domain_specialization"]
    assert _opening_layer(domain) == peak and domain.layout.updatemenus[0].active == [
        b.label for b in domain.layout.updatemenus[0].buttons].index(f"layer {peak}")
    opened = [t for t in domain.data if t.visible]
    assert opened and all(f"layer {peak}" in t.hovertemplate for t in opened)
    cited = int(found["Vocabulary"].split("above chance at layer ")[1].split(",")[0])
    assert _opening_layer(figs["vocabulary_specialization"]) == cited


def test_the_saturation_figure_draws_each_layers_interval_and_chance():
    from core.pipeline.outputs import build_report

    record = build(4, 8, 2, True)
    est = record.results["checkpoint_dynamics"].estimates["saturation"]
    fig = build_report(record)[1]["saturation"]
    assert fig.layout.xaxis.type == "log"
    bands = [t for t in fig.data if t.fill == "toself"]
    chance = [t for t in fig.data if t.line.dash == "dash"]
    assert len(bands) == len(chance) == 4
    kept = np.asarray(record.results["checkpoint_dynamics"].steps) > 0  # step 0 has no place on the log axis
    assert np.allclose(chance[3].y, np.asarray(est.null)[kept, 3], equal_nan=True)
    assert np.allclose(bands[0].y[: kept.sum()], np.asarray(est.high)[kept, 0], equal_nan=True)
