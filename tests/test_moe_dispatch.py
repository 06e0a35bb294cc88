"""The grouped expert dispatch against the reference loop: forward and every gradient, drops and padding included."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from core.study_moe import dispatch as dispatch_module
from core.study_moe.dispatch import check_dispatch, grouped_mm_supported, sorted_assignments
from core.study_moe.layer import StudyMoeExperts, StudyMoeSparseBlock

HIDDEN, INTERMEDIATE = 16, 12


def block_pair(experts: int, top_k: int, capacity: float | None, dtype=torch.float32):
    """A loop block and a grouped block with the same random weights."""
    def config(name):
        return SimpleNamespace(num_experts=experts, num_experts_per_tok=top_k, hidden_size=HIDDEN,
                               intermediate_size=INTERMEDIATE, hidden_act="silu", routing="topk", norm_topk_prob=False,
                               capacity_factor=capacity, router_jitter_noise=0.0, expert_dispatch=name)

    torch.manual_seed(experts * 10 + top_k)
    loop = StudyMoeSparseBlock(config("loop")).to(dtype)
    with torch.no_grad():
        for p in loop.parameters():
            p.normal_(0, 0.3)
    grouped = StudyMoeSparseBlock(config("grouped")).to(dtype)
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def run_block(block, x, mask):
    """Output and the gradients of input, router and both expert weights for a fixed upstream gradient."""
    block.zero_grad(set_to_none=True)
    inp = x.clone().requires_grad_(True)
    out = block(inp, mask)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    return out.detach(), inp.grad, block.gate.weight.grad, block.experts.gate_up_proj.grad, block.experts.down_proj.grad


@pytest.mark.parametrize("experts,top_k", [(8, 2), (8, 8), (64, 2), (64, 8)])
@pytest.mark.parametrize("capacity", [None, 0.5])
def test_grouped_equals_loop_forward_and_backward(experts, top_k, capacity):
    loop, grouped = block_pair(experts, top_k, capacity)
    x = torch.randn(3, 40, HIDDEN)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 25:] = False  # padding: no capacity, weight 0 on every slot
    mask[2, :7] = False
    assert grouped_mm_supported(x, grouped.experts.gate_up_proj, grouped.experts.down_proj)
    names = ("output", "input grad", "router grad", "gate_up grad", "down grad")
    for name, a, b in zip(names, run_block(loop, x, mask), run_block(grouped, x, mask)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    if capacity is not None:  # the capacity limit really dropped assignments, so the test covers them
        assert int(grouped.gate.last_num_dropped) > 0
    assert (run_block(grouped, x, mask)[0][~mask] == 0).all()  # padding gets nothing from the experts


def test_grouped_issues_two_grouped_matmuls_whatever_the_expert_count(monkeypatch):
    calls = []
    original = F.grouped_mm
    monkeypatch.setattr(dispatch_module.F, "grouped_mm", lambda *a, **kw: (calls.append(1), original(*a, **kw))[1])
    loop, grouped = block_pair(64, 8, None)
    grouped.experts.expert_forward = None  # the per-expert path must not run
    run_block(grouped, torch.randn(2, 9, HIDDEN), None)
    assert len(calls) == 2


def test_grouped_falls_back_to_the_loop_where_the_kernel_refuses():
    loop, grouped = block_pair(8, 2, 1.0, dtype=torch.float64)  # the kernel has no float64
    x = torch.randn(2, 30, HIDDEN, dtype=torch.float64)
    assert not grouped_mm_supported(x, grouped.experts.gate_up_proj, grouped.experts.down_proj)
    for a, b in zip(run_block(loop, x, None), run_block(grouped, x, None)):
        assert torch.equal(a, b)
    odd = torch.empty(4, 2 * 6, 15)  # hidden 15 floats: rows not 16-byte aligned
    assert not grouped_mm_supported(torch.empty(3, 15), odd, torch.empty(4, 15, 6))


def test_every_assignment_dropped_gives_zeros_in_both():
    loop, grouped = block_pair(8, 2, None)
    x = torch.randn(5, HIDDEN)
    index, weights = torch.tensor([[0, 8]] * 5), torch.zeros(5, 2)  # weight 0 (dropped) or the sentinel E
    for experts in (loop.experts, grouped.experts):
        assert torch.equal(experts(x, index, weights), torch.zeros_like(x))


def test_sorted_assignments_keep_token_order_within_an_expert():
    index = torch.tensor([[2, 0], [0, 1], [2, 3]])
    weights = torch.tensor([[0.5, 0.0], [0.25, 0.75], [0.125, 0.5]])
    got = sorted_assignments(index, weights, num_experts=3)  # (0, slot 1) dropped, expert 3 is the sentinel
    assert got.expert.tolist() == [0, 1, 2, 2] and got.token.tolist() == [1, 1, 0, 2]
    assert got.weight.tolist() == [0.25, 0.75, 0.5, 0.125] and got.counts.tolist() == [1, 1, 2]


def test_an_unknown_dispatch_is_refused():
    with pytest.raises(ValueError, match="expert_dispatch must be one of"):
        check_dispatch("bmm")
    with pytest.raises(ValueError, match="expert_dispatch"):
        StudyMoeExperts(SimpleNamespace(num_experts=2, hidden_size=4, intermediate_size=4, hidden_act="silu",
                                        expert_dispatch="fast"))
