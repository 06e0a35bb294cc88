"""``random:NAME`` models (a real model's dimensions, random weights), the stage clock, and lazily read expert weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from core.model_access import shapes
from core.model_access.shapes import ShapeError, ensure_random_model, random_model_folder, shape_config


def test_olmoe_shape_is_olmoe_1b_7b_offline():
    cfg = shape_config("random:allenai/OLMoE-1B-7B-0924", layers=2)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok) == (2048, 1024, 64, 8)
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.norm_topk_prob) == (50304, 2, False)
    assert shape_config("random:olmoe-1b-7b").num_hidden_layers == 16  # alias, all layers by default
    with pytest.raises(ShapeError, match="from 1 to 16"):
        shape_config("random:olmoe-1b-7b", layers=17)


def test_unknown_shape_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShapeError) as e:
        shape_config("random:nobody/no-such-moe")
    assert "allenai/OLMoE-1B-7B-0924" in str(e.value) and "\n" not in str(e.value)


def _tiny_olmoe():
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=512, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=4, num_experts=8, num_experts_per_tok=2)


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(shapes.KNOWN_SHAPES, "test/tiny-olmoe", _tiny_olmoe)
    return "random:test/tiny-olmoe"


def test_random_model_is_written_once_and_opens(tiny_shape, tmp_path):
    from core.model_access.wrapper import MoEModelWrapper

    from core.pipeline.targets import bundled_tokenizer

    folder = ensure_random_model(tiny_shape, 2, seed=3, models_dir=tmp_path, make_tokenizer=bundled_tokenizer)
    assert folder == random_model_folder(tiny_shape, 2, 3, tmp_path) and folder.name == "test--tiny-olmoe-2layers-seed3"
    record = json.loads((folder / shapes.RECORD_NAME).read_text())
    assert record["seed"] == 3 and record["layers"] == 2 and record["shape_of"] == "test/tiny-olmoe"
    assert not list(tmp_path.rglob(".*.tmp"))  # written through a temporary folder, renamed when complete
    stamp = (folder / "model.safetensors.index.json").stat().st_mtime_ns
    assert ensure_random_model(tiny_shape, 2, seed=3, models_dir=tmp_path, make_tokenizer=bundled_tokenizer) == folder
    assert (folder / "model.safetensors.index.json").stat().st_mtime_ns == stamp  # found, not rewritten
    w = MoEModelWrapper(str(folder))
    assert w.moe_layers == [0, 1] and w.num_experts == 8 and w.top_k == 2
    ids = w.tokenizer("The tower is 300 metres tall.", return_tensors="pt")["input_ids"]
    assert int(ids.max()) < 512 and w.trace_routing(ids).topk_idx.shape[1:] == (2, 2)


def test_main_run_on_a_random_shape_writes_the_stage_table(tiny_shape, tmp_path):
    from core.pipeline.run import BasicRoutingAnalysis

    summary = BasicRoutingAnalysis(model_name=tiny_shape, layers=2, micro=True, static="none", progress=False,
                                   offline=True, results_dir=str(tmp_path / "results"), models_dir=str(tmp_path / "models")).run()
    metrics = json.loads(summary.metrics.read_text())
    assert metrics["model"]["moe_layers"] == [0, 1] and metrics["model"]["num_experts"] == 8
    text = (summary.run_dir / "summary.md").read_text()
    rows = dict(re.findall(r"^\| (?:&nbsp;)*([^|]+?) \| ([\d,.]+) \|", text, flags=re.M))
    for stage in ("random weights written or found", "model loaded", "collection", "analyses: one pass over the caches",
                  "routing_stats", "expert_alignment", "ablation", "report"):
        assert stage in rows, f"{stage} missing from the stage table"
    assert float(rows["collection"].replace(",", "")) > 0


def test_layers_option_is_for_random_models_only():
    from core.pipeline.options import OptionsError, make_options

    with pytest.raises(OptionsError, match="random:NAME models only"):
        make_options(model="allenai/OLMoE-1B-7B-0924", layers=2)
    assert make_options(model="random:olmoe-1b-7b", layers=2).model.layers == 2


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="per-stage peaks need Linux's clear_refs")
def test_stage_clock_measures_each_stage_peak_alone():
    from core.pipeline.stage_clock import StageClock

    clock = StageClock()
    with clock.stage("allocates 400 MB"):
        big = np.ones(100 * 2**20, dtype=np.float32)  # touched pages: resident
        del big
    with clock.stage("allocates nothing"):
        pass
    clock.add_parts("allocates nothing", {"part": 0.5})
    grow, flat, part = clock.rows
    assert grow.peak_rss_mb - flat.peak_rss_mb > 300  # the second stage's peak does not carry the first's
    assert part.part_of == "allocates nothing" and part.peak_rss_mb is None
    table = clock.markdown()
    assert "| allocates 400 MB |" in table and "&nbsp;&nbsp;part | 0.5 |" in table


def test_expert_weights_are_read_one_layer_at_a_time_without_copies():
    from core.model_access.wrapper import MoEModelWrapper
    from tests.tiny_models import build

    model = build("olmoe")
    w = MoEModelWrapper(model)
    experts = w.get_expert_weights()
    assert not isinstance(experts, dict) and sorted(experts) == w.moe_layers
    info = w.layers[0]
    fused = dict(model.named_modules())[info.experts_path].gate_up_proj
    up = experts[info.layer]["up"]
    assert up.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # a view of float32 CPU weights


def test_batched_bases_equal_one_at_a_time():
    from core.analysis.expert_alignment import experts_per_batch, input_basis, input_bases

    a = torch.randn(5, 24, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i, (s, right) in enumerate(input_bases(a)):
        s1, right1 = input_basis(a[i])
        np.testing.assert_allclose(s, s1, rtol=1e-10)
        p, p1 = right(6), right1(6)
        torch.testing.assert_close(p @ p.T, p1 @ p1.T)  # the same subspace (signs may differ)
    assert experts_per_batch(2048, 2048) == 5 and experts_per_batch(10**6, 10**6) == 1


def test_alignment_reads_each_layer_when_its_turn_comes(monkeypatch):
    """One layer's expert weights in memory at a time: a layer is read only after the previous one is decomposed."""
    from collections.abc import Mapping

    import core.analysis.expert_alignment as ea

    events = []
    g = torch.Generator().manual_seed(0)
    weights = {l: {"gate": torch.randn(4, 6, 8, generator=g), "up": torch.randn(4, 6, 8, generator=g)} for l in range(3)}

    class Lazy(Mapping):
        def __getitem__(self, layer):
            events.append(("read", layer))
            return weights[layer]

        def __iter__(self):
            return iter(weights)

        def __len__(self):
            return len(weights)

    real = ea.input_bases
    monkeypatch.setattr(ea, "input_bases", lambda a: events.append(("decompose",)) or real(a))
    routers = {l: torch.randn(4, 8, generator=g) for l in range(3)}
    ea.ExpertAnalyzer(score_fn="softmax").analyze_expert_router_alignment(Lazy(), routers, num_permutations=10)
    reads = [i for i, e in enumerate(events) if e[0] == "read"]
    assert [events[i][1] for i in reads] == [0, 1, 2]
    assert all(events[i - 1] == ("decompose",) for i in reads[1:])
