"""Dead, dominant, collapsed, imbalanced: each judged beyond the sampling noise of the run's tokens.

A fixed factor of the fair share 1/E is an effect size, not evidence: with few tokens per
expert, balanced routing puts some experts over 2/E and others at 0 by chance alone. So a
threshold counts only when the data say the true share is past it:

- per expert, an exact binomial test of "the share is at the threshold" (a token selects the
  expert with probability k x share, independently: multinomial sampling of N tokens), at level
  alpha / (L x E) for all the run's experts; and, when the run resamples documents, the share's 95%
  threshold over documents (a jackknife t test over document blocks, Holm-corrected over the L x E experts)
  must hold too (tokens of a document are not independent); with fewer than 6 document blocks,
  no expert is judged;
- per layer, entropy and CV must also lie beyond what uniform routing of as many tokens gives
  (its alpha quantile), and beyond the threshold over the document interval when resampled (a
  jackknife over document blocks: a bootstrap's repeated documents lower an entropy and raise a CV).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from math import comb

import numpy as np
from scipy.stats import binom

from core.analysis.measures import entropy
from core.analysis.resampling import holm, jackknife_interval, jackknife_t_p, jackknife_weights, too_few_documents
from core.analysis.results import ResultMixin

NULL_DRAWS = 200  # draws of uniform routing for the layer-level nulls


@dataclass
class CollapseThresholds(ResultMixin):
    """Thresholds of the dead/dominant/collapse diagnosis, in units of the uniform share 1/E.

    - dead expert: utilization < ``dead_factor / E`` (default: under a tenth of its fair share)
    - dominant expert: utilization > ``dominant_factor / E`` (default: over twice its fair share)
    - collapsed layer: normalized utilization entropy < ``collapse_entropy`` (default 0.5),
      or at least ``collapse_dead_fraction`` of the experts dead (default half),
      or one expert selected by at least ``collapse_top_rate`` of the tokens while k/E <= 0.5
      (default 0.9; an expert nearly every token must use)
    - imbalanced layer (not collapsed): any dead or dominant expert, or CV > ``imbalance_cv`` (default 1.0)

    Each counts only beyond sampling noise at the run's number of tokens (module docstring):
    ``alpha`` is the level of those tests, shared by a layer's E experts.
    """

    dead_factor: float = 0.1
    dominant_factor: float = 2.0
    collapse_entropy: float = 0.5
    collapse_dead_fraction: float = 0.5
    collapse_top_rate: float = 0.9
    imbalance_cv: float = 1.0
    alpha: float = 0.05


@dataclass
class Diagnosis:
    """Per expert (``[L, E]``) and per layer, what the thresholds flag beyond noise, and the null used."""

    dead: np.ndarray
    dominant: np.ndarray
    diagnosis: list[str]  # [L] "collapsed" | "imbalanced" | "healthy"
    reasons: list[list[str]]
    null_note: str


def uniform_routing_counts(num_tokens: int, num_experts: int, top_k: int, draws: int, seed: int) -> tuple[np.ndarray, str]:
    """Expert loads ``[draws, E]`` when every token picks ``top_k`` distinct experts uniformly at random.

    Exact where the k-subsets can be listed (tokens per subset are multinomial); otherwise the
    assignments are drawn independently (slightly less even than distinct picks), and it says so.
    """
    rng = np.random.default_rng(seed)
    if comb(num_experts, top_k) <= 20_000:
        subsets = np.array(list(combinations(range(num_experts), top_k)))
        per_subset = rng.multinomial(num_tokens, np.full(len(subsets), 1 / len(subsets)), size=draws)
        onehot = np.zeros((len(subsets), num_experts))
        np.put_along_axis(onehot, subsets, 1.0, axis=1)
        return per_subset @ onehot, f"{draws} draws of {num_tokens} tokens"
    return rng.multinomial(num_tokens * top_k, np.full(num_experts, 1 / num_experts), size=draws).astype(float), \
        f"{draws} draws of {num_tokens} tokens, assignments independent"


def load_cv(counts: np.ndarray) -> np.ndarray:
    """Coefficient of variation of expert loads ``[..., E]`` (std over mean)."""
    return counts.std(-1) / np.clip(counts.mean(-1), 1e-300, None)


def load_entropy_norm(counts: np.ndarray) -> np.ndarray:
    """Entropy of expert loads ``[..., E]`` over log E: 1 is perfectly even."""
    E = counts.shape[-1]
    return entropy(counts / np.clip(counts.sum(-1, keepdims=True), 1e-300, None)) / (np.log(E) if E > 1 else 1.0)


def _expert_tests(th: CollapseThresholds, counts: np.ndarray, n: int, k: int, blocks: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """Dead and dominant experts ``[L, E]``, each test corrected over the L x E experts, and how they were judged.

    The binomial test treats tokens as independent, which documents are not; so with document
    blocks the share must also pass a jackknife t test over blocks (Holm over L x E), and with
    fewer than MIN_DOCUMENTS blocks nothing is flagged: a few documents cannot tell a dominant
    expert from a document that happens to use it (3 documents gave 2.7 false dominant experts).
    """
    L, E = counts.shape
    a = th.alpha / (L * E)
    util = counts / np.clip(counts.sum(1, keepdims=True), 1e-300, None)
    dead_at, dom_at = th.dead_factor / E, th.dominant_factor / E
    dead = (util < dead_at) & (binom.cdf(counts, n, min(1.0, k * dead_at)) < a)
    dominant = (util > dom_at) & (binom.sf(counts - 1, n, min(1.0, k * dom_at)) < a)
    how = f"a binomial test per expert at level {th.alpha:g}/(L x E) = {a:.2g}"
    if blocks is None:
        return dead, dominant, how
    used = blocks.sum((1, 2)) > 0
    if why := too_few_documents(used):
        none = np.zeros_like(dead)
        return none, none.copy(), f"no dead or dominant expert judged: {why}"
    loo = np.tensordot(jackknife_weights(used), blocks, axes=(1, 0))
    loo = loo / np.clip(loo.sum(-1, keepdims=True), 1e-300, None)
    dead &= holm(jackknife_t_p(util, loo, dead_at, "less")) < th.alpha
    dominant &= holm(jackknife_t_p(util, loo, dom_at, "greater")) < th.alpha
    return dead, dominant, how + ", and a jackknife t test over document blocks past the threshold (Holm over L x E)"


def diagnose(th: CollapseThresholds, counts: np.ndarray, num_tokens: int, top_k: int,
             block_counts: np.ndarray | None = None, resamples: int = 0, seed: int = 0) -> Diagnosis:
    """Judge ``counts [L, E]`` (tokens that selected each expert) of ``num_tokens`` tokens.

    ``block_counts [U, L, E]``: the same counts per document block, for tests over documents.
    """
    L, E = counts.shape
    n, k, a = max(int(num_tokens), 1), top_k, th.alpha / E
    resampled = block_counts is not None and resamples > 0 and (block_counts.sum((1, 2)) > 0).sum() >= 2
    dead, dominant, how = _expert_tests(th, counts, n, k, block_counts if resampled else None)
    top = counts.max(1)
    top_beyond = binom.sf(top - 1, n, th.collapse_top_rate) < a
    null, _ = uniform_routing_counts(n, E, k, NULL_DRAWS, seed)
    ent_null, cv_null = np.quantile(load_entropy_norm(null), th.alpha), np.quantile(load_cv(null), 1 - th.alpha)
    ent_hi = cv_lo = None
    if resampled:
        loo = np.tensordot(jackknife_weights(block_counts.sum((1, 2)) > 0), block_counts, axes=(1, 0))
        ent_hi = jackknife_interval(load_entropy_norm(counts), load_entropy_norm(loo), bounds=(0.0, 1.0))[1]  # resampling shifts
        cv_lo = jackknife_interval(load_cv(counts), load_cv(loo), bounds=(0.0, np.inf))[0]  # entropy and CV: jackknife
    ent, cv = load_entropy_norm(counts), load_cv(counts)
    diagnosis, reasons = [], []
    for li in range(L):
        why = []
        if ent[li] < th.collapse_entropy and ent[li] < ent_null and (ent_hi is None or ent_hi[li] < th.collapse_entropy):
            why.append(f"normalized utilization entropy {ent[li]:.3f} < {th.collapse_entropy}")
        if dead[li].mean() >= th.collapse_dead_fraction:
            why.append(f"{int(dead[li].sum())}/{E} experts dead (>= {th.collapse_dead_fraction:.0%})")
        if k / E <= 0.5 and top[li] / n >= th.collapse_top_rate and top_beyond[li]:
            why.append(f"expert {int(counts[li].argmax())} selected by {top[li] / n:.1%} of tokens")
        if why:
            diagnosis.append("collapsed")
        else:
            if dead[li].any():
                why.append(f"{int(dead[li].sum())} dead experts")
            if dominant[li].any():
                why.append(f"{int(dominant[li].sum())} dominant experts")
            if cv[li] > th.imbalance_cv and cv[li] > cv_null and (cv_lo is None or cv_lo[li] > th.imbalance_cv):
                why.append(f"load CV {cv[li]:.2f} > {th.imbalance_cv}")
            diagnosis.append("imbalanced" if why else "healthy")
        reasons.append(why)
    note = (f"beyond sampling noise at {n} tokens: {how}"
            + f"; layer entropy and CV beyond uniform routing of as many tokens ({NULL_DRAWS} draws)")
    return Diagnosis(dead, dominant, diagnosis, reasons, note)
