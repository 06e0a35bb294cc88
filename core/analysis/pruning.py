"""Expert pruning, evaluated: which experts can a model lose, and which way of choosing them keeps it best.

For each pruned fraction, every MoE layer loses that share of its experts at once (routing
renormalized over the rest, as in the single-expert ablation), chosen by each criterion:

- ``weight_mass``: least mean router probability (the routing weight an expert carries);
- ``collaboration``: least share in the mined collaboration patterns (pattern use x atom weight);
- ``usage``: least often selected;
- ``causal``: least loss increase when ablated alone (one forward pass per expert);
- ``random``: uniformly at random, over several seeds: the baseline.

Each pruned model's loss change is measured per domain with a 95% interval over documents
(:func:`core.analysis.ablation.ablation_study`). Whether a criterion beats random is a question
about which experts it picks, not about documents: the random seeds are draws of "a criterion
that knows nothing", so a criterion is tested as one more draw of them (a t prediction test on
the seeds' token-weighted loss changes, one-sided, Holm-corrected over criteria x fractions).
Comparing document intervals instead ignored how much random choices differ from each other.
Only "beats random" is claimed: random choices' loss changes are skewed to the right (a few
experts cost much more than the rest), so the same test for "worse than random" flags
uninformative criteria too often (6.7% of runs in docs/CALIBRATION.md's spread-cost world).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from core.analysis.ablation import ablation_study
from core.analysis.resampling import Estimate, null_p_value
from core.analysis.results import ResultMixin

FRACTIONS = (0.125, 0.25, 0.5)
RANDOM_SEEDS = 8  # random draws the verdict stands on: the t test has seeds - 1 degrees of freedom


@dataclass
class PruningResult(ResultMixin):
    """Loss change ``[criterion, fraction, domain]`` (nats per token) when each criterion prunes each fraction.

    ``random`` rows hold one row per seed (``random_seed_delta``) and their mean in ``delta``.
    ``overall*`` are token-weighted over domains. ``versus_random`` tests each criterion's overall
    change as one more random draw (``[C - 1, F]``, one-sided, Holm over them); ``beats_random[c, f]``
    is its verdict (False for random itself, and where there is no interval).
    """

    fractions: list[float]
    criteria: list[str]
    domains: list[str]
    tokens: np.ndarray  # [D]
    delta: np.ndarray  # [C, F, D]
    low: np.ndarray  # [C, F, D]
    high: np.ndarray  # [C, F, D]
    overall: np.ndarray  # [C, F]
    overall_low: np.ndarray  # [C, F]
    overall_high: np.ndarray  # [C, F]
    random_seed_overall: np.ndarray  # [S, F]
    beats_random: np.ndarray  # [C, F] bool (False for random itself)
    versus_random: Estimate | None
    removed: dict[str, dict[str, dict[int, list[int]]]]  # criterion -> fraction -> layer -> experts
    best: list[str]  # per fraction: the criterion with the least overall loss change
    experts_pruned: list[int] = field(default_factory=list)  # per fraction: experts removed from every layer
    num_experts: int = 0
    notes: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One row per (criterion, pruned fraction, domain): the loss change, its interval, and whether it beats random."""
        return pd.DataFrame([
            {"criterion": c, "pruned": f, "domain": d, "delta_nats": self.delta[i, j, k], "ci_low": self.low[i, j, k],
             "ci_high": self.high[i, j, k], "beats_random": bool(self.beats_random[i, j])}
            for i, c in enumerate(self.criteria) for j, f in enumerate(self.fractions) for k, d in enumerate(self.domains)])


def collaboration_share(atoms: np.ndarray, usage: np.ndarray) -> np.ndarray:
    """Each (layer, expert)'s share in the mined patterns: pattern use times its atom weight, ``[L, E]``."""
    return np.tensordot(np.asarray(usage, float), np.clip(np.asarray(atoms, float), 0, None), axes=(0, 0))


def pruned_count(fraction: float, num_experts: int) -> int:
    """Experts a layer loses at this fraction: ``round(fraction x E)``, at least one and never all."""
    return min(num_experts - 1, max(1, round(fraction * num_experts)))


def lowest(scores: np.ndarray, layers: Sequence[int], fraction: float) -> dict[int, list[int]]:
    """The :func:`pruned_count` lowest-scoring experts of every layer (ties: lower index first)."""
    n = pruned_count(fraction, scores.shape[1])
    return {int(layer): sorted(int(e) for e in np.argsort(row, kind="stable")[:n]) for layer, row in zip(layers, scores)}


