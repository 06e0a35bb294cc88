"""Is a per-layer difference between two runs real? Paired over shared documents, or from each run's own interval.

Two runs that routed the same documents (the same token ids, document by document: two models
or routing strategies on one held-out set) are compared paired: each run's statistic is
recomputed with one document block left out at a time, the same block in both, and the
difference gets a jackknife interval and a two-sided Student t test over the blocks (as the
study's own divergences do, :func:`core.analysis.resampling.jackknife_interval`), Holm-corrected
over the layers. Sharing documents removes the documents' own variation from the difference.

Runs on different documents, or whose routing is not at hand, can only be compared from their
summaries: :func:`summary_difference` takes each run's 95% interval as a normal one and adds the
two variances, which treats the runs as independent (conservative when they share documents).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from core.analysis.resampling import LEVEL, block_of, document_keys, holm, jackknife_interval, jackknife_t_p
from core.analysis.results import ResultMixin
from core.routing_data import RoutingData

STATISTICS = {
    "load_balance": "utilization entropy / log E",
    "domain_specialization": "KL of each domain's expert shares to all tokens' (nats, token-weighted mean)",
}


@dataclass
class DocumentCounts(ResultMixin):
    """Per document (in key order): expert selections per layer, tokens, domain, and a digest of its token ids."""

    keys: np.ndarray  # [D] document keys (dataset id, document id)
    counts: np.ndarray  # [D, L, E] selections
    tokens: np.ndarray  # [D]
    domain: np.ndarray  # [D] domain id (-1: none)
    digest: list[str]  # [D] SHA-256 of the document's token ids in stream order
    num_experts: int
    moe_layers: list[int]


def document_counts(stream: Iterable[RoutingData]) -> DocumentCounts:
    """Count each document's expert selections per layer, reading ``stream`` (chunks or caches) once."""
    counts: dict[int, np.ndarray] = {}
    tokens: dict[int, int] = {}
    domain: dict[int, int] = {}
    hashes: dict[int, "hashlib._Hash"] = {}
    layout = None
    for chunk in stream:
        if chunk.num_tokens == 0:
            continue
        layout = layout or (chunk.num_experts, list(chunk.moe_layers))
        keys = document_keys(chunk)
        sel = chunk.selection_mask().numpy().astype(np.int64)
        ids = chunk.token_ids.numpy().astype(np.int64)
        dom = chunk.domain_ids.numpy() if chunk.domain_ids is not None else np.full(len(keys), -1)
        for key in np.unique(keys).tolist():
            rows = keys == key
            counts[key] = counts.get(key, 0) + sel[rows].sum(0)
            tokens[key] = tokens.get(key, 0) + int(rows.sum())
            domain.setdefault(key, int(dom[rows][0]))
            hashes.setdefault(key, hashlib.sha256()).update(ids[rows].tobytes())
    if layout is None:
        raise ValueError("no routed tokens to count")
    order = sorted(counts)
    return DocumentCounts(np.asarray(order, np.int64), np.stack([counts[k] for k in order]).astype(np.float64),
                          np.asarray([tokens[k] for k in order], np.float64), np.asarray([domain[k] for k in order]),
                          [hashes[k].hexdigest() for k in order], *layout)


def shared_documents(a: DocumentCounts, b: DocumentCounts) -> str | None:
    """None when both runs routed exactly the same documents (same keys, same token ids); else why not, in one line."""
    if a.keys.tolist() != b.keys.tolist():
        return f"they routed different documents ({len(a.keys)} and {len(b.keys)}, {len(np.intersect1d(a.keys, b.keys))} in common)"
    differ = sum(x != y for x, y in zip(a.digest, b.digest))
    if differ:
        return f"{differ} of {len(a.keys)} documents have other token ids (another tokenizer or data)"
    if a.counts.shape[1:] != b.counts.shape[1:]:
        return f"their routing has another shape ({a.counts.shape[1:]} and {b.counts.shape[1:]} layers x experts)"
    return None


