"""Checkpoint dynamics: saturation of a checkpoint against itself is 1; drift of known changes."""

import json

import numpy as np
import pytest
import torch

from core.analysis.checkpoint_dynamics import checkpoint_dynamics, router_weight_drift, saturation
from tests.fakes import routing


def _rd(idx, E=4, token_ids=None):
    n, L = np.shape(idx)[:2]
    return routing(idx, E, logits=np.zeros((n, L, E)), token_ids=np.arange(n) if token_ids is None else token_ids,
                   positions=np.arange(n))


def test_saturation_self_is_one_and_partial_overlap():
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(4)[:2] for _ in range(30)]).reshape(30, 1, 2)
    final = _rd(np.concatenate([idx, idx], axis=1))
    np.testing.assert_allclose(saturation(final, final).per_layer, 1.0)
    # layer 0 keeps one of two experts, layer 1 keeps both
    early = idx.copy()
    early[:, 0, 1] = [next(e for e in range(4) if e not in row) for row in idx[:, 0]]
    mid = _rd(np.concatenate([early, idx], axis=1))
    sat = saturation(mid.iter_chunks(7), final.iter_chunks(7))
    np.testing.assert_allclose(sat.per_layer, [0.5, 1.0])
    assert sat.mean == pytest.approx(0.75) and sat.num_tokens == final.num_tokens
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
    with pytest.raises(ValueError, match=r"stream\(s\) \[1\] end after 4 tokens"):
        saturation(a, _rd(np.zeros((4, 1, 1))))


def test_router_weight_drift():
    w0 = {3: torch.eye(4)}
    w1 = {3: 2 * torch.eye(4)}  # same directions, doubled norm
    w2 = {3: -torch.eye(4)}  # flipped
    d = router_weight_drift([w0, w1, w2], names=["a", "b", "c"], score_fn="softmax")
    assert np.isnan(d.cosine_prev[0, 0])
    assert d.cosine_prev[1, 0] == pytest.approx(1.0) and d.rel_change_prev[1, 0] == pytest.approx(1.0)
    assert d.cosine_final[0, 0] == pytest.approx(-1.0) and d.rel_change_final[0, 0] == pytest.approx(2.0)
    assert d.cosine_final[2, 0] == pytest.approx(1.0) and d.rel_change_final[2, 0] == 0.0
    json.dumps(d.to_dict())
    with pytest.raises(ValueError, match="router layers"):
        router_weight_drift([{1: torch.eye(2)}, {2: torch.eye(2)}], score_fn="softmax")
