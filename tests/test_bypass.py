"""The hooks engine sets nnsight's instrumentation aside for its forward only, and honours every other hook."""

from __future__ import annotations

import torch

from core.model_access.wrapper import MoEModelWrapper
from tests.tiny_models import build


def _state(model: torch.nn.Module) -> list:
    return [(m._forward_pre_hooks, list(m._forward_pre_hooks), m._forward_hooks, list(m._forward_hooks),
             m.__dict__.get("forward")) for m in model.modules()]


def test_instrumentation_is_put_back_and_other_hooks_still_run():
    w = MoEModelWrapper(build("olmoe"))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _state(w.hf_model)
    assert any(keys for _, keys, _, _, _ in before)  # nnsight did instrument the modules
    first = w.trace_routing(ids)
    after = _state(w.hf_model)
    assert all(a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3] and a[4] is b[4] for a, b in zip(before, after))
    # a hook of the user's, registered after the plan was made, runs inside the bypassed forward
    seen = []
    router = w._modules[w.layers[0].router_path]
    handle = router.register_forward_hook(lambda m, a, o: seen.append(1))
    w.trace_routing(ids)
    handle.remove()
    w.trace_routing(ids)
    assert seen == [1]
    # the nnsight engine still traces through the instrumentation, and agrees
    again = MoEModelWrapper(w.hf_model, engine="nnsight").trace_routing(ids)
    assert torch.equal(first.topk_idx, again.topk_idx) and torch.equal(first.router_logits, again.router_logits)


def test_a_tracing_session_sets_it_aside_once_and_puts_it_back_exactly():
    """A collection opens one bypass around all its batches; each batch's own block inside is free, and the outer
    block restores every module as it was. Traces inside equal traces outside."""
    w = MoEModelWrapper(build("olmoe"))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    before, alone = _state(w.hf_model), w.trace_routing(ids)
    with w.tracing_session():
        inside = _state(w.hf_model)
        assert not any(keys for _, keys, _, _, _ in inside)  # no nnsight hook while the session is open
        runs = [w.trace_routing(ids) for _ in range(2)]
        assert _state(w.hf_model) == inside  # the batches' own blocks swapped nothing
    after = _state(w.hf_model)
    assert all(a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3] and a[4] is b[4] for a, b in zip(before, after))
    for r in runs:
        assert torch.equal(r.topk_idx, alone.topk_idx) and torch.equal(r.router_logits, alone.router_logits)
    assert torch.equal(w.trace_routing(ids).topk_idx, alone.topk_idx)
