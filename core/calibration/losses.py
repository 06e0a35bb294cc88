"""Loss-change worlds for the ablation verdict: per-token losses whose changes differ by document, with or without an effect.

The ablation study runs the model once per removed expert; here a stand-in model returns
simulated per-token losses (``forward_loss``), so the study's own code (its document blocks, its
jackknife, its correction over the changes) is what gets calibrated. Each document has its own
base loss and its own response to each ablation (sd ``doc_sd`` nats), every token its own noise:
the null is "no change on average", and the planted world adds 0.03 nats to one (target, domain).
A token's loss is shared by all passes; each ablation moves it by its own noise (sd 0.05 nats).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

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
    """One row per (loss world, ablation verdict): false-positive rate over its changes, or power on the planted one."""
    spec = next(s for s in registered() if s.name == "ablation")
    rows = []
    for world in LOSS_WORLDS:
        if names is not None and world.name not in names:
            continue
        tally, tok = Tally(), _tokens(world)
        for seed in seeds:
            res = ablation_study(_StandIn(world, seed, tok.input_ids.shape[0]), tok, [{0: [t]} for t in range(TARGETS)],
                                 batch_size=16, progress=False, seed=seed)
            tally.runs.append(outcome(decisions_of(spec, res)["ablation_changes"]))
        r = tally.rates(world.target, "ablation_changes")
        rows.append({"world": world.name, "verdict": "ablation_changes", "role": "power" if "power" in r else "null", **r})
    return pd.DataFrame(rows)
