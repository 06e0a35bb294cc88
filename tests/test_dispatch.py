"""A model spread over devices by accelerate (here: part of it offloaded to disk) routes, reads and ablates as the whole model does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.model_access.loading import Placement, is_dispatched, parse_max_memory
from core.model_access.wrapper import MoEModelWrapper
from tests.tiny_models import VOCAB, build


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same tiny OLMoE whole, and dispatched with its last two layers offloaded to disk."""
    root = tmp_path_factory.mktemp("dispatch")
    model = build("olmoe", seed=1)
    model.save_pretrained(root / "model")
    layers = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": ("cpu" if i == 0 else "disk") for i in range(layers)}}
    placed = MoEModelWrapper(str(root / "model"), placement=Placement(device_map, offload_folder=str(root / "offload")))
    return MoEModelWrapper(model), placed


def test_the_model_really_is_dispatched_with_weights_off_the_host(pair):
    _, placed = pair
    assert is_dispatched(placed.hf_model) and placed.device == "cpu"
    assert "meta" in {p.device.type for p in placed.hf_model.parameters()}  # offloaded weights live on disk between forwards


@pytest.mark.parametrize("engine", ["hooks", "nnsight"])
def test_routing_is_identical_to_the_whole_model(pair, engine):
    whole, placed = pair
    placed.engine = engine
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    a, b = whole.trace_routing(ids, mask), placed.trace_routing(ids, mask, hidden_layers=[1])
    placed.engine = "hooks"
    assert torch.equal(a.topk_idx, b.topk_idx) and torch.equal(a.router_logits, b.router_logits)
    assert torch.equal(a.topk_weight, b.topk_weight) and b.hidden[1].shape[0] == a.num_tokens


def test_weights_and_ablation_are_identical_to_the_whole_model(pair):
    from core.analysis.expert_alignment import ExpertAnalyzer

    whole, placed = pair
    for (la, ra), (lb, rb) in zip(whole.get_router_weights().items(), placed.get_router_weights().items()):
        assert la == lb and torch.equal(ra, rb)
    ea, eb = whole.get_expert_weights(), placed.get_expert_weights()
    for layer in ea:
        assert all(torch.equal(ea[layer][k], eb[layer][k]) for k in ("gate", "up", "down"))
    assert {p.device.type for p in placed.hf_model.parameters()} >= {"meta"}  # read, then offloaded again
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(whole.forward_loss(ids, ablate={2: [0, 3]}), placed.forward_loss(ids, ablate={2: [0, 3]}),
                               equal_nan=True)
    ra = ExpertAnalyzer(whole).analyze_expert_router_alignment(num_permutations=20)
    rb = ExpertAnalyzer(placed).analyze_expert_router_alignment(num_permutations=20)
    np.testing.assert_array_equal(ra.cross, rb.cross)


def test_max_memory_and_device_map_options():
    from core.pipeline.options import OptionsError, make_options

    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    with pytest.raises(ValueError, match="0=70GiB"):
        parse_max_memory("lots")
    assert make_options(device_map="auto", max_memory="cpu=2GiB").model.max_memory == "cpu=2GiB"
    with pytest.raises(OptionsError, match="with --device-map only"):
        make_options(max_memory="cpu=2GiB")
    with pytest.raises(OptionsError, match="device-map must be one of"):
        make_options(device_map="everywhere")


def test_the_run_options_open_a_dispatched_model(pair, tmp_path):
    """--device-map auto --max-memory cpu=...: what does not fit the host's budget goes to <models-dir>/offload."""
    from core.pipeline.targets import ModelTarget, open_wrapper
    from core.pipeline.options import make_options
    from core.collection.checkpoints import Checkpoint

    whole, placed = pair
    folder = placed.model_name
    opts = make_options(model=folder, device_map="auto", max_memory="cpu=60KB", models_dir=str(tmp_path / "models"))
    target = ModelTarget(name="tiny", source=folder, revision=None, checkpoints=[Checkpoint("main", path=folder)],
                         embedded=False)
    w = open_wrapper(target, target.final, opts)
    assert is_dispatched(w.hf_model) and "disk" in set(w.hf_model.hf_device_map.values())
    assert any((tmp_path / "models" / "offload").iterdir())
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(w.trace_routing(ids).topk_idx, whole.trace_routing(ids).topk_idx)