def statistic(name: str, counts: np.ndarray, tokens: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """One per-layer statistic from document-weighted totals; ``counts [R, D, L, E]``, ``tokens [R, D]`` (R weightings)."""
    E = counts.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == "load_balance":
            total = counts.sum(1)
            p = total / total.sum(-1, keepdims=True)
            return -np.where(p > 0, p * np.log(p), 0.0).sum(-1) / np.log(E)
        if name == "domain_specialization":
            doms = [g for g in np.unique(domain) if g >= 0]
            overall = counts.sum(1) / counts.sum((1, 3))[..., None]
            score = 0.0
            for g in doms:
                c = counts[:, domain == g].sum(1)
                du = c / np.clip(c.sum(-1, keepdims=True), 1e-300, None)
                kl = np.where(du > 0, du * np.log(du / overall), 0.0).sum(-1)
                score = score + kl * (tokens[:, domain == g].sum(1) / tokens[:, domain >= 0].sum(1))[:, None]
            return np.asarray(score)
    raise ValueError(f"unknown statistic {name!r}; one of {', '.join(STATISTICS)}")


@dataclass
class PairedDifference(ResultMixin):
    """Run B minus run A, per layer, with a 95% interval and Holm-corrected two-sided p; how it was tested."""

    statistic: str
    value_a: np.ndarray  # [L]
    value_b: np.ndarray
    diff: np.ndarray
    low: np.ndarray
    high: np.ndarray
    p_value: np.ndarray
    p_adjusted: np.ndarray
    distinguishable: np.ndarray
    method: str  # what the interval and test are: paired over shared documents, or from the runs' own intervals
    units: int  # document blocks (paired), or 0 (from summaries)


def _weights(blocks: np.ndarray) -> np.ndarray:
    """``[1 + B, D]``: every document, then each block left out once."""
    uniq = np.unique(blocks)
    return np.concatenate([np.ones((1, len(blocks))), (blocks[None] != uniq[:, None]).astype(np.float64)])


def paired_difference(a: DocumentCounts, b: DocumentCounts, name: str, alpha: float = 1 - LEVEL) -> PairedDifference:
    """B - A of one statistic over the documents both runs routed, jackknifed over document blocks (same blocks in both)."""
    why = shared_documents(a, b)
    if why is not None:
        raise ValueError(f"a paired test needs the same documents: {why}")
    w = _weights(block_of(a.keys))
    va, vb = (statistic(name, w[:, :, None, None] * r.counts[None], w * r.tokens[None], r.domain) for r in (a, b))
    diff = vb - va
    n = len(w) - 1
    low, high = jackknife_interval(diff[0], diff[1:])
    up, down = jackknife_t_p(diff[0], diff[1:], 0.0, "greater"), jackknife_t_p(diff[0], diff[1:], 0.0, "less")
    p = np.minimum(1.0, 2 * np.minimum(up, down))
    padj = holm(p)
    return PairedDifference(name, va[0], vb[0], diff[0], low, high, p, padj, padj < alpha,
                            f"paired over {len(a.keys)} shared documents: jackknife over {n} document blocks, "
                            "two-sided t test, Holm over layers", n)


def summary_difference(name: str, a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray],
                       alpha: float = 1 - LEVEL) -> PairedDifference:
    """B - A from each run's (value, low, high): normal intervals, variances added (independent runs), Holm over layers."""
    from scipy.special import ndtr, ndtri

    z = ndtri(1 - (1 - LEVEL) / 2)
    (va, la, ha), (vb, lb, hb) = ([np.asarray(x, np.float64) for x in r] for r in (a, b))
    se = np.sqrt(((ha - la) / (2 * z)) ** 2 + ((hb - lb) / (2 * z)) ** 2)
    diff = vb - va
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(diff) / se
        p = np.where(se > 0, 2 * ndtr(-t), np.where(np.abs(diff) > 1e-12, 0.0, 1.0))
    p = np.where(np.isfinite(se), p, np.nan)
    padj = holm(p)
    return PairedDifference(name, va, vb, diff, diff - z * se, diff + z * se, p, padj, padj < alpha,
                            "from each run's own 95% intervals, taken as normal and independent (no paired test: "
                            "the runs' routing of shared documents was not at hand)", 0)
