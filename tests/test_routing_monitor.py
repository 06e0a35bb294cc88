"""The live routing monitor on planted routing: dead, dominant, balanced, second-choice experts, padding, the window."""

from __future__ import annotations

import pytest
import torch

from core.analysis.routing_monitor import RoutingMonitor, alarm_lines, monitor_scalars

E, K, LAYERS, TOKENS = 8, 2, (0, 1, 2), 256


def _balanced(n: int, gen: torch.Generator, experts: int = E) -> torch.Tensor:
    """``[n, K]`` distinct experts drawn uniformly per token."""
    return torch.rand(n, experts, generator=gen).topk(K, dim=-1).indices


def _feed(monitor: RoutingMonitor, batches: int, gen: torch.Generator, plant=None) -> None:
    for _ in range(batches):
        sel = [_balanced(TOKENS, gen) for _ in LAYERS]
        if plant is not None:
            plant(sel, gen)
        monitor.update(sel)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_top_k_raises_no_alarm(seed):
    gen = torch.Generator().manual_seed(seed)
    monitor = RoutingMonitor(LAYERS, E, K, window=20)
    _feed(monitor, 20, gen)
    rec = monitor.record()
    assert rec["tokens"] == 20 * TOKENS and rec["window_batches"] == 20
    assert rec["alarms"] == 0 and all(r["state"] == "healthy" for r in rec["layers"]), alarm_lines(rec)
    assert all(sum(r["selected"]) == K * 20 * TOKENS for r in rec["layers"])  # every slot counted


def test_a_planted_dead_expert_is_called_dead():
    def never_three(sel, gen):  # layer 1 never selects expert 3: it picks 2 of the other 7
        others = torch.tensor([e for e in range(E) if e != 3])
        sel[1] = others[_balanced(TOKENS, gen, E - 1)]

    monitor = RoutingMonitor(LAYERS, E, K, window=10)
    _feed(monitor, 10, torch.Generator().manual_seed(0), never_three)
    rec = monitor.record()
    by_layer = {r["layer"]: r for r in rec["layers"]}
    assert by_layer[1]["dead"] == [3] and by_layer[1]["state"] == "imbalanced"
    assert by_layer[0]["state"] == by_layer[2]["state"] == "healthy" and rec["alarms"] == 1
    assert monitor_scalars(rec)["routing_monitor/layer_1/dead"] == 1


def test_a_planted_dominant_expert_is_called_dominant():
    def mostly_zero(sel, gen):  # layer 2: expert 0 is the first choice of 80% of tokens (share 0.4 > 2/8)
        first = torch.rand(TOKENS, generator=gen) < 0.8
        pick = sel[2].clone()
        pick[first, 0] = 0
        pick[first, 1] = 1 + torch.randint(0, E - 1, (int(first.sum()),), generator=gen)
        sel[2] = pick

    monitor = RoutingMonitor(LAYERS, E, K, window=10)
    _feed(monitor, 10, torch.Generator().manual_seed(1), mostly_zero)
    by_layer = {r["layer"]: r for r in monitor.record()["layers"]}
    assert by_layer[2]["dominant"] == [0] and by_layer[2]["state"] != "healthy"
    assert by_layer[0]["state"] == by_layer[1]["state"] == "healthy"


def test_an_expert_chosen_only_second_is_not_dead():
    """The peer library's bug: counting top-1 only calls an always-second expert dead."""
    gen = torch.Generator().manual_seed(2)
    n = 10 * TOKENS
    first = torch.tensor([0, 1, 2, 3, 4, 6, 7])[torch.randint(0, 7, (n,), generator=gen)]  # 5 is never first
    second = torch.where(torch.rand(n, generator=gen) < 0.25, torch.tensor(5), (first + 1 + torch.randint(0, 6, (n,), generator=gen)) % E)
    second = torch.where(second == first, (first + 1) % E, second)
    sel = torch.stack([first, second], dim=-1)
    assert (sel[:, 0] != sel[:, 1]).all() and (sel[:, 0] != 5).all()
    monitor = RoutingMonitor([0], E, K, window=1)
    monitor.update([sel])
    layer = monitor.record()["layers"][0]
    assert 5 not in layer["dead"] and layer["selected"][5] > 0.2 * n
    top1 = RoutingMonitor([0], E, 1, window=1)  # what counting the first choice alone would say
    top1.update([sel[:, :1]])
    assert 5 in top1.record()["layers"][0]["dead"]


def test_padding_is_left_out():
    gen = torch.Generator().manual_seed(3)
    sel = _balanced(4 * 64, gen).reshape(4, 64, K)
    mask = torch.ones(4, 64, dtype=torch.long)
    mask[:, 32:] = 0
    sel[:, 32:, 0] = 7  # padding "selects" expert 7 in every row
    masked, unmasked = RoutingMonitor([0], E, K, window=1), RoutingMonitor([0], E, K, window=1)
    masked.update([sel], mask)
    unmasked.update([sel])
    assert masked.record()["tokens"] == 4 * 32 and unmasked.record()["tokens"] == 4 * 64
    assert masked.counts()[0].sum() == K * 4 * 32
    assert 7 not in masked.record()["layers"][0]["dominant"]
    assert 7 in unmasked.record()["layers"][0]["dominant"]


def test_the_window_forgets_old_batches():
    def dead_everywhere(sel, gen):
        for i in range(len(sel)):
            sel[i] = torch.tensor([e for e in range(E) if e != 3])[_balanced(TOKENS, gen, E - 1)]

    monitor = RoutingMonitor(LAYERS, E, K, window=10)
    gen = torch.Generator().manual_seed(4)
    _feed(monitor, 10, gen, dead_everywhere)
    assert monitor.record()["alarms"] == len(LAYERS)
    _feed(monitor, 10, gen)
    rec = monitor.record()
    assert rec["window_batches"] == 10 and rec["alarms"] == 0


def test_empty_and_bad_input():
    monitor = RoutingMonitor(LAYERS, E, K, window=3)
    assert monitor.record() == {"window_batches": 0, "tokens": 0, "top_k": K, "alarms": 0, "layers": []}
    with pytest.raises(ValueError, match="watches 3"):
        monitor.update([torch.zeros(4, K, dtype=torch.long)])
    with pytest.raises(ValueError, match="selected expert 8"):
        monitor.update([torch.full((4, K), 8)] * 3)
    with pytest.raises(ValueError, match="window"):
        RoutingMonitor(LAYERS, E, K, window=0)
