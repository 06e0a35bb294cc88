"""Router, experts and losses of the toolkit's own MoE layer, against known answers."""

import math
from types import SimpleNamespace

import pytest
import torch

from core.study_moe.layer import (
    StudyMoeExperts,
    StudyMoeSparseBlock,
    StudyMoeTopKRouter,
    capacity_keep_mask,
    expert_capacity,
    load_balancing_loss,
    random_expert_choice,
    router_z_loss,
    routing_entropy,
)


def layer_config(**kw):
    base = dict(
        num_experts=4, num_experts_per_tok=2, hidden_size=8, intermediate_size=16, hidden_act="silu",
        routing="topk", norm_topk_prob=False, capacity_factor=None, router_jitter_noise=0.0,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def init_experts(experts: StudyMoeExperts, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.3)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.3)


# ------------------------------------------------------------------ capacity
def test_expert_capacity_known_values():
    assert expert_capacity(10, 4, 2, 1.25) == 7  # ceil(1.25 * 20 / 4) = ceil(6.25)
    assert expert_capacity(8, 2, 1, 1.0) == 4
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(8, 2, 1, 0.0)


def test_capacity_keep_mask_is_slot_major():
    idx = torch.tensor([[0, 1], [0, 1], [0, 2]])
    # first choices: expert 0 three times -> the third is over capacity 2; second choices fit
    keep = capacity_keep_mask(idx, num_experts=3, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [False, True]]


def test_capacity_factor_drops_exactly_the_tokens_over_capacity():
    cfg = layer_config(num_experts=2, num_experts_per_tok=1, capacity_factor=1.0)
    router = StudyMoeTopKRouter(cfg)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 5.0  # every token with positive feature 0 prefers expert 0
    hidden = torch.ones(10, 8)
    _, weights, index = router(hidden)
    capacity = expert_capacity(10, 2, 1, 1.0)  # 5
    assert index.squeeze(1).tolist() == [0] * 10
    assert (weights[:capacity] > 0).all() and (weights[capacity:] == 0).all()
    assert int(router.last_num_dropped) == 10 - capacity

    block = StudyMoeSparseBlock(cfg)
    block.gate.load_state_dict(router.state_dict())
    init_experts(block.experts)
    out = block(hidden.reshape(1, 10, 8)).reshape(10, 8)
    assert (out[capacity:] == 0).all(), "dropped tokens must get no expert output"
    assert (out[:capacity].abs().sum(-1) > 0).all()


def test_no_capacity_factor_drops_nothing():
    router = StudyMoeTopKRouter(layer_config())
    torch.nn.init.normal_(router.weight)
    _, weights, _ = router(torch.randn(50, 8))
    assert (weights > 0).all() and int(router.last_num_dropped) == 0


# ------------------------------------------------------------------ routing
def test_topk_routing_picks_k_distinct_experts_with_router_weights():
    router = StudyMoeTopKRouter(layer_config(num_experts=6, num_experts_per_tok=3))
    torch.nn.init.normal_(router.weight)
    logits, weights, index = router(torch.randn(40, 8))
    assert index.shape == (40, 3)
    assert all(len(set(row)) == 3 for row in index.tolist())
    probs = torch.softmax(logits, dim=-1)
    assert torch.allclose(weights, probs.gather(1, index))
    assert torch.equal(index, probs.topk(3, dim=-1).indices)


def test_norm_topk_prob_makes_weights_sum_to_one():
    router = StudyMoeTopKRouter(layer_config(norm_topk_prob=True))
    torch.nn.init.normal_(router.weight)
    _, weights, _ = router(torch.randn(20, 8))
    assert torch.allclose(weights.sum(-1), torch.ones(20))


@pytest.mark.parametrize("k", [1, 2])
def test_random_routing_is_uniform_in_expectation(k):
    torch.manual_seed(0)
    n, e = 20000, 4
    idx = random_expert_choice(n, e, k)
    assert all(len(set(row)) == k for row in idx[:500].tolist())
    share = torch.bincount(idx.reshape(-1), minlength=e).float() / (n * k)
    assert torch.allclose(share, torch.full((e,), 1 / e), atol=0.01)
    if k == 2:  # every unordered pair equally likely: 6 pairs, 1/6 each
        pairs = idx.sort(dim=1).values
        codes = pairs[:, 0] * e + pairs[:, 1]
        freq = torch.bincount(codes, minlength=e * e).float()[freq_mask(e)] / n
        assert torch.allclose(freq, torch.full_like(freq, 1 / 6), atol=0.012)


def freq_mask(e):
    return torch.tensor([i < j for i in range(e) for j in range(e)])


def test_random_router_ignores_logits_and_weighs_equally():
    router = StudyMoeTopKRouter(layer_config(routing="random"))
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 100.0  # top-k routing would always pick expert 0
    torch.manual_seed(1)
    _, weights, index = router(torch.ones(4000, 8))
    assert torch.allclose(weights, torch.full_like(weights, 0.5))
    share = torch.bincount(index.reshape(-1), minlength=4).float() / index.numel()
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.02)


