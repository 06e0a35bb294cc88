"""One suite every registered analysis must pass (as scikit-learn's ``check_estimator``).

For each ``"pass"`` spec of the registry, on planted routing with documents, domains, datasets,
token ids, logits and two checkpoints: the result does not depend on how the stream is cut into
chunks; shares folded apart and merged equal one pass; empty chunks change nothing; the result
survives a JSON round trip; and two runs with one seed agree. Each ``"after"`` spec, on a tiny
random OLMoE: its result survives a JSON round trip and two runs agree. Extend it with checks every
analysis must meet (the null-calibration checks of "Calibrated statistics" go here).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from core.analysis.streaming import merge_all
from core.pipeline.context import RunContext
from core.pipeline.options import make_options
from core.pipeline.spec import registered
from core.pipeline.suite import pass_accumulators
from core.routing_data import RoutingData
from core.safe_io import to_jsonable
from tests.compare import assert_same
from tests.fakes import routing
from tests.planted import planted

DOC_LEN, DOCS = 30, 24
PASS_SPECS = [s.name for s in registered() if s.stage == "pass"]


def _checkpoints() -> list[RoutingData]:
    """The same tokens at two checkpoints: the final one planted, the early one with a third of its choices redrawn."""
    final = planted(num_docs=DOCS, doc_len=DOC_LEN, num_experts=8, top_k=2, num_layers=3, stickiness=0.3, vocab=40,
                    token_pref=2.0, seed=1)
    rng = np.random.default_rng(2)
    n = final.num_tokens
    datasets = np.asarray(final.doc_ids) % 2  # two datasets, whole documents each
    logits = rng.normal(size=(n, 3, 8))
    out = []
    for c in range(2):
        idx = final.topk_idx.numpy().copy()
        if c == 0:
            redraw = rng.random(n) < 1 / 3
            idx[redraw] = np.argsort(rng.random((int(redraw.sum()), 3, 8)), axis=-1)[..., :2]
        out.append(routing(idx, 8, logits=logits, doc_ids=final.doc_ids, positions=final.positions, domain_ids=final.domain_ids,
                           token_ids=final.token_ids, dataset_ids=datasets, domain_names=final.domain_names,
                           dataset_names=["d0", "d1"]))
    return out


CKPTS = _checkpoints()


def _context() -> RunContext:
    sweep = SimpleNamespace(checkpoints=[SimpleNamespace(name="early", step=10), SimpleNamespace(name="final", step=20)])
    return RunContext(make_options(micro=True, resamples=30, seed=7), None, sweep, {}, token_ids=list(range(40)))


def _stream(bounds: list[int]) -> list[list[RoutingData]]:
    """Aligned items (the same tokens at every checkpoint) cut at the token offsets ``bounds``."""
    return [[c.select(slice(a, b)) for c in CKPTS] for a, b in zip(bounds, bounds[1:]) if b > a]


def _fold(name: str, items: list[list[RoutingData]]):
    acc = pass_accumulators(_context())[0][name]
    for item in items:
        acc.update(item)
    return acc


def _result(acc) -> dict:
    return to_jsonable(acc.result())


N = DOCS * DOC_LEN
EVEN = list(range(0, N + 1, 64)) + [N]
DOCUMENTS = list(range(0, N + 1, DOC_LEN))  # one document per chunk
RAGGED = [0, 7, 100, 101, 333, 500, N]  # chunks that cut documents anywhere


@pytest.fixture(scope="module", params=PASS_SPECS)
def spec_name(request):
    return request.param


@pytest.fixture(scope="module")
def one_pass(spec_name):
    return _result(_fold(spec_name, _stream(EVEN)))


def test_every_pass_analysis_is_in_the_suite():
    assert {"routing_stats", "correlation_topk", "domain_specialization", "checkpoint_dynamics"} <= set(PASS_SPECS)


@pytest.mark.parametrize("bounds", [DOCUMENTS, RAGGED], ids=["one-document-chunks", "ragged-chunks"])
def test_result_does_not_depend_on_chunk_size(spec_name, one_pass, bounds):
    assert_same(_result(_fold(spec_name, _stream(bounds))), one_pass, spec_name, rel=1e-6)


def test_shares_merged_equal_one_pass(spec_name, one_pass):
    """Two processes' shares (cut at a document boundary, as the run cuts them), merged in stream order."""
    half = (DOCS // 2) * DOC_LEN
    first, second = _fold(spec_name, _stream([0, 64, half])), _fold(spec_name, _stream([half, half + 64, N]))
    assert_same(_result(merge_all([{"a": first}, {"a": second}])["a"]), one_pass, spec_name, rel=1e-6)


def test_empty_chunks_change_nothing(spec_name, one_pass):
    items = _stream(EVEN)
    empty = [c.select(slice(0, 0)) for c in CKPTS]
    assert_same(_result(_fold(spec_name, [empty] + items[:3] + [empty] + items[3:])), one_pass, spec_name, rel=1e-6)


def test_result_survives_a_json_round_trip(spec_name, one_pass):
    text = json.dumps(one_pass, allow_nan=False)
    assert_same(json.loads(text), one_pass, spec_name)


def test_same_seed_same_result(spec_name, one_pass):
    assert_same(_result(_fold(spec_name, _stream(EVEN))), one_pass, spec_name, rel=0)


def test_the_readme_walkthrough_registers_an_analysis_that_runs():
    """The "Add an analysis" example of the README, run as written: registered, folded, found and reported."""
    from pathlib import Path

    from core.pipeline.findings import conclude
    from core.pipeline.outputs import build_report
    from core.pipeline.record import RunRecord
    from core.pipeline.spec import unregister

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Add an analysis"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    try:
        exec(compile(code, "README.md", "exec"), {})
        assert "first_expert" in {s.name for s in registered()}
        result = _fold("first_expert", _stream(EVEN)).result()
        record = conclude(RunRecord(options={}, model={"name": "planted"}, datasets=("d0", "d1"), tokens={"d0": N},
                                    checkpoints=(), results={"first_expert": result}))
        assert record.headline["first_expert_tokens"] == N
        [found] = [f for f in record.findings if f.key == "first_expert"]
        report, figures = build_report(record)
        assert "first_expert" in figures and (found.text, "first_expert") in report.lead
    finally:
        unregister("first_expert")


# ---------------------------------------------------------------------------- analyses that run after the pass
AFTER_SPECS = [s.name for s in registered() if s.stage == "after"]


@pytest.fixture(scope="module")
def after_world():
    """A tiny random OLMoE, two datasets of whole documents, two checkpoints, and the pass results the later analyses read."""
    import torch

    from core.model_access.wrapper import MoEModelWrapper
    from data.tokenization import TokenizedDataset
    from tests.tiny_models import VOCAB, build

    wrapper = MoEModelWrapper(build("olmoe", seed=4))
    tokenized = {}
    for d, name in enumerate(["d0", "d1"]):
        ids = torch.randint(3, VOCAB, (6, 16), generator=torch.Generator().manual_seed(d))
        rows = torch.arange(6)[:, None].expand_as(ids).clone()
        tokenized[name] = TokenizedDataset(input_ids=ids, attention_mask=torch.ones_like(ids), doc_ids=rows,
                                           positions=torch.arange(16).expand_as(ids).clone(), domain_ids=torch.full_like(ids, d),
                                           dataset_ids=torch.full_like(ids, d), domain_names=["a", "b"], dataset_names=["d0", "d1"],
                                           documents=[], max_length=16, packed=False)
    routers = wrapper.get_router_weights()
    early = {layer: w + 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(layer)) for layer, w in routers.items()}
    sweep = SimpleNamespace(checkpoints=[SimpleNamespace(name="early", step=1), SimpleNamespace(name="final", step=2)],
                            router_weights=[early, routers], datasets=["d0", "d1"])
    ctx = RunContext(make_options(micro=True, resamples=20, seed=3, pruning_fractions=[0.25]), wrapper, sweep, tokenized)
    accs = pass_accumulators(ctx)[0]
    for tok in tokenized.values():
        routing = wrapper.trace_routing(tok.input_ids, tok.attention_mask)
        routing.doc_ids, routing.positions = tok.doc_ids[tok.attention_mask.bool()], tok.positions[tok.attention_mask.bool()]
        routing.domain_ids = tok.domain_ids[tok.attention_mask.bool()]
        routing.dataset_ids = tok.dataset_ids[tok.attention_mask.bool()]
        routing.token_ids = tok.input_ids[tok.attention_mask.bool()]
        routing.domain_names, routing.dataset_names = ["a", "b"], ["d0", "d1"]
        for acc in accs.values():
            acc.update([routing, routing])
    done = {name: acc.result() for name, acc in accs.items()}
    inputs, results = {}, {}  # per "after" analysis: the results it was given, as the suite runs them in order
    for spec in registered():
        if spec.stage == "after" and not (spec.skip and spec.skip(ctx)):
            inputs[spec.name] = dict(done)
            results[spec.name] = done[spec.name] = spec.compute(ctx, inputs[spec.name])
    return ctx, inputs, results


@pytest.mark.parametrize("name", AFTER_SPECS)
def test_after_analyses_are_deterministic_and_survive_a_json_round_trip(after_world, name):
    ctx, inputs, results = after_world
    first = to_jsonable(results[name])
    assert first, f"{name} computed nothing on a world where it applies"
    assert_same(json.loads(json.dumps(first, allow_nan=False)), first, name)
    spec = next(s for s in registered() if s.name == name)
    assert_same(to_jsonable(spec.compute(ctx, inputs[name])), first, name, rel=0)