def pruning_study(wrapper: Any, tokenized: Any, scores: dict[str, np.ndarray], layers: Sequence[int], *,
                  fractions: Sequence[float] = FRACTIONS, random_seeds: int = RANDOM_SEEDS, causal: bool = True,
                  batch_size: int = 16, progress: bool = False, resamples: int = 200, seed: int = 0) -> PruningResult:
    """Prune each fraction of every layer's experts by each criterion (``scores[name] [L, E]``, low = prune first).

    ``causal`` adds the criterion from single-expert ablations (L x E extra forward passes).
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"pruned fractions must be in (0, 1), got {fractions}")
    if random_seeds < 3:
        raise ValueError(f"the random baseline needs at least 3 seeds for its test, got random_seeds={random_seeds}")
    scores = {k: np.asarray(v, float) for k, v in scores.items()}
    L, E = next(iter(scores.values())).shape
    if causal:
        singles = [{int(layer): [e]} for layer in layers for e in range(E)]
        res = ablation_study(wrapper, tokenized, singles, batch_size=batch_size, progress=progress, resamples=0)
        w = res.tokens / max(res.tokens.sum(), 1)
        scores["causal"] = (np.nan_to_num(res.delta) @ w).reshape(L, E)
    rng = np.random.default_rng(seed)
    randoms = [rng.random((L, E)) for _ in range(random_seeds)]
    chosen = list(scores.items()) + [(f"random#{i}", r) for i, r in enumerate(randoms)]
    targets, keys = [], []
    for name, s in chosen:
        for f in fractions:
            targets.append(lowest(s, layers, f))
            keys.append((name, f))
    res = ablation_study(wrapper, tokenized, targets, labels=[f"{n} {f:.3g}" for n, f in keys], batch_size=batch_size,
                         progress=progress, resamples=resamples, seed=seed)
    out = _collect(res, list(scores), keys, fractions, random_seeds, targets)
    out.experts_pruned, out.num_experts = [pruned_count(f, E) for f in fractions], int(E)
    return out


def _collect(res: Any, names: list[str], keys: list[tuple[str, float]], fractions: list[float], seeds: int,
             targets: list[dict[int, list[int]]]) -> PruningResult:
    """The ablation of every (criterion, fraction) as arrays; random seeds averaged into one criterion."""
    F, D = len(fractions), len(res.domains)
    w = res.tokens / max(res.tokens.sum(), 1)
    est = res.estimate
    low = np.asarray(est.low if est is not None else res.delta, float)
    high = np.asarray(est.high if est is not None else res.delta, float)
    per = {k: (res.delta[i], low[i], high[i]) for i, k in enumerate(keys)}
    crit = names + ["random"]
    delta, lo, hi = (np.zeros((len(crit), F, D)) for _ in range(3))
    for c, name in enumerate(names):
        for j, f in enumerate(fractions):
            delta[c, j], lo[c, j], hi[c, j] = per[(name, f)]
    rs = [[per[(f"random#{s}", f)] for f in fractions] for s in range(seeds)]
    for j in range(F):
        delta[-1, j] = np.mean([rs[s][j][0] for s in range(seeds)], 0)
        lo[-1, j] = np.min([rs[s][j][1] for s in range(seeds)], 0)
        hi[-1, j] = np.max([rs[s][j][2] for s in range(seeds)], 0)
    over = lambda x: np.where(w > 0, x, 0.0) @ w  # noqa: E731  a domain without tokens weighs 0; one without an interval leaves none
    overall, o_lo, o_hi = (over(x) for x in (delta, lo, hi))
    seed_overall = np.array([[over(rs[s][j][0]) for j in range(F)] for s in range(seeds)])
    versus = versus_random(overall[:-1], o_lo[:-1], o_hi[:-1], seed_overall)
    beats = np.zeros((len(crit), F), bool)
    beats[:-1] = versus.distinguishable
    removed = {name: {f"{f:.3g}": targets[i] for i, (n, f) in enumerate(keys) if n == name} for name in names}
    best = [crit[int(np.argmin(overall[:, j]))] for j in range(F)]
    notes = list(res.notes) + [  # the ablation's: domains without tokens, or without an interval
             "overall: token-weighted over domains, its interval the token-weighted domains' bounds (at least as wide "
             "as the interval of the weighted mean); random: the seeds' mean, its interval spanning every seed's"]
    return PruningResult(fractions, crit, list(res.domains), res.tokens, delta, lo, hi, overall, o_lo, o_hi,
                         seed_overall, beats, versus, removed, best, notes=notes)  # by name: it once landed in experts_pruned


def versus_random(overall: np.ndarray, low: np.ndarray, high: np.ndarray, seeds: np.ndarray) -> Estimate:
    """Each criterion's overall loss change ``[C, F]`` against the random seeds' ``[S, F]``, as one more of their draws.

    One-sided t prediction test (S - 1 degrees of freedom) of whether a criterion beats random;
    Holm over every (criterion, fraction). No verdict where the criterion has no interval over
    documents (too few documents).
    """
    overall, seeds = np.asarray(overall, float), np.asarray(seeds, float)
    p = null_p_value(overall, seeds[:, None, :].repeat(len(overall), 1), alternative="less")
    p = np.where(np.isfinite(low) & np.isfinite(high), p, np.nan)
    null = np.broadcast_to(seeds.mean(0), overall.shape).copy()
    lo, hi = (np.broadcast_to(f(seeds, 0), overall.shape).copy() for f in (np.min, np.max))
    est = Estimate(overall, np.asarray(low, float), np.asarray(high, float), null, lo, hi,
                   f"a random choice of the same number of experts ({len(seeds)} seeds)", len(seeds),
                   p_value=p, why_none="" if np.isfinite(p).any() else "too few documents for an interval")
    return est.corrected()


def pruning_scores(stats: Any, collaboration: Any = None) -> dict[str, np.ndarray]:
    """The criteria the run's results give without more forward passes: weight mass, collaboration share, usage."""
    out = {}
    if getattr(stats, "mean_prob", None) is not None:
        out["weight_mass"] = np.asarray(stats.mean_prob, float)
    if collaboration is not None:
        out["collaboration"] = collaboration_share(collaboration.atoms, collaboration.usage)
    out["usage"] = np.asarray(stats.utilization, float)
    return out
