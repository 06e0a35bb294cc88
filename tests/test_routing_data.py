"""RoutingData: the one in-memory shape of routing; its derived views must be exact."""

from __future__ import annotations

import pytest
import torch

from core.routing_data import RoutingData


def _rd(idx, logits=None, names=("general",)):
    idx = torch.as_tensor(idx)
    n, l, k = idx.shape
    return RoutingData(moe_layers=list(range(l)), num_experts=4, top_k=k, topk_idx=idx, topk_weight=torch.ones(idx.shape),
                       router_logits=logits, token_ids=torch.arange(n), domain_names=list(names))


def test_selection_mask_ignores_unselected_slots():
    # token 0 selected experts 0 and 3; token 1 selected expert 0 and has a dropped slot (-1) that must not erase it
    rd = _rd([[[0, 3]], [[-1, 0]], [[-1, -1]]])
    mask = rd.selection_mask()
    assert mask.shape == (3, 1, 4)
    assert mask[:, 0].tolist() == [[True, False, False, True], [True, False, False, False], [False] * 4]


def test_probs_follow_the_family_score_function():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]])
    rd = _rd([[[0, 1]]], logits=logits)
    torch.testing.assert_close(rd.probs(), torch.full((1, 1, 4), 0.25))
    rd.score_fn = "sigmoid"
    torch.testing.assert_close(rd.probs(), torch.full((1, 1, 4), 0.5))
    with pytest.raises(ValueError, match="without router logits"):
        _rd([[[0, 1]]]).probs()


def test_select_concat_and_chunks_round_trip():
    rd = _rd(torch.randint(0, 4, (10, 2, 2), generator=torch.Generator().manual_seed(0)))
    back = RoutingData.concat(list(rd.iter_chunks(3)))
    assert torch.equal(back.topk_idx, rd.topk_idx) and torch.equal(back.token_ids, rd.token_ids)
    assert rd.select(rd.token_ids % 2 == 0).num_tokens == 5
    with pytest.raises(ValueError, match="name tables"):
        RoutingData.concat([rd, _rd(rd.topk_idx, names=("math",))])
    with pytest.raises(ValueError, match="nothing to concatenate"):
        RoutingData.concat([])
