"""Loss-change worlds for the ablation and pruning verdicts: per-token losses that differ by document, with or without an effect.

The ablation and pruning studies run the model once per removed set of experts; here stand-in
models return simulated per-token losses (``forward_loss``), so the studies' own code (document
blocks, jackknife, the test against random choices, the corrections) is what gets calibrated.

Ablation: each document has its own base loss and its own response to each ablation (sd
``doc_sd`` nats), every token its own noise: the null is "no change on average", and the planted
world adds 0.03 nats to one (target, domain). A token's loss is shared by all passes; each
ablation moves it by its own noise (sd 0.05 nats).

Pruning: removing expert (l, e) costs ``cost[l, e]`` nats on average, scaled per document by
its own response (sd ``doc_sd``, relative), plus token noise per pass. The null is a criterion
that knows nothing of the costs (its scores are random), with costs all equal or spread
(lognormal, sd ``cost_sd``); the planted criterion's scores are the log costs plus noise (sd 0.5 or 0.25).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.analysis.ablation import ablation_study
from core.calibration.runner import Tally, outcome
from core.pipeline.spec import decisions_of, registered

DOMAINS, TARGETS = ("general", "math", "code"), 8


@dataclass(frozen=True)
class LossWorld:
    name: str
    about: str
    docs: int = 24  # per domain
    doc_len: int = 64
    doc_sd: float = 0.02  # a document's own response to each ablation
    shift: float = 0.0  # added to target 0's change on domain 0
    target: tuple[str, object] | None = None


LOSS_WORLDS = (
    LossWorld("loss_null", "no change on average; each document responds its own way (sd 0.02 nats), token noise sd 0.05"),
    LossWorld("loss_null_few", "the same with 6 documents per domain", docs=6),
    LossWorld("loss_shift", "removing target 0 costs 0.03 nats more on domain 0", shift=0.03,
              target=("ablation_changes", (0, 0))),
)


class _StandIn:
    """Answers ``forward_loss`` with simulated losses keyed by the first token of each row (its document)."""

    def __init__(self, world: LossWorld, seed: int, n_docs: int) -> None:
        rng = np.random.default_rng([seed, zlib.crc32(world.name.encode())])
        self.base = rng.normal(2.0, 0.3, n_docs)
        self.response = rng.normal(0.0, world.doc_sd, (n_docs, TARGETS))
        self.noise = rng.normal(0.0, 0.5, (n_docs, 1, world.doc_len - 1))  # a token's own loss, the same in every pass
        self.noise = self.noise + np.concatenate([np.zeros((n_docs, 1, world.doc_len - 1)),
                                                  rng.normal(0.0, 0.05, (n_docs, TARGETS, world.doc_len - 1))], 1)
        self.response[: world.docs, 0] += world.shift  # domain 0's documents come first

    def forward_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ablate: dict | None = None) -> torch.Tensor:
        doc = input_ids[:, 0].numpy() - 1
        t = 0 if not ablate else 1 + next(iter(ablate.values()))[0]
        loss = self.base[doc, None] + self.noise[doc, t] + (self.response[doc, t - 1, None] if t else 0.0)
        return torch.from_numpy(loss).float()


def _tokens(world: LossWorld):
    from data import TokenizedDataset

    n = world.docs * len(DOMAINS)
    ids = torch.arange(1, n + 1)[:, None].repeat(1, world.doc_len)  # the first token names the document
    dom = (torch.arange(n) // world.docs)[:, None].expand_as(ids).clone()
    return TokenizedDataset(input_ids=ids, attention_mask=torch.ones_like(ids), doc_ids=(ids - 1).clone(),
                            positions=torch.arange(world.doc_len).expand_as(ids).clone(), domain_ids=dom,
                            dataset_ids=dom.clone(), domain_names=list(DOMAINS), dataset_names=list(DOMAINS),
                            documents=[], max_length=world.doc_len, packed=False)


def calibrate_losses(seeds: range, names: list[str] | None = None) -> pd.DataFrame:
    """The ablation and pruning verdicts on their loss worlds (all, or those named): one row per world."""
    return pd.concat([calibrate_ablation(seeds, names), calibrate_pruning(seeds, names)], ignore_index=True)


def loss_world_names() -> list[str]:
    return [w.name for w in LOSS_WORLDS + PRUNE_WORLDS]


def _calibrate(worlds: tuple, analysis: str, key: str, seeds: range, names: list[str] | None, run: Any) -> pd.DataFrame:
    """One row per world of ``worlds`` (all, or those named): ``run(spec, world, seed, tokens)``'s outcomes, tallied."""
    spec = next(s for s in registered() if s.name == analysis)
    rows = []
    for world in worlds:
        if names is not None and world.name not in names:
            continue
        tally, tok = Tally(), _tokens(world)
        tally.runs.extend(run(spec, world, seed, tok) for seed in seeds)
        r = tally.rates(world.target, key)
        rows.append({"world": world.name, "verdict": key, "role": "power" if "power" in r else "null", **r})
    return pd.DataFrame(rows)


