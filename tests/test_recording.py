"""How routing leaves a forward pass: hooks that leave nothing behind, and one packed host copy."""

from __future__ import annotations

import pytest
import torch

from core.model_access.host_copy import pack, start_host_copy, unpack
from core.model_access.wrapper import MoEModelWrapper
from tests.tiny_models import build


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_pack_round_trips_mixed_dtypes_and_odd_sizes():
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(7, 3, 5, generator=g).to(torch.bfloat16),
        torch.randint(-1, 64, (7, 3, 8), generator=g).to(torch.int16),
        torch.randn(7, 3, generator=g),
        torch.randn(3, generator=g).to(torch.float16),
        torch.arange(5, dtype=torch.int64),
        torch.zeros(0, 4),
    ]
    buffer, layout = pack(tensors)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    assert [o % 8 for o, _, _ in layout] == [0] * len(tensors)  # every segment can be viewed as any dtype
    for got, want in zip(unpack(buffer, layout), tensors):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_cpu_tensors_are_handed_back_without_a_copy():
    t = torch.randn(4, 2)
    (back,) = start_host_copy([t]).wait()
    assert back.data_ptr() == t.data_ptr()


@pytest.mark.parametrize("engine", ["hooks", "nnsight"])
def test_tracing_leaves_no_hooks_and_no_scan_leftovers(engine):
    model = build("olmoe")
    w = MoEModelWrapper(model, engine=engine)
    assert not any("ScanningTracer" in getattr(h, "__qualname__", "") for m in model.modules() for h in m._forward_hooks.values())
    before = _hook_count(model)
    ids = torch.randint(3, 64, (2, 6))
    w.trace_routing(ids, hidden_layers=[0])
    assert _hook_count(model) == before


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="engine must be 'hooks' or 'nnsight'"):
        MoEModelWrapper(build("olmoe"), engine="torch")
