"""The most any test could find of a planted domain effect: an oracle told where it is.

The domain verdict searches every (layer, expert) for a share that differs by domain. When a
planted effect is missed, the question is whether a better verdict would find it or whether the
data cannot show it. The oracle knows the layer, the expert and the domain, and compares that one
expert's share per document between the planted domain's documents and the others (Welch's t,
one-sided): its power at level 0.05 bounds any test of that one cell, and at 0.05 / (L x E) any
test that, like the verdict, must look at every (layer, expert).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from core.calibration.worlds import Shape, World, simulate

PLANTED_LAYER, PLANTED_EXPERT, PLANTED_DOMAIN = 1, 0, 0  # where worlds.py plants domain_factor


def document_shares(world: World, shape: Shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The planted expert's share of each document's tokens at the planted layer, and each document's domain."""
    rd = simulate(world, shape, seed)
    chose = (rd.topk_idx[:, PLANTED_LAYER, :] == PLANTED_EXPERT).any(-1).numpy()
    doc, dom = rd.doc_ids.numpy(), rd.domain_ids.numpy()
    docs = np.unique(doc)
    share = np.array([chose[doc == d].mean() for d in docs])
    return share, np.array([dom[doc == d][0] for d in docs])


def oracle_power(world: World, shape: Shape, seeds: range, alpha: float = 0.05) -> dict[str, float]:
    """Share of draws where the oracle finds the planted effect: at ``alpha``, and at ``alpha`` / (L x E)."""
    searched = alpha / (shape.layers * shape.experts)
    p = []
    for seed in seeds:
        share, dom = document_shares(world, shape, seed)
        p.append(stats.ttest_ind(share[dom == PLANTED_DOMAIN], share[dom != PLANTED_DOMAIN], equal_var=False,
                                 alternative="greater").pvalue)
    p = np.asarray(p)
    return {"world": world.name, "runs": len(p), "oracle_power": float((p < alpha).mean()),
            "oracle_power_searching": float((p < searched).mean())}
