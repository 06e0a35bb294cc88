"""Every causal-LM MoE family of the installed transformers, built tiny: traced routing is the model's own.

The families are enumerated from transformers itself (every causal-LM class whose model declares
router outputs), so a new release's families are tested without editing a table. Traced logits are
the model's own ``output_router_logits``, every one of them traced by some kind of router, and
traced experts and weights are those the block uses (its experts module's input; where a block keeps
them, what it computes them into). A family that
cannot be built tiny is skipped with its reason (``MOE_SKIPS``); one that fails inside the toolkit
is a bug.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from core.model_access.discovery import MoELayerInfo as LayerInfo
from core.model_access.router_outputs import expert_logits
from core.model_access.wrapper import MoEModelWrapper
from tests.tiny_models import MOE_SKIPS, VOCAB, build_moe_family, moe_causal_lm_families

# The families as the installed transformers enumerates them, saved (tests/moe_families.json): enumerating imports every
# causal-LM module of transformers (6 s, and their bytecode compiled on a clean clone) at collection, in each worker
FAMILIES: dict[str, str] = json.loads((Path(__file__).parent / "moe_families.json").read_text())


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


def test_the_saved_families_are_those_of_the_installed_transformers():
    """Another transformers with other MoE families fails here, saying how to save them again."""
    import transformers

    live = moe_causal_lm_families()
    assert live == FAMILIES, (
        f"transformers {transformers.__version__} has other MoE families (added {sorted(set(live) - set(FAMILIES))}, "
        f"gone {sorted(set(FAMILIES) - set(live))}); save them: uv run python -c \"import json; from tests.tiny_models "
        "import moe_causal_lm_families as f; open('tests/moe_families.json', 'w').write(json.dumps(f(), indent=1, "
        "sort_keys=True) + '\\n')\"")


def _distinct(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors with repeats left out (JetMoE records its attention gate's logits twice: gate and attention)."""
    out: list[torch.Tensor] = []
    for t in tensors:
        if not any(t.shape == o.shape and torch.equal(t, o) for o in out):
            out.append(t)
    return out


def _experts_input(info: LayerInfo) -> Callable:
    """A pre-hook reading the experts module's selection: the two arguments after the hidden states, (indices, weights)."""
    def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        names = [n for n in inspect.signature(module.forward).parameters if n != "self"]  # some wrapped forwards show self
        given = {**dict(zip(names, args)), **kwargs}
        idx, wts = given[names[1]], given[names[2]]
        assert not idx.is_floating_point() and wts.is_floating_point(), f"{info.experts_path}: not (indices, weights)"
        return idx, wts
    return hook


