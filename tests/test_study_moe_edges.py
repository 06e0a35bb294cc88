"""Edge cases of the toolkit's own MoE (issue 12): padding and expert capacity, random routing's balance loss."""

from types import SimpleNamespace

import pytest
import torch

from core.study_moe.evaluation import record_router_outputs
from core.study_moe.layer import (
    StudyMoeTopKRouter,
    capacity_keep_mask,
    dispatch_fractions,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
)
from core.study_moe.model import StudyMoeConfig, StudyMoeForCausalLM, real_token_mask


def router_config(**kw) -> SimpleNamespace:
    base = dict(num_experts=4, num_experts_per_tok=2, hidden_size=8, routing="topk", norm_topk_prob=False,
                capacity_factor=0.75, router_jitter_noise=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def tiny_model(**kw) -> StudyMoeForCausalLM:
    base = dict(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1)
    base.update(kw)
    torch.manual_seed(0)
    model = StudyMoeForCausalLM(StudyMoeConfig(**base)).eval()
    with torch.no_grad():  # sharper routers than the 0.02 init, so capacity really binds
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    return model


# ------------------------------------------------------------------ padding and capacity
def test_padding_takes_no_capacity_in_the_router():
    router = StudyMoeTopKRouter(router_config())
    torch.nn.init.normal_(router.weight)
    real_hidden = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    _, w_ref, idx_ref = router(real_hidden)
    dropped_ref = int(router.last_num_dropped)
    assert dropped_ref > 0, "the test needs capacity to bind"

    # 3 rows of 4 real tokens, each right-padded to 16: three quarters of the batch is padding
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :4] = True
    padded = torch.randn(3, 16, 8) * 5  # padding hidden states are garbage
    padded[mask] = real_hidden
    _, w, idx = router(padded.reshape(-1, 8), mask.reshape(-1))
    real = mask.reshape(-1)
    assert torch.equal(idx[real], idx_ref)
    assert torch.equal(w[real], w_ref)
    assert int(router.last_num_dropped) == dropped_ref
    assert (w[~real] == 0).all(), "padding is routed to no expert"


def test_capacity_keep_mask_skips_padding():
    idx = torch.tensor([[0], [0], [0], [0]])
    keep = capacity_keep_mask(idx, num_experts=2, capacity=2, token_mask=torch.tensor([False, True, False, True]))
    assert keep.squeeze(1).tolist() == [False, True, False, True]  # padding took none of expert 0's two slots
    assert expert_capacity(2, 2, 1, 1.0) == 1


def test_heavily_padded_batch_routes_real_tokens_as_without_padding():
    model = tiny_model(capacity_factor=0.75)
    ids = torch.randint(2, 97, (3, 6), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([ids, torch.zeros(3, 14, dtype=torch.long)], dim=1)
    mask = torch.zeros_like(padded)
    mask[:, :6] = 1
    labels = padded.masked_fill(mask == 0, -100)
    with torch.no_grad(), record_router_outputs(model) as ref:
        out_ref = model(ids, attention_mask=torch.ones_like(ids), labels=ids, output_router_logits=True)
    with torch.no_grad(), record_router_outputs(model) as pad:
        out_pad = model(padded, attention_mask=mask, labels=labels, output_router_logits=True)
    keep = mask.reshape(-1).bool()
    total_dropped = 0
    for (lg_r, w_r, i_r), (lg_p, w_p, i_p) in zip(ref, pad):
        assert torch.allclose(lg_p[keep], lg_r, atol=1e-5)
        assert torch.equal(i_p[keep], i_r), "same experts selected"
        assert torch.equal(w_p[keep] == 0, w_r == 0), "same assignments dropped"
        assert torch.allclose(w_p[keep], w_r, atol=1e-6)
        assert (w_p[~keep] == 0).all()
        total_dropped += int((w_r == 0).sum())
    assert total_dropped > 0, "the test needs capacity to bind"
    assert out_pad.aux_loss.item() == pytest.approx(out_ref.aux_loss.item(), rel=1e-5)
    z_ref = router_z_loss(out_ref.router_logits)
    z_pad = router_z_loss(out_pad.router_logits, mask)
    assert z_pad.item() == pytest.approx(z_ref.item(), rel=1e-5)
    assert out_pad.loss.item() == pytest.approx(out_ref.loss.item(), rel=1e-5)


def test_real_token_mask_takes_the_current_columns():
    mask = torch.tensor([[0, 1, 1, 1]])
    assert real_token_mask(mask, 2).tolist() == [[True, True]]  # with a cache: the last 2 tokens are current
    assert real_token_mask(None, 3) is None
    assert real_token_mask(torch.ones(1, 1, 4, 4), 4) is None


# ------------------------------------------------------------------ random routing and the balance loss
def test_dispatch_fractions_count_the_given_choice():
    selected = torch.tensor([[0, 1], [0, 2], [3, 1], [4, -1]])  # 4 and -1: no expert
    f = dispatch_fractions(selected, num_experts=4)
    assert f.tolist() == pytest.approx([2 / 6, 2 / 6, 1 / 6, 1 / 6])
    f_masked = dispatch_fractions(selected, 4, mask=torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert f_masked.tolist() == pytest.approx([0.5, 0.25, 0.25, 0.0])


def test_balance_loss_uses_the_given_choice_not_the_top_k():
    logits = torch.zeros(8, 4)
    logits[:, 0] = 50.0  # the router's top-1 is always expert 0 and P ~ [1, 0, 0, 0]
    spread = torch.tensor([[0], [1], [2], [3], [0], [1], [2], [3]])
    assert load_balancing_loss(logits, 4, 1).item() == pytest.approx(4.0, rel=1e-4)
    assert load_balancing_loss(logits, 4, 1, selected=spread).item() == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="layers"):
        load_balancing_loss((logits, logits), 4, 1, selected=(spread,))


def planted_random_model(top_k: int) -> StudyMoeForCausalLM:
    """Every token's router input is the same vector and the router puts ~all probability on expert 0."""
    model = tiny_model(routing="random", num_experts_per_tok=top_k)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()  # attention adds nothing
            layer.mlp.experts.down_proj.zero_()  # experts add nothing: the hidden state stays e_0
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[0, 0] = 100.0
    return model


@pytest.mark.parametrize("top_k", [1, 2])
def test_random_routing_balance_loss_counts_the_random_choice(top_k):
    model = planted_random_model(top_k)
    ids = torch.randint(2, 97, (4, 64), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    with torch.no_grad(), record_router_outputs(model) as records:
        out = model(ids, attention_mask=torch.ones_like(ids), output_router_logits=True)
    probs = [torch.softmax(lg, dim=-1) for lg in out.router_logits]
    assert all(p[:, 0].min() > 0.999 for p in probs), "planted: the router prefers expert 0"
    expected = 0.0
    for (_, _, idx), p in zip(records, probs):
        counts = torch.bincount(idx.reshape(-1), minlength=4).float()
        f = counts / idx.numel()  # the random choice's dispatch fractions
        assert f[0] < 0.4, "random routing spreads the load"
        expected += 4 * float((f * p.mean(0)).sum())
    expected /= len(records)
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    top_k_version = load_balancing_loss(out.router_logits, 4, top_k).item()  # what the old code computed
    assert top_k_version == pytest.approx(4.0 / top_k, rel=1e-3)
    assert out.aux_loss.item() < 1.6 < top_k_version
