"""Every causal-LM MoE family of the installed transformers, built tiny: traced routing is the model's own.

The families are enumerated from transformers itself (every causal-LM class whose model declares
router outputs), so a new release's families are tested without editing a table. A family that
cannot be built tiny is skipped with its reason (``MOE_SKIPS``); one that fails inside the toolkit
is a bug.
"""

from __future__ import annotations

import pytest
import torch

from core.model_access.wrapper import MoEModelWrapper, expert_logits
from tests.tiny_models import MOE_SKIPS, VOCAB, build_moe_family, moe_causal_lm_families

FAMILIES = moe_causal_lm_families()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two short rows, the second right-padded."""
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _reference_logits(model: torch.nn.Module, w: MoEModelWrapper, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The model's own ``output_router_logits=True`` outputs, as ``[N, E]`` (product-key scores combined)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    info = w.layers[0]
    return [expert_logits(lg, info) for lg in (out.router_logits or ()) if lg is not None]


def test_enumeration_finds_the_known_families():
    for name in ("olmoe", "mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "jetmoe"):
        assert name in FAMILIES, sorted(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_traced_routing_equals_model_outputs(model_type: str):
    if model_type in MOE_SKIPS:
        pytest.skip(MOE_SKIPS[model_type])
    model = build_moe_family(model_type, FAMILIES[model_type])
    w = MoEModelWrapper(model)
    ids, mask = _batch()
    routing = w.trace_routing(ids, mask)
    keep = mask.reshape(-1).bool()
    n_layers = len(w.moe_layers)
    assert routing.router_logits.shape == (int(mask.sum()), n_layers, w.num_experts)
    assert routing.topk_idx.shape == (int(mask.sum()), n_layers, w.top_k)
    assert ((routing.topk_idx >= -1) & (routing.topk_idx < w.num_experts)).all()

    ref = _reference_logits(model, w, ids, mask)
    # dense layers record nothing; a family with routers in attention too (JetMoE) records more per layer,
    # and each traced layer must be one of them, in order
    assert len(ref) >= n_layers > 0, f"{model_type}: model recorded {len(ref)} router outputs, wrapper found {n_layers} layers"
    if len(ref) == n_layers:
        matched = list(range(n_layers))
    else:
        matched, j = [], 0
        for i in range(n_layers):
            while j < len(ref) and not torch.allclose(routing.router_logits[:, i], ref[j][keep], rtol=0, atol=1e-6):
                j += 1
            matched.append(j)
            j += 1
        assert matched[-1] < len(ref), f"{model_type}: traced layers do not appear among the model's router outputs"
    for i, j in enumerate(matched):
        torch.testing.assert_close(routing.router_logits[:, i], ref[j][keep], rtol=0, atol=1e-6,
                                   msg=lambda m: f"{model_type} layer {w.moe_layers[i]}: {m}")

    # the nnsight trace (what runs remotely) records exactly what the local hooks record
    hidden = (0, len(w.model.layers) - 1)
    by_hooks = w.trace_routing(ids, mask, hidden_layers=hidden)
    w.engine = "nnsight"
    by_nnsight = w.trace_routing(ids, mask, hidden_layers=hidden)
    for name in ("router_logits", "topk_idx", "topk_weight", "token_ids", "positions"):
        assert torch.equal(getattr(by_hooks, name), getattr(by_nnsight, name)), f"{model_type}: {name} differs between engines"
    assert by_hooks.hidden.keys() == by_nnsight.hidden.keys() == set(hidden)
    for layer in hidden:
        assert torch.equal(by_hooks.hidden[layer], by_nnsight.hidden[layer]), f"{model_type}: hidden state {layer} differs"