def _jetmoe_gates(module: torch.nn.Module, args: Any, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """JetMoE's gate returns its choice grouped by expert: each slot's expert and the gate that multiplies its output."""
    sorted_slots, _, gates, expert_size, logits = out
    n, k = logits.shape[0], module.top_k
    idx, wts = torch.empty(n * k, dtype=torch.long), torch.empty(n * k)
    idx[sorted_slots] = torch.repeat_interleave(torch.arange(module.num_experts), torch.tensor(expert_size))
    wts[sorted_slots] = gates.float()
    return idx.view(n, k), wts.view(n, k)


def _llama4_scores(module: torch.nn.Module, args: Any, out: Any) -> torch.Tensor:
    """Llama 4's router hands its block dense ``[N, E]`` scores (zero off the chosen experts) that scale each expert's input."""
    return out[0]


def _doge_output(module: torch.nn.Module, args: Any, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Doge mixes its experts inside the block: its input and output, to recompute the output from traced weights."""
    return args[0], out[0]


def _doge_recomputed(module: torch.nn.Module, hidden: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    """DogeCDMoE's output for ``[n, H]`` tokens given their experts and weights (its forward, with the weights handed in)."""
    act = module.act_fn
    experts = act(torch.einsum("nkh,nh->nk", module.down_embed(idx), hidden)) * wts
    return module.down_proj(act(module.gate_proj(hidden)) * module.up_proj(hidden)) + torch.einsum("nk,nkh->nh", experts, module.up_embed(idx))


# where a block does not hand its experts module the selection, where its weights are read instead (a new
# family of that kind fails below until it is named here)
BLOCK_WEIGHTS: dict[str, Callable] = {"jetmoe": _jetmoe_gates, "llama4_text": _llama4_scores, "doge": _doge_output}


def _check_weights(model_type: str, model: torch.nn.Module, w: MoEModelWrapper, ids: torch.Tensor, mask: torch.Tensor,
                   routing: Any) -> None:
    """Traced experts and weights are those the block uses: read from the experts module's input, else per family."""
    modules = dict(model.named_modules())
    seen: dict[int, Any] = {}
    handles = []
    for i, info in enumerate(w.layers):
        if info.experts_index_arg is not None:
            hook = _experts_input(info)
            handles.append(modules[info.experts_path].register_forward_pre_hook(
                lambda m, a, kw, i=i, hook=hook: seen.__setitem__(i, hook(m, a, kw)), with_kwargs=True))
        else:
            assert model_type in BLOCK_WEIGHTS, f"{model_type}: its experts do not receive the selection; name its block's weights"
            read = BLOCK_WEIGHTS[model_type]
            handles.append(modules[info.router_path].register_forward_hook(
                lambda m, a, o, i=i, read=read: seen.__setitem__(i, read(m, a, o))))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    keep = mask.reshape(-1).bool()
    for i, info in enumerate(w.layers):
        where = f"{model_type} {info.kind} layer {info.layer}"
        idx, wts = routing.topk_idx[:, i], routing.topk_weight[:, i]
        got = seen[i]
        if model_type == "doge":
            hidden, out = (t.reshape(-1, t.shape[-1])[keep] for t in got)
            with torch.no_grad():
                again = _doge_recomputed(modules[info.router_path], hidden, idx, wts)
            torch.testing.assert_close(again, out, rtol=0, atol=1e-5, msg=lambda m: f"{where}: output from traced weights: {m}")
            continue
        if isinstance(got, torch.Tensor):  # dense scores: the chosen experts' are the weights, the rest zero
            dense = got.reshape(-1, got.shape[-1])[keep].float()
            block_idx, block_w = idx, dense.gather(1, idx)
            assert int((dense != 0).sum()) == idx.numel(), f"{where}: the block weights other experts than those traced"
        else:
            block_idx, block_w = (t.reshape(-1, t.shape[-1])[keep] for t in got)
            block_idx = block_idx.long().masked_fill(block_idx >= info.num_experts, -1)
        assert torch.equal(idx, block_idx), f"{where}: traced experts differ from the block's"
        torch.testing.assert_close(wts, block_w.float(), rtol=0, atol=1e-6, msg=lambda m: f"{where}: weights: {m}")


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_traced_routing_equals_model_outputs(model_type: str):
    if model_type in MOE_SKIPS:
        pytest.skip(MOE_SKIPS[model_type])
    model = build_moe_family(model_type, FAMILIES[model_type])
    first = MoEModelWrapper(model)
    # one wrapper per kind of router (JetMoE: feed-forward and attention), the default kind first
    wrappers = [first] + [MoEModelWrapper(model, router_kind=kind) for kind in first.router_kinds if kind != first.router_kind]
    ids, mask = _batch()
    keep = mask.reshape(-1).bool()
    ref = _distinct(_reference_logits(model, first, ids, mask))
    unmatched = list(range(len(ref)))
    for w in wrappers:
        routing = w.trace_routing(ids, mask)
        n_layers = len(w.moe_layers)
        assert n_layers > 0
        assert routing.router_logits.shape == (int(mask.sum()), n_layers, w.num_experts)
        assert routing.topk_idx.shape == (int(mask.sum()), n_layers, w.top_k)
        assert ((routing.topk_idx >= -1) & (routing.topk_idx < w.num_experts)).all()
        # every traced layer is one of the model's own router outputs, in order (dense layers record nothing)
        last = -1
        for i, layer in enumerate(w.moe_layers):
            j = next((j for j in unmatched if ref[j].shape[-1] == w.num_experts
                      and torch.allclose(routing.router_logits[:, i], ref[j][keep], rtol=0, atol=1e-6)), None)
            assert j is not None, f"{model_type} {w.router_kind} layer {layer}: traced logits are none of the model's router outputs"
            assert j > last, f"{model_type} {w.router_kind}: traced layers out of the model's order"
            unmatched.remove(j)
            last = j
        _check_weights(model_type, model, w, ids, mask, routing)
        _check_engines(model_type, w, ids, mask)
    # and every router output of the model is traced by one kind or another: none is dropped
    assert not unmatched, f"{model_type}: {len(unmatched)} of the model's {len(ref)} router outputs are traced by no wrapper"


# Ablation by hooks against ablation by nnsight, on a sample of experts modules: every family that can be ablated
# passes the selection alike (indices, then weights, by position), and both engines edit it where the module
# receives it; these differ in what the experts do with it (shared, zero-output and biased experts, own classes)
ABLATED = {"dbrx", "deepseek_v3", "gpt_oss", "granitemoe", "jamba", "longcat_flash", "mixtral", "olmoe", "qwen3_next"}


def test_the_families_ablated_by_both_engines_are_tested_families():
    assert ABLATED <= set(FAMILIES) - set(MOE_SKIPS)


def _check_engines(model_type: str, w: MoEModelWrapper, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """The nnsight trace (what runs remotely) records exactly what the local hooks record (and ablates alike: ABLATED)."""
    hidden = (0, len(w.model.layers) - 1)
    by_hooks = w.trace_routing(ids, mask, hidden_layers=hidden)
    ablatable = [i for i, info in enumerate(w.layers) if info.experts_index_arg is not None] if model_type in ABLATED else []
    # the first ablatable layer's most selected expert: removing it changes the loss
    ablate = {w.moe_layers[i]: [int(by_hooks.topk_idx[:, i, 0].mode().values)] for i in ablatable[:1]}
    loss_hooks = w.forward_loss(ids, mask, ablate=ablate) if ablate else None
    w.engine = "nnsight"
    try:
        by_nnsight = w.trace_routing(ids, mask, hidden_layers=hidden)
        loss_nnsight = w.forward_loss(ids, mask, ablate=ablate) if ablate else None
    finally:
        w.engine = "hooks"
    if ablate:
        assert torch.equal(loss_hooks.nan_to_num(-1.0), loss_nnsight.nan_to_num(-1.0)), f"{model_type}: ablation differs between engines"
    for name in ("router_logits", "topk_idx", "topk_weight", "token_ids", "positions"):
        assert torch.equal(getattr(by_hooks, name), getattr(by_nnsight, name)), f"{model_type}: {name} differs between engines"
    assert by_hooks.hidden.keys() == by_nnsight.hidden.keys() == set(hidden)
    for layer in hidden:
        assert torch.equal(by_hooks.hidden[layer], by_nnsight.hidden[layer]), f"{model_type}: hidden state {layer} differs"
