"""Causal checks: ablating experts (PyTorch pre-hooks locally, nnsight remotely) changes the loss only where it should."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from core.model_access.wrapper import MoEModelWrapper
from tests.tiny_models import VOCAB, build


@pytest.fixture(scope="module")
def wrapped():
    model = build("olmoe", seed=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return model, MoEModelWrapper(model), ids, mask


def _plain_loss(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return loss.reshape(ids.shape[0], -1)


def test_ablating_nothing_reproduces_the_loss_exactly(wrapped):
    model, w, ids, mask = wrapped
    loss = w.forward_loss(ids, mask)
    plain = _plain_loss(model, ids, mask)
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    assert torch.equal(loss[valid], plain[valid])
    assert torch.isnan(loss[~valid]).all()
    assert torch.equal(torch.nan_to_num(w.forward_loss(ids, mask, ablate={}), nan=-1.0), torch.nan_to_num(loss, nan=-1.0))


def test_ablating_an_expert_that_is_never_selected_changes_nothing():
    """gpt_oss routers have a bias: a very negative bias guarantees expert 3 is never selected."""
    model = build("gpt_oss", seed=5)
    with torch.no_grad():
        model.model.layers[1].mlp.router.bias[3] = -1e4
    w = MoEModelWrapper(model)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    assert not (w.trace_routing(ids, mask).topk_idx[:, 1] == 3).any()
    base = w.forward_loss(ids, mask)
    assert torch.equal(base, w.forward_loss(ids, mask, ablate={1: [3]}))
    assert not torch.equal(base, w.forward_loss(ids, mask, ablate={1: [int(w.trace_routing(ids, mask).topk_idx[0, 1, 0])]}))


def test_ablating_a_used_expert_changes_the_loss_and_renormalizes(wrapped):
    _, w, ids, mask = wrapped
    routing = w.trace_routing(ids, mask)
    layer = w.moe_layers[0]
    top = int(routing.topk_idx[:, 0].flatten().mode().values)
    base = w.forward_loss(ids, mask)
    ablated = w.forward_loss(ids, mask, ablate={layer: [top]})
    valid = ~torch.isnan(base)
    assert not torch.allclose(base[valid], ablated[valid])


def test_renormalize_keeps_row_totals():
    from core.model_access.interventions import renormalize_without

    idx = torch.tensor([[0, 1], [2, 3], [0, 2]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3]])
    renormalize_without(idx, w, [0])
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.0, 1.0]]))


def test_bad_ablation_requests_are_refused(wrapped):
    _, w, ids, mask = wrapped
    with pytest.raises(ValueError, match="has no router"):
        w.forward_loss(ids, mask, ablate={99: [0]})
    with pytest.raises(ValueError, match="do not exist"):
        w.forward_loss(ids, mask, ablate={w.moe_layers[0]: [42]})


def test_ablation_study_reports_per_domain_deltas():
    from core.analysis.ablation import ablation_study, most_and_least_used_experts
    from data.tokenization import TokenizedDataset

    model = build("gpt_oss", seed=5)
    with torch.no_grad():
        model.model.layers[1].mlp.router.bias[3] = -1e4  # expert 3 of layer 1 is never selected
    w = MoEModelWrapper(model)
    ids = torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0
    domain = torch.tensor([0, 1, 0, 1])[:, None].expand_as(ids).clone()
    domain[mask == 0] = -1
    doc = torch.arange(4)[:, None].expand_as(ids).clone()  # a document per row: two per domain
    tok = TokenizedDataset(input_ids=ids, attention_mask=mask, doc_ids=doc, positions=torch.arange(10).expand_as(ids).clone(),
                           domain_ids=domain, dataset_ids=domain.clone(), domain_names=["math", "code"], dataset_names=["a", "b"],
                           documents=[], max_length=10, packed=False)
    used = int(w.trace_routing(ids, mask).topk_idx[:, 1, 0].mode().values)
    res = ablation_study(w, tok, [{1: [3]}, {1: [used]}], batch_size=3, progress=False)
    assert res.targets == ["L1:E3", f"L1:E{used}"]
    assert res.tokens.tolist() == [18, 9 + 5]
    np.testing.assert_array_equal(res.delta[0], [0.0, 0.0])
    plain = w.forward_loss(ids, mask)
    np.testing.assert_allclose(res.base_loss[0], plain[[0, 2]].nanmean().item(), rtol=1e-6)
    ablated = w.forward_loss(ids, mask, ablate={1: [used]})  # the delta is this loss minus the base, per domain
    want = [ablated[rows].nanmean().item() - plain[rows].nanmean().item() for rows in ([0, 2], [1, 3])]
    np.testing.assert_allclose(res.delta[1], want, rtol=1e-5, atol=1e-6)
    assert np.abs(res.delta[1]).max() > 1e-4  # the used expert matters
    est = res.estimate  # two documents per domain: the changes, but no interval or verdict over documents
    np.testing.assert_allclose(est.value, res.delta, atol=1e-12)
    assert np.isnan(est.low).all() and not est.distinguishable.any()
    assert sum("fewer than 6 document blocks" in n for n in res.notes) == 1 and "math, code" in res.notes[-1]
    rows = torch.randint(3, VOCAB, (24, 10), generator=torch.Generator().manual_seed(3))  # 12 documents per domain
    dom = torch.arange(24)[:, None].remainder(2).expand_as(rows).clone()
    many = replace(tok, input_ids=rows, attention_mask=torch.ones_like(rows), doc_ids=torch.arange(24)[:, None].expand_as(rows).clone(),
                   positions=torch.arange(10).expand_as(rows).clone(), domain_ids=dom, dataset_ids=dom.clone())
    res = ablation_study(w, many, [{1: [3]}, {1: [used]}], batch_size=8, progress=False)
    est = res.estimate  # intervals over documents: the never-selected expert is exactly "no change"
    assert not est.distinguishable[0].any() and est.low[0].tolist() == [0.0, 0.0] and est.family == 4
    assert (est.low[1] <= res.delta[1] + 1e-9).all() and (res.delta[1] <= est.high[1] + 1e-9).all()
    targets, labels = most_and_least_used_experts(np.array([[0.5, 0.1, 0.4], [0.2, 0.3, 0.5]]), [1, 2])
    assert targets == [{1: [0]}, {1: [1]}, {2: [2]}, {2: [0]}] and "most used" in labels[0] and "least used" in labels[1]


def test_next_token_losses_row_by_row_equal_the_whole_batch_at_once():
    """The loss one batch row at a time (to hold one row's float32 logits) is bitwise the batched cross-entropy."""
    from core.model_access.wrapper import next_token_losses

    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(3, 20, 1000, generator=g).bfloat16(), torch.randint(0, 1000, (3, 20), generator=g)
    whole = torch.nn.functional.cross_entropy(logits.float()[:, :-1].reshape(-1, 1000), ids[:, 1:].reshape(-1),
                                              reduction="none").reshape(3, 19)
    assert torch.equal(next_token_losses(logits, ids), whole)
    assert next_token_losses(logits[:0], ids[:0]).shape == (0, 19)


def test_freed_memory_is_handed_back_after_each_forward_of_a_big_model_only(monkeypatch):
    """The trim after each loss forward bounds a big model's resident set; a small model's forwards skip it (it cost
    more than the forward's own page faults). The size is decided at the first call."""
    import core.model_access.wrapper as wrapper_module

    calls = []
    monkeypatch.setattr(wrapper_module, "release_freed_memory", lambda: calls.append(1) or True)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    small = MoEModelWrapper(build("olmoe", seed=6))
    small.forward_loss(ids)
    assert calls == [] and small._trims is False
    monkeypatch.setattr("core.model_access.loading.BIG_MODEL_BYTES", 1)  # any model is "big"
    big = MoEModelWrapper(build("olmoe", seed=6))
    big.forward_loss(ids)
    big.forward_loss(ids, ablate={big.moe_layers[0]: [0]})
    assert calls == [1, 1] and big._trims is True
