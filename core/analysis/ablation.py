"""Causal expert importance: what the loss on each domain costs when experts are removed from routing.

Routing statistics say which experts are used; ablation says which ones matter. Each target
is a set of experts per layer, removed from the selection its experts module receives during the
forward pass (:meth:`MoEModelWrapper.forward_loss`: PyTorch pre-hooks locally, an nnsight trace
remotely, the same losses); the loss change is reported per domain of the
predicted token, so an "expert importance" ranking can be checked against utilization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from core.analysis.resampling import (NUM_BLOCKS, BlockSums, Estimate, block_of, document_key, jackknife_interval,
                                      jackknife_t_p, jackknife_weights, MIN_DOCUMENTS, too_few_documents)
from core.analysis.results import ResultMixin


@dataclass
class AblationResult(ResultMixin):
    """Mean next-token loss (nats) per domain, unablated and under each ablation target.

    ``delta[t, d]`` is the loss increase of target t on domain d (positive = the experts mattered).
    """

    domains: list[str]
    targets: list[str]  # one label per ablation target, e.g. "L2:E5"
    target_experts: list[dict[int, list[int]]]
    base_loss: np.ndarray  # [D]
    loss: np.ndarray  # [T, D]
    tokens: np.ndarray  # [D] number of predicted tokens per domain
    notes: list[str] = field(default_factory=list)
    estimate: Estimate | None = None  # delta [T, D] with intervals over documents, against no change
    units: str = "mean next-token cross-entropy, nats"
    delta: np.ndarray = field(init=False)  # [T, D]

    def __post_init__(self) -> None:
        self.delta = np.asarray(self.loss) - np.asarray(self.base_loss)[None, :]


def target_label(target: Mapping[int, Iterable[int]]) -> str:
    """A short readable name for an ablation target: ``L1:E3,E5 L2:E0``."""
    return " ".join(f"L{layer}:" + ",".join(f"E{e}" for e in sorted(experts)) for layer, experts in sorted(target.items())) or "none"


def ablation_study(
    wrapper: Any,
    tokenized: Any,
    targets: list[Mapping[int, Iterable[int]]],
    batch_size: int = 8,
    labels: list[str] | None = None,
    progress: bool = True,
    resamples: int = 200,
    seed: int = 0,
) -> AblationResult:
    """Loss per domain with nothing ablated and with each target ablated, on a ``TokenizedDataset``.

    ``estimate`` gives each change an interval over documents (bootstrap of document blocks).
    """
    if not targets:
        raise ValueError("give at least one ablation target, e.g. {layer: [expert]}")
    targets = [{int(k): sorted(int(e) for e in v) for k, v in t.items()} for t in targets]
    labels = labels or [target_label(t) for t in targets]
    if len(labels) != len(targets):
        raise ValueError(f"{len(labels)} labels for {len(targets)} ablation targets")
    n_dom = len(tokenized.domain_names)
    # loss sums per (document block x domain) unit, so deltas get intervals over documents
    units = BlockSums(NUM_BLOCKS * n_dom)
    batches = list(tokenized.batches(batch_size))
    bar = tqdm(total=len(batches) * (len(targets) + 1), desc="ablation", unit="pass", disable=not progress)
    for batch in batches:
        dom = batch.domain_ids[:, 1:]
        keys = document_key(batch.doc_ids[:, 1:].numpy(), batch.dataset_ids[:, 1:].numpy())
        losses = []
        for target in [{}] + targets:
            losses.append(wrapper.forward_loss(batch.input_ids, batch.attention_mask, ablate=target))
            bar.update()
        valid = (dom >= 0) & ~torch.isnan(losses[0])
        unit = block_of(keys[valid.numpy()]) * n_dom + dom[valid].numpy()
        units.add("loss", unit, torch.stack([x[valid] for x in losses], 1).double().numpy())
        units.add("tokens", unit, np.ones(int(valid.sum())))
    bar.close()
    tokens = units["tokens"].reshape(NUM_BLOCKS, n_dom).sum(0) if "tokens" in units.sums else np.zeros(n_dom)
    if not tokens.sum():
        raise ValueError("ablation found no predicted tokens with a domain label in this data")
    loss = units["loss"].reshape(NUM_BLOCKS, n_dom, -1).sum(0).T  # [T+1, D]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = loss / tokens[None, :]
    notes = _notes(tokenized.domain_names, tokens, (units["tokens"].reshape(NUM_BLOCKS, n_dom) > 0).sum(0))
    return AblationResult(
        domains=list(tokenized.domain_names),
        targets=labels,
        target_experts=targets,
        base_loss=means[0],
        loss=means[1:],
        tokens=tokens.astype(int),
        notes=notes,
        estimate=_delta_estimate(units, n_dom, resamples, seed),
    )


def _notes(domains: list[str], tokens: np.ndarray, blocks: np.ndarray) -> list[str]:
    """Domains with no scored tokens, and those whose tokens lie in too few document blocks for a verdict."""
    notes = [f"domain '{d}' has no predicted tokens" for d, c in zip(domains, tokens) if c == 0]
    alone = [d for d, c, b in zip(domains, tokens, blocks) if c and b < MIN_DOCUMENTS]
    if alone:
        many, whose = len(alone) > 1, "each one's" if len(alone) > 1 else "its"
        notes.append(f"domain{'s' if many else ''} {', '.join(alone)}: {whose} scored tokens lie in fewer than "
                     f"{MIN_DOCUMENTS} document blocks, so the loss changes there have no interval or verdict "
                     "(score more tokens to reach more documents)")
    return notes


def _delta_estimate(units: BlockSums, n_dom: int, resamples: int, seed: int) -> Estimate:
    """Loss change ``[T, D]`` with a jackknife over each domain's document blocks, against no change.

    Two-sided t tests of each change on its jackknife error (n - 1 degrees of freedom, n the
    domain's blocks), Holm-corrected over the T x D changes the finding counts; a domain whose
    tokens lie in fewer than MIN_DOCUMENTS blocks gets no interval and no verdict. (A percentile
    bootstrap of pooled blocks gave a domain in one block a zero-width interval.)
    """
    loss = units["loss"].reshape(NUM_BLOCKS, n_dom, -1)  # [B, D, T+1]
    tokens = units["tokens"].reshape(NUM_BLOCKS, n_dom)
    delta = lambda lo, n: (lo[..., 1:] - lo[..., :1]) / n[..., None]  # noqa: E731  [..., D, T]
    with np.errstate(divide="ignore", invalid="ignore"):
        value = delta(loss.sum(0), tokens.sum(0)).T  # [T, D]
        T, D = value.shape
        low, high, p = (np.full((T, D), np.nan) for _ in range(3))
        for d in range(D):
            used = tokens[:, d] > 0
            if too_few_documents(used) or not resamples:
                continue
            w = jackknife_weights(used)  # [n, B]
            loo = delta(np.tensordot(w, loss[:, d], axes=(1, 0)), w @ tokens[:, d])  # [n, T]
            low[:, d], high[:, d] = jackknife_interval(value[:, d], loo)
            greater = jackknife_t_p(value[:, d], loo)
            p[:, d] = np.minimum(1.0, 2 * np.minimum(greater, 1 - greater))
    est = Estimate(value, low, high, np.zeros((T, D)), np.zeros((T, D)), np.zeros((T, D)), "no change",
                   resamples, diff_low=low, diff_high=high, p_value=p)
    return est.corrected()


def most_and_least_used_experts(utilization: np.ndarray, moe_layers: list[int]) -> tuple[list[dict[int, list[int]]], list[str]]:
    """Per layer, the most-used and the least-used expert as single-expert ablation targets.

    ``utilization`` is ``[L, E]`` (share of assignments). The least-used expert is the control:
    if routing statistics predict importance, removing it should cost less.
    """
    util = np.asarray(utilization)
    if util.shape[0] != len(moe_layers):
        raise ValueError(f"utilization has {util.shape[0]} layers, the model has {len(moe_layers)} MoE layers")
    targets, labels = [], []
    for row, layer in zip(util, moe_layers):
        top, low = int(row.argmax()), int(row.argmin())
        targets += [{layer: [top]}, {layer: [low]}]
        labels += [f"L{layer}:E{top} (most used, {row[top]:.1%})", f"L{layer}:E{low} (least used, {row[low]:.1%})"]
    return targets, labels
