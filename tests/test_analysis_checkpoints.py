"""Checkpoint dynamics: saturation of a checkpoint against itself is 1; drift of known changes."""

import json

import numpy as np
import pytest
import torch

from core.checkpoint_dynamics import checkpoint_dynamics, router_weight_drift, saturation
from core.routing_data import RoutingData


def _rd(idx, E=4, token_ids=None):
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    n = idx.shape[0]
    return RoutingData(
        moe_layers=list(range(idx.shape[1])),
        num_experts=E,
        top_k=idx.shape[2],
        topk_idx=idx,
        topk_weight=torch.ones(idx.shape),
        router_logits=torch.zeros(n, idx.shape[1], E),
        token_ids=torch.arange(n) if token_ids is None else torch.as_tensor(token_ids),
        positions=torch.arange(n),
    )


def test_saturation_self_is_one_and_partial_overlap():
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(4)[:2] for _ in range(30)]).reshape(30, 1, 2)
    final = _rd(np.concatenate([idx, idx], axis=1))
    np.testing.assert_allclose(saturation(final, final), 1.0)
    # layer 0 keeps one of two experts, layer 1 keeps both
    early = idx.copy()
    early[:, 0, 1] = [next(e for e in range(4) if e not in row) for row in idx[:, 0]]
    mid = _rd(np.concatenate([early, idx], axis=1))
    np.testing.assert_allclose(saturation(mid.iter_chunks(7), final.iter_chunks(7)), [0.5, 1.0])
    dyn = checkpoint_dynamics([("step100", 100, mid), ("final", 200, final)])
    np.testing.assert_allclose(dyn.saturation, [[0.5, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(dyn.utilization_tv[-1], 0.0)
    assert len(dyn.table()) == 4
    json.dumps(dyn.to_dict())

    class Chunks:  # re-iterable, like a RoutingCache: read once for statistics, once for saturation
        def __init__(self, rd):
            self.rd = rd

        def __iter__(self):
            return self.rd.iter_chunks(7)

    streamed = checkpoint_dynamics([("step100", 100, Chunks(mid)), ("final", 200, Chunks(final))])
    np.testing.assert_allclose(streamed.saturation, dyn.saturation)
    np.testing.assert_allclose(streamed.utilization, dyn.utilization)
    with pytest.raises(ValueError, match="re-iterable"):
        checkpoint_dynamics([("step100", 100, mid.iter_chunks(7)), ("final", 200, final)])


def test_saturation_needs_same_tokens():
    a = _rd(np.zeros((5, 1, 1)))
    b = _rd(np.zeros((5, 1, 1)), token_ids=[9, 9, 9, 9, 9])
    with pytest.raises(ValueError, match="token_ids differ"):
        saturation(a, b)
    with pytest.raises(ValueError, match="5 vs 4"):
        saturation(a, _rd(np.zeros((4, 1, 1))))


def test_router_weight_drift():
    w0 = {3: torch.eye(4)}
    w1 = {3: 2 * torch.eye(4)}  # same directions, doubled norm
    w2 = {3: -torch.eye(4)}  # flipped
    d = router_weight_drift([w0, w1, w2], names=["a", "b", "c"])
    assert np.isnan(d.cosine_prev[0, 0])
    assert d.cosine_prev[1, 0] == pytest.approx(1.0) and d.rel_change_prev[1, 0] == pytest.approx(1.0)
    assert d.cosine_final[0, 0] == pytest.approx(-1.0) and d.rel_change_final[0, 0] == pytest.approx(2.0)
    assert d.cosine_final[2, 0] == pytest.approx(1.0) and d.rel_change_final[2, 0] == 0.0
    json.dumps(d.to_dict())
    with pytest.raises(ValueError, match="router layers"):
        router_weight_drift([{1: torch.eye(2)}, {2: torch.eye(2)}])
