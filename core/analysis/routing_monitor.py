"""A live routing monitor: the study's calibrated diagnosis on a rolling window of training batches.

Why: a training run should learn while it runs that an expert died or took over, judged the way
the study judges a finished model (``core.analysis.diagnosis``: thresholds counted only beyond
sampling noise), not by a fixed factor that balanced routing of few tokens trips by chance.

What is counted: every expert a token actually selected, all k slots, padding left out. A
monitor that counted only each token's first choice would call an expert that is always a
second choice "dead" while it serves a share of the assignments; this one does not.

The tests are those of ``diagnose`` without document blocks (training rows are drawn at random,
so no document structure is known): a binomial test per expert at alpha / (L x E), and the
layer's entropy and CV against uniform routing of as many tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from core.analysis.diagnosis import CollapseThresholds, diagnose

PREFIX = "routing_monitor"


class RoutingMonitor:
    """Expert selection counts per (layer, expert) over the last ``window`` batches, and their diagnosis."""

    def __init__(self, layers: Sequence[int], num_experts: int, top_k: int, window: int = 50,
                 thresholds: CollapseThresholds | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be at least one batch, got {window}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.layers, self.num_experts, self.top_k = [int(x) for x in layers], int(num_experts), int(top_k)
        self.thresholds = thresholds or CollapseThresholds()
        self._batches: deque[tuple[np.ndarray, int]] = deque(maxlen=window)

    @property
    def window(self) -> int:
        return int(self._batches.maxlen or 0)

    def update(self, selected: Sequence[torch.Tensor], token_mask: torch.Tensor | None = None) -> None:
        """Add one batch: ``selected[l]`` the experts of layer l, ``[..., k]`` token-major.

        ``token_mask`` (``[B, T]`` or ``[N]``, True or 1 for real tokens) leaves padding out; an
        index of -1 (nothing selected in that slot) is not counted.
        """
        if len(selected) != len(self.layers):
            raise ValueError(f"got the selection of {len(selected)} layers, the monitor watches {len(self.layers)}")
        counts = np.zeros((len(self.layers), self.num_experts), dtype=np.int64)
        real = None if token_mask is None else token_mask.reshape(-1).bool()
        tokens = 0
        for i, idx in enumerate(selected):
            idx = idx.detach().reshape(-1, idx.shape[-1]).to("cpu", torch.long)
            if real is not None:
                if real.shape[0] != idx.shape[0]:
                    raise ValueError(f"token_mask has {real.shape[0]} tokens but layer {self.layers[i]} routed {idx.shape[0]}")
                idx = idx[real.cpu()]
            tokens = idx.shape[0]
            idx = idx[idx >= 0]
            if idx.numel() and int(idx.max()) >= self.num_experts:
                raise ValueError(f"layer {self.layers[i]} selected expert {int(idx.max())} of {self.num_experts}")
            counts[i] = torch.bincount(idx, minlength=self.num_experts).numpy()
        self._batches.append((counts, tokens))

    def counts(self) -> tuple[np.ndarray, int]:
        """``[L, E]`` selections and the number of real tokens over the window."""
        if not self._batches:
            return np.zeros((len(self.layers), self.num_experts), dtype=np.int64), 0
        return sum(c for c, _ in self._batches), sum(n for _, n in self._batches)

    def record(self) -> dict:
        """The diagnosis of the window as a JSON-ready record (per layer: state, dead, dominant, counts)."""
        counts, tokens = self.counts()
        base = {"window_batches": len(self._batches), "tokens": int(tokens), "top_k": self.top_k}
        if tokens == 0:
            return {**base, "alarms": 0, "layers": []}
        d = diagnose(self.thresholds, counts.astype(float), tokens, self.top_k)
        layers = [{
            "layer": layer,
            "state": d.diagnosis[i],
            "dead": [int(e) for e in np.flatnonzero(d.dead[i])],
            "dominant": [int(e) for e in np.flatnonzero(d.dominant[i])],
            "reasons": list(d.reasons[i]),
            "selected": [int(c) for c in counts[i]],
        } for i, layer in enumerate(self.layers)]
        return {**base, "alarms": sum(r["state"] != "healthy" for r in layers), "layers": layers}


def monitor_scalars(record: dict, prefix: str = PREFIX) -> dict[str, float]:
    """Flat numbers of a record, for W&B or a ``transformers`` Trainer's logs (which take scalars only)."""
    out: dict[str, float] = {f"{prefix}/alarms": record["alarms"], f"{prefix}/tokens": record["tokens"]}
    for r in record["layers"]:
        key = f"{prefix}/layer_{r['layer']}"
        out[f"{key}/dead"] = len(r["dead"])
        out[f"{key}/dominant"] = len(r["dominant"])
        out[f"{key}/imbalanced"] = int(r["state"] == "imbalanced")
        out[f"{key}/collapsed"] = int(r["state"] == "collapsed")
    return out


def alarm_lines(record: dict) -> list[str]:
    """One line per layer that is not healthy, naming its dead and dominant experts."""
    return [f"layer {r['layer']} {r['state']}: " + "; ".join(r["reasons"])
            + (f" (dead {r['dead']})" if r["dead"] else "") + (f" (dominant {r['dominant']})" if r["dominant"] else "")
            for r in record["layers"] if r["state"] != "healthy"]