def test_jitter_noise_only_in_training():
    router = StudyMoeTopKRouter(layer_config(router_jitter_noise=0.5))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(30, 8)
    router.eval()
    assert torch.equal(router(x)[0], router(x)[0])
    router.train()
    assert not torch.equal(router(x)[0], router(x)[0])


def test_bad_router_config_is_one_clear_error():
    with pytest.raises(ValueError, match="routing must be one of"):
        StudyMoeTopKRouter(layer_config(routing="hash"))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        StudyMoeTopKRouter(layer_config(num_experts_per_tok=5))


# ------------------------------------------------------------------ experts
def dense_reference(experts: StudyMoeExperts, x, index, weights):
    """Every expert on every token, mixed by the routing weights (what sparse dispatch avoids)."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        y = experts.expert_forward(e, x)
        w = (weights * (index == e)).sum(-1, keepdim=True)
        out += w * y
    return out


def test_sparse_dispatch_equals_dense_mixture():
    cfg = layer_config(num_experts=5, num_experts_per_tok=2)
    experts = StudyMoeExperts(cfg)
    init_experts(experts)
    x = torch.randn(33, 8)
    router = StudyMoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    _, w, idx = router(x)
    assert torch.allclose(experts(x, idx, w), dense_reference(experts, x, idx, w), atol=1e-5)


def test_sparse_dispatch_computes_only_routed_tokens():
    experts = StudyMoeExperts(layer_config(num_experts=8, num_experts_per_tok=2, expert_dispatch="loop"))
    init_experts(experts)
    seen = []
    original = experts.expert_forward
    experts.expert_forward = lambda e, x, *w: (seen.append((e, x.shape[0])), original(e, x, *w))[1]
    idx = torch.tensor([[0, 3]] * 10 + [[3, 5]] * 4)
    experts(torch.randn(14, 8), idx, torch.full((14, 2), 0.5))
    assert sorted(seen) == [(0, 10), (3, 14), (5, 4)]  # 28 = N*k rows, 3 of 8 experts run


def test_sentinel_index_is_skipped():
    experts = StudyMoeExperts(layer_config())
    init_experts(experts)
    x = torch.randn(3, 8)
    idx = torch.tensor([[4, 4], [1, 4], [4, 2]])  # 4 == num_experts: "no expert"
    w = torch.full((3, 2), 0.5)
    out = experts(x, idx, w)
    assert (out[0] == 0).all()
    assert torch.allclose(out[1], 0.5 * experts.expert_forward(1, x[1:2])[0])


def test_activation_is_configurable():
    a = StudyMoeExperts(layer_config(hidden_act="silu"))
    b = StudyMoeExperts(layer_config(hidden_act="gelu"))
    b.load_state_dict(a.state_dict())
    init_experts(a)
    init_experts(b)
    x, idx, w = torch.randn(4, 8), torch.tensor([[0, 1]] * 4), torch.full((4, 2), 0.5)
    assert not torch.allclose(a(x, idx, w), b(x, idx, w))


# ------------------------------------------------------------------ losses
def test_load_balancing_loss_is_one_at_uniform_load_and_e_at_collapse():
    e, k = 4, 2
    uniform = torch.zeros(64, e)
    assert load_balancing_loss((uniform, uniform), e, k).item() == pytest.approx(1.0)
    collapsed = torch.zeros(64, e)
    collapsed[:, 0] = collapsed[:, 1] = 50.0
    assert load_balancing_loss(collapsed, e, k).item() == pytest.approx(e / 2, rel=1e-4)  # two experts share all


def test_load_balancing_loss_grows_with_imbalance():
    e = 4
    base = torch.randn(256, e, generator=torch.Generator().manual_seed(0))
    skew = torch.tensor([1.0, 0.0, 0.0, 0.0])
    losses = [load_balancing_loss(base * 0.01 + s * skew, e, 1).item() for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert losses[0] == pytest.approx(1.0, abs=0.02)
    assert all(a < b for a, b in zip(losses, losses[1:]))


def test_load_balancing_loss_ignores_padding():
    e = 4
    logits = torch.zeros(6, e)
    logits[3:, 0] = 30.0  # padded rows would look collapsed
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    assert load_balancing_loss(logits, e, 1, mask).item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="attention_mask"):
        load_balancing_loss(logits, e, 1, torch.ones(1, 5))


def test_router_z_loss_and_entropy_known_values():
    e = 8
    zeros = torch.zeros(10, e)
    assert router_z_loss(zeros).item() == pytest.approx(math.log(e) ** 2)
    assert torch.allclose(routing_entropy(zeros), torch.full((10,), math.log(e)))
    one_hot = torch.full((1, e), -1e4)
    one_hot[0, 3] = 0
    assert routing_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
