"""MoEModelWrapper on tiny random models of many families: the traced routing is what the model did."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.model_access.wrapper import ModelLoadError, MoEModelWrapper
from core.model_access.discovery import MoESpec, NoRoutersError
from tests.tiny_models import FAMILIES, VOCAB, build

FAMILY_NAMES = sorted(FAMILIES)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _experts_inputs(model: nn.Module, w: MoEModelWrapper, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple]:
    """What each experts module received, captured with plain PyTorch hooks (independent of nnsight)."""
    got: list[tuple] = []
    mods = dict(model.named_modules())
    handles = [
        mods[info.experts_path].register_forward_pre_hook(lambda m, args: got.append((args[1].clone(), args[2].clone())))
        for info in w.layers
    ]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    return got, out


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    model = build(request.param)
    return request.param, model, MoEModelWrapper(model)


def test_traced_routing_equals_model_outputs(family):
    name, model, w = family
    ids, mask = _batch()
    routing = w.trace_routing(ids, mask)
    received, out = _experts_inputs(model, w, ids, mask)
    keep = mask.reshape(-1).bool()
    assert len(out.router_logits) == len(w.moe_layers), name
    assert routing.num_tokens == int(mask.sum())
    for i in range(len(w.moe_layers)):
        torch.testing.assert_close(routing.router_logits[:, i], out.router_logits[i].float()[keep], rtol=0, atol=1e-6)
        idx, wts = received[i]
        assert torch.equal(routing.topk_idx[:, i], idx.long()[keep]), f"{name} layer {w.moe_layers[i]} selection"
        torch.testing.assert_close(routing.topk_weight[:, i], wts.float()[keep], rtol=0, atol=1e-6)
    assert routing.topk_idx.shape == (routing.num_tokens, len(w.moe_layers), w.top_k)
    # each token goes to k distinct experts
    assert all(len(set(row.tolist())) == w.top_k for row in routing.topk_idx.reshape(-1, w.top_k))


def test_padding_is_excluded(family):
    _, _, w = family
    ids, mask = _batch(1)
    routing = w.trace_routing(ids, mask)
    assert torch.equal(routing.token_ids, ids[mask.bool()])
    assert torch.equal(routing.positions, torch.arange(ids.shape[1]).expand_as(ids)[mask.bool()])
    assert (routing.token_ids != 0).all()


def test_model_facts(family):
    name, model, w = family
    cfg = model.config
    assert w.num_layers == cfg.num_hidden_layers
    expected_dense = {"qwen2_moe": [0], "deepseek_v3": [0], "glm4_moe": [0], "ernie4_5_moe": [0]}.get(name, [])
    assert w.moe_layers == [i for i in range(cfg.num_hidden_layers) if i not in expected_dense]
    assert (w.num_experts, w.top_k) == (8, 2)
    has_shared = name in ("qwen2_moe", "deepseek_v3", "glm4_moe")
    assert all((n > 0) == has_shared for n in w.shared_experts.values()), w.shared_experts
    assert w.score_fn == ("sigmoid" if name in ("deepseek_v3", "glm4_moe") else "softmax")


def test_router_weights_match_parameters(family):
    _, model, w = family
    mods = dict(model.named_modules())
    weights = w.get_router_weights()
    assert sorted(weights) == w.moe_layers
    for info in w.layers:
        assert weights[info.layer].shape == (8, 32)
        torch.testing.assert_close(weights[info.layer], mods[info.router_path].weight.detach().float())


def test_expert_weights_reproduce_each_expert(family):
    """Running x through the extracted gate/up/down gives what the experts module computes for expert e."""
    name, model, w = family
    mods = dict(model.named_modules())
    experts_w = w.get_expert_weights()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    for info in w.layers:
        mod = mods[info.experts_path]
        mats = experts_w[info.layer]
        n_exp, inter, hidden = mats["up"].shape
        assert (n_exp, hidden) == (8, 32) and mats["down"].shape == (8, 32, inter)
        assert mats["gate"] is not None and mats["gate"].shape == mats["up"].shape
        for e in (0, 5):
            with torch.no_grad():
                ref = mod(x, torch.full((4, 1), e), torch.ones(4, 1))
            gate, up = x @ mats["gate"][e].T, x @ mats["up"][e].T
            if name == "gpt_oss":  # biased, clamped SwiGLU: check through the module's own gate function
                gb, db = mod.gate_up_proj_bias[e].detach(), mod.down_proj_bias[e].detach()
                inter_act = mod._apply_gate(torch.stack([gate + gb[::2], up + gb[1::2]], dim=-1).flatten(-2))
                mine = inter_act @ mats["down"][e].T + db
            else:
                mine = (mod.act_fn(gate) * up) @ mats["down"][e].T
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


def test_deepseek_selection_is_what_experts_received_not_topk_of_logits():
    """A large correction bias on expert 0 makes the real selection differ from top-k of the logits."""
    model = build("deepseek_v3", seed=1)
    for name, b in model.named_buffers():
        if "e_score_correction_bias" in name:
            b.zero_()
            b[0] = 10.0
    w = MoEModelWrapper(model)
    ids, mask = _batch(2)
    routing = w.trace_routing(ids, mask)
    assert (routing.topk_idx == 0).any(dim=-1).all(), "expert 0 must be selected for every token"
    naive = routing.router_logits.topk(w.top_k, dim=-1).indices
    assert not torch.equal(naive.sort(-1).values, routing.topk_idx.sort(-1).values)


def test_hidden_states_entering_a_layer():
    model = build("olmoe")
    w = MoEModelWrapper(model)
    ids, mask = _batch()
    routing = w.trace_routing(ids, mask, hidden_layers=(1,))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(routing.hidden[1], out.hidden_states[1][mask.bool()], rtol=0, atol=1e-6)


def test_local_directory_round_trip(tmp_path):
    model = build("olmoe")
    model.save_pretrained(tmp_path / "tiny-olmoe")
    w = MoEModelWrapper(str(tmp_path / "tiny-olmoe"))
    ids, mask = _batch()
    torch.testing.assert_close(w.trace_routing(ids, mask).router_logits, MoEModelWrapper(model).trace_routing(ids, mask).router_logits)


def test_undeclared_router_found_structurally_or_by_spec():
    """A model that declares no router output is still found, and a MoESpec names routers explicitly."""
    from transformers import OlmoeForCausalLM, OlmoeModel

    class Undeclared(OlmoeModel):
        _can_record_outputs = {}

    class UndeclaredLM(OlmoeForCausalLM):
        _can_record_outputs = {}

        def __init__(self, config):
            super().__init__(config)
            self.model = Undeclared(config)

    ref = build("olmoe")
    model = UndeclaredLM(ref.config).eval()
    model.load_state_dict(ref.state_dict())
    w = MoEModelWrapper(model)
    assert w.moe_layers == [0, 1, 2]
    spec_w = MoEModelWrapper(model, moe_spec={"router": r"model\.layers\.\d+\.mlp\.gate", "experts": "experts"})
    ids, mask = _batch()
    torch.testing.assert_close(w.trace_routing(ids, mask).router_logits, spec_w.trace_routing(ids, mask).router_logits)
    with pytest.raises(NoRoutersError, match="no module name matches"):
        MoEModelWrapper(model, moe_spec=MoESpec(router=r"nothing\.here"))


def test_dense_model_is_refused_in_one_line():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(NoRoutersError) as err:
        MoEModelWrapper(LlamaForCausalLM(cfg))
    msg = str(err.value)
    assert "LlamaForCausalLM has no MoE routers" in msg and "\n" not in msg


def test_unreachable_hub_name_is_one_clear_error():
    with pytest.raises(ModelLoadError) as err:
        MoEModelWrapper("allenai/OLMoE-1B-7B-0924", revision="step5000-tokens20B")
    msg = str(err.value)
    assert "allenai/OLMoE-1B-7B-0924" in msg and "could not fetch" in msg and "\n" not in msg
    assert err.value.__cause__ is None or err.value.__suppress_context__


def test_bad_token_input_is_one_clear_line():
    from tests.tiny_models import VOCAB, build

    w = MoEModelWrapper(build("olmoe", seed=0))
    for bad, says in ((torch.zeros((0, 5), dtype=torch.long), "nothing to trace"),
                      (torch.tensor([[3, VOCAB + 7, 4]]), f"token ids must lie in \\[0, {VOCAB}\\)"),
                      (torch.tensor([[-2, 3]]), "token ids must lie"),
                      (torch.tensor([[0.5, 1.0]]), "integer token ids")):
        with pytest.raises(ValueError, match=says):
            w.trace_routing(bad)
    with pytest.raises(ValueError, match="nothing to trace"):
        w.trace_routing(torch.tensor([[3, 4]]), torch.zeros((1, 2), dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie"):  # padding is embedded too
        w.trace_routing(torch.tensor([[3, 4, 999]]), torch.tensor([[1, 1, 0]]))
    assert w.trace_routing(torch.tensor([[3, 4, 0]]), torch.tensor([[1, 1, 0]])).num_tokens == 2