def _ablation_run(spec: Any, world: LossWorld, seed: int, tok: Any) -> Any:
    res = ablation_study(_StandIn(world, seed, tok.input_ids.shape[0]), tok, [{0: [t]} for t in range(TARGETS)],
                         batch_size=16, progress=False, seed=seed)
    return outcome(decisions_of(spec, res)["ablation_changes"])


def calibrate_ablation(seeds: range, names: list[str] | None = None) -> pd.DataFrame:
    """One row per (loss world, ablation verdict): false-positive rate over its changes, or power on the planted one."""
    return _calibrate(LOSS_WORLDS, "ablation", "ablation_changes", seeds, names, _ablation_run)


@dataclass(frozen=True)
class PruneWorld:
    name: str
    about: str
    docs: int = 24  # per domain
    doc_len: int = 64
    doc_sd: float = 0.5  # a document's own response to each expert's removal, relative to its cost
    cost_sd: float = 1.0  # spread of the experts' costs (lognormal sd; 0: all equal)
    informed: float | None = None  # the "usage" criterion's scores are the log costs plus noise of this sd
    target: tuple[str, object] | None = None


PRUNE_LAYERS, PRUNE_EXPERTS, PRUNE_COST = 4, 16, 0.01  # an expert's mean cost, nats per token
PRUNE_CRITERIA = ("weight_mass", "usage")
PRUNE_WORLDS = (
    PruneWorld("prune_null_equal", "every expert costs 0.01 nats; criteria know nothing", cost_sd=0.0),
    PruneWorld("prune_null_spread", "experts' costs spread (lognormal sd 1); criteria know nothing"),
    PruneWorld("prune_null_few", "the same with 8 documents per domain", docs=8),
    PruneWorld("prune_informed_0.5", "usage scores are the log costs plus noise (sd 0.5): it should beat random at 25%",
               informed=0.5, target=("pruning_vs_random", (1, 1))),
    PruneWorld("prune_informed_0.25", "the same with noise sd 0.25", informed=0.25, target=("pruning_vs_random", (1, 1))),
)


class _PruneStandIn:
    """Per-token loss: the document's base, plus each removed expert's cost scaled by the document's response."""

    def __init__(self, world: PruneWorld, seed: int, n_docs: int) -> None:
        rng = np.random.default_rng([seed, zlib.crc32(world.name.encode())])
        L, E = PRUNE_LAYERS, PRUNE_EXPERTS
        self.cost = PRUNE_COST * np.exp(rng.normal(0, world.cost_sd, (L, E)) - world.cost_sd ** 2 / 2)
        self.response = 1 + rng.normal(0.0, world.doc_sd, (n_docs, L, E))
        self.base = rng.normal(2.0, 0.3, n_docs)[:, None] + rng.normal(0.0, 0.5, (n_docs, world.doc_len - 1))
        self.seed, self.name = seed, world.name

    def forward_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ablate: dict | None = None) -> torch.Tensor:
        doc = input_ids[:, 0].numpy() - 1
        removed = [(int(layer), int(e)) for layer, es in (ablate or {}).items() for e in es]
        loss = self.base[doc].copy()
        if removed:
            ls, es = np.array(removed).T
            loss += (self.response[doc][:, ls, es] * self.cost[ls, es]).sum(1)[:, None]
            key = zlib.crc32(repr(sorted(removed)).encode())  # a pass's own token noise, the same in every batch
            loss += np.stack([np.random.default_rng([self.seed, key, int(d)]).normal(0.0, 0.05, loss.shape[1]) for d in doc])
        return torch.from_numpy(loss).float()


def _pruning_run(spec: Any, world: PruneWorld, seed: int, tok: Any) -> Any:
    from core.analysis.pruning import pruning_study

    model = _PruneStandIn(world, seed, tok.input_ids.shape[0])
    rng = np.random.default_rng([seed, 7])
    scores = {c: rng.random((PRUNE_LAYERS, PRUNE_EXPERTS)) for c in PRUNE_CRITERIA}
    if world.informed is not None:
        scores["usage"] = np.log(model.cost) + rng.normal(0.0, world.informed, model.cost.shape)
    res = pruning_study(model, tok, scores, list(range(PRUNE_LAYERS)), causal=False, batch_size=24,
                        progress=False, seed=seed)
    o = outcome(decisions_of(spec, res)["pruning_vs_random"])
    o.truth = np.array([[sum(model.cost[layer, e] for layer, es in res.removed[c][f"{f:.3g}"].items() for e in es)
                         for f in res.fractions] for c in res.criteria[:-1]])  # what each choice costs on average
    return o


def calibrate_pruning(seeds: range, names: list[str] | None = None) -> pd.DataFrame:
    """One row per pruning world: false-positive rate of "beats random" for criteria that know nothing, or power."""
    return _calibrate(PRUNE_WORLDS, "pruning", "pruning_vs_random", seeds, names, _pruning_run)
