"""Router-weight worlds: routers with shared anisotropy and no expert correspondence, and routers that truly correspond.

Trained routers share a few dominant hidden directions, so two routers with no expert in common
still match well by cosine; a null must keep that. Each world draws one router per layer as
rows ``Z Σ^{1/2}`` (``Z`` i.i.d. Gaussian, ``Σ`` with a decaying spectrum shared by all layers,
or the identity); the planted world makes layer 4's router layer 3's with its experts reordered
and noise of the same norm added, as one router at two checkpoints. The verdicts are those the
registered ``"after"`` analyses declare (``router_similarity``'s adjacent pairs), computed by the
same analyzer as the run.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.analysis.router_weights import RouterAnalyzer
from core.calibration.runner import Tally, outcome
from core.pipeline.spec import decisions_of, registered

HIDDEN = 256
LAYERS = 8


@dataclass(frozen=True)
class RouterWorld:
    name: str
    about: str
    anisotropic: bool = True
    correspond: bool = False  # layer 4's router is layer 3's, experts reordered, plus noise of equal norm
    target: tuple[str, object] | None = None


ROUTER_WORLDS = (
    RouterWorld("anisotropic_routers", "independent routers sharing one anisotropic covariance (spectrum 1/(1+i)^1.5)"),
    RouterWorld("isotropic_routers", "independent isotropic routers", anisotropic=False),
    RouterWorld("corresponding_routers", "layer 4's router is layer 3's, experts reordered, plus noise of equal norm",
                correspond=True, target=("router_pairs_hungarian", 3)),
)


def routers(world: RouterWorld, experts: int, seed: int) -> dict[int, np.ndarray]:
    """One router ``[E, H]`` per layer."""
    rng = np.random.default_rng([seed, zlib.crc32(world.name.encode())])
    scale = (1.0 / (1 + np.arange(HIDDEN)) ** 0.75) if world.anisotropic else np.ones(HIDDEN)  # sqrt of the spectrum
    basis = np.linalg.qr(np.random.default_rng(7).normal(size=(HIDDEN, HIDDEN)))[0]  # the shared directions
    out = {l: (rng.normal(size=(experts, HIDDEN)) * scale) @ basis.T for l in range(LAYERS)}
    if world.correspond:
        noise = (rng.normal(size=(experts, HIDDEN)) * scale) @ basis.T
        out[4] = (out[3] + noise * np.linalg.norm(out[3]) / np.linalg.norm(noise))[rng.permutation(experts)]
    return out


def calibrate_routers(experts: int, seeds: range, num_null: int = 100, names: list[str] | None = None) -> pd.DataFrame:
    """One row per (router world, verdict of a registered weight analysis): false-positive rate or power."""
    spec = next(s for s in registered() if s.name == "router_similarity")
    rows = []
    for world in ROUTER_WORLDS:
        if names is not None and world.name not in names:
            continue
        tallies: dict[str, Tally] = {}
        for seed in seeds:
            sim = RouterAnalyzer(score_fn="softmax").compute_router_similarity_matrix(
                routers(world, experts, seed), num_null=num_null, seed=seed)
            for key, value in decisions_of(spec, sim).items():
                tallies.setdefault(key, Tally()).runs.append(outcome(value))
        for key, tally in tallies.items():
            r = tally.rates(world.target, key)
            rows.append({"world": world.name, "verdict": key, "role": "power" if "power" in r else "null", **r})
    return pd.DataFrame(rows)
