"""JetMoE routes twice per layer: its attention heads (a mixture of attention experts) and its feed-forward experts.

Both kinds are traced, each by its own wrapper, with the weights the block computes (a softmax
over the k chosen logits): recomputing each block's output from the traced experts and weights
gives the block's own output. A study of one kind says, in one line, that the other was not traced.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.model_access.discovery import NoRoutersError
from core.model_access.wrapper import MoEModelWrapper
from tests.test_all_moe_families import FAMILIES, _batch
from tests.tiny_models import build_moe_family


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_moe_family("jetmoe", FAMILIES["jetmoe"])


def _mlp_output(mlp: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """JetMoeMoE's output for ``[n, H]`` tokens from their experts and weights: a weighted sum of GLU experts, plus the bias."""
    a, b = torch.einsum("nkoh,nh->nko", mlp.input_linear.weight[idx], x).chunk(2, dim=-1)
    out = torch.einsum("nkhi,nki->nkh", mlp.output_linear.weight[idx], mlp.activation(a) * b)
    return (out * w[..., None]).sum(1) + mlp.bias


def _attention_output(moa: torch.nn.Module, heads: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """JetMoeMoA.reduce's output from each token's k attention-expert outputs ``[n, k, d]`` (slot j: its j-th expert)."""
    out = torch.einsum("nkhd,nkd->nkh", moa.output_linear.weight[idx], heads)
    return (out * w[..., None]).sum(1) + moa.bias


def test_feed_forward_weights_rebuild_the_block_output(model: torch.nn.Module):
    w = MoEModelWrapper(model)
    assert w.router_kind == "feed_forward" and all(info.router_path.endswith("mlp.router") for info in w.layers)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0], o)))
               for i, layer in enumerate(model.model.layers)]
    ids, mask = _batch()
    try:
        routing = w.trace_routing(ids, mask)
    finally:
        for h in handles:
            h.remove()
    keep = mask.reshape(-1).bool()
    assert torch.allclose(routing.topk_weight.sum(-1), torch.ones(()), atol=1e-6)  # a softmax over the k chosen
    for i, layer in enumerate(w.moe_layers):
        x, out = (t.reshape(-1, t.shape[-1])[keep] for t in seen[layer])
        with torch.no_grad():
            again = _mlp_output(model.model.layers[layer].mlp, x, routing.topk_idx[:, i], routing.topk_weight[:, i])
        torch.testing.assert_close(again, out, rtol=0, atol=1e-6)


def test_attention_routers_are_their_own_kind(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch):
    w = MoEModelWrapper(model, router_kind="attention")
    assert w.router_kinds == {"feed_forward": [0, 1], "attention": [0, 1]}
    assert [info.router_path for info in w.layers] == [f"model.layers.{i}.self_attention.experts.router" for i in (0, 1)]
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(model.model.layers):
        moa = layer.self_attention.experts

        def reduce(heads: torch.Tensor, topo: Any, i: int = i, original: Any = moa.reduce) -> torch.Tensor:
            out = original(heads, topo)
            seen[i] = (heads, out)
            return out
        monkeypatch.setattr(moa, "reduce", reduce)
    ids, mask = _batch()
    routing = w.trace_routing(ids, mask)
    keep = mask.reshape(-1).bool()
    for i, layer in enumerate(w.moe_layers):
        heads, out = seen[layer]
        heads = heads.reshape(-1, *heads.shape[2:])[keep]
        with torch.no_grad():
            again = _attention_output(model.model.layers[layer].self_attention.experts, heads,
                                      routing.topk_idx[:, i], routing.topk_weight[:, i])
        torch.testing.assert_close(again, out.reshape(-1, out.shape[-1])[keep], rtol=0, atol=1e-6)


def test_each_kind_names_the_other_in_one_line_and_in_its_identity(model: torch.nn.Module):
    from core.collection.loaded_identity import wrapper_identity
    from core.pipeline.findings import warnings_of
    from core.pipeline.record import RunRecord

    ff, attn = MoEModelWrapper(model), MoEModelWrapper(model, router_kind="attention")
    (line,) = ff.describe()["warnings"]
    assert "attention routers (layers [0, 1])" in line and "router_kind='attention'" in line and "\n" not in line
    assert "feed-forward routers" in attn.describe()["warnings"][0]
    record = RunRecord(options={}, model=ff.describe(), datasets=(), tokens={}, checkpoints=(), results={})
    assert warnings_of(record) == [line]  # the run's warnings (metrics.json, report, summary.md, printed)
    assert wrapper_identity(ff) != wrapper_identity(attn)  # one kind's cache is never read as the other's
    assert wrapper_identity(ff) == wrapper_identity(MoEModelWrapper(model, router_kind="feed_forward"))


def test_a_kind_the_model_lacks_is_refused_in_one_line():
    olmoe = build_moe_family("olmoe", FAMILIES["olmoe"])
    assert MoEModelWrapper(olmoe).describe()["warnings"] == []
    with pytest.raises(NoRoutersError, match="has no attention routers; its routers are: feed_forward"):
        MoEModelWrapper(olmoe, router_kind="attention")
    with pytest.raises(ValueError, match="router_kind must be one of feed_forward, attention"):
        MoEModelWrapper(olmoe, router_kind="mlp")


def test_the_weight_rule_is_part_of_the_identity_where_the_toolkit_computes_the_weights(model: torch.nn.Module):
    """JetMoE's weights are computed by the toolkit (softmax over the chosen logits): caches written with the old
    full-softmax weights must not be reused, so the rule is in the identity. It is known before any forward pass only
    as "the layer renormalizes and its experts are not handed the selection", which Mixtral (its router's tuple carries
    them) shares: its caches are collected once more. OLMoE (no renormalization) keeps its identity and caches."""
    from core.collection.loaded_identity import wrapper_identity

    assert wrapper_identity(MoEModelWrapper(model))["weight_rule"] == "renormalized over the chosen experts"
    olmoe = build_moe_family("olmoe", FAMILIES["olmoe"])
    assert "weight_rule" not in wrapper_identity(MoEModelWrapper(olmoe))
