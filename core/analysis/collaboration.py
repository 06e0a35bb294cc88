"""Expert collaboration mining (seed 003): which (layer, expert) units fire together, and for which domains.

Each sampled token becomes a row of a token x (layer x expert) activation matrix (routing
weight where it reaches the threshold, else 0). The threshold is scale-free by default: a
selection counts when its share of the token's selected weight reaches ``activation_threshold``
times the uniform share 1/k (for ``weight="probs"``: probability over 1/E). So top-2 normalized
weights and OLMoE's unnormalized top-8 of 64 are cut at the same relative level; the seed's
absolute cut is ``threshold_rule="absolute"``. Sparse non-negative dictionary
learning (scikit-learn) finds recurring co-activation patterns across layers; decomposing
the dictionary again gives coarser meta-patterns (the hierarchical variant). Patterns are
ranked by how specific they are to one domain, and the top domain-specialized experts of
each domain are listed against the k/E baseline.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from sklearn.decomposition import MiniBatchDictionaryLearning

from core.analysis.shuffles import token_uniforms
from core.analysis.results import ResultMixin
from core.analysis.sparse_coding import PositiveDictionaryLearning, counted_convergence_warnings
from core.analysis.specialization import DomainSpecialization, DomainSpecializationAccumulator
from core.analysis.streaming import RoutingAccumulator, as_chunks, chunk_seed, fold_one, group_ids, require
from core.routing_data import RoutingData

BATCH_ROWS = 256  # rows per mini-batch update of the dictionary


@dataclass
class ActivationMatrix:
    """Sampled tokens' activations ``[n, L*E]`` (column ``l*E + e``) with their group ids ``[n]``."""

    values: np.ndarray
    groups: np.ndarray
    moe_layers: list[int]
    num_experts: int
    group_names: list[str]
    num_tokens_seen: int


@dataclass
class CollaborationResult(ResultMixin):
    """Co-activation patterns and their domain specificity.

    ``atoms[k, l, e]``: non-negative dictionary atom k (unit norm over all units).
    ``domain_activation[k, d]``: mean code of pattern k over domain d's sampled tokens;
    ``domain_share`` normalizes it over domains; ``specificity[k] = max_d domain_share``
    (1/D = no preference, 1 = one domain only); ``ranking`` sorts patterns by it.
    ``meta_atoms``/``meta_codes``: the dictionary decomposed again (``atoms ~ meta_codes @ meta_atoms``);
    ``pattern_meta[k]`` is the meta-pattern (family) pattern k belongs to most.
    ``top_experts[domain]``: the ``top_k`` (layer, expert) units with the highest share/(k/E).
    """

    params: dict
    moe_layers: list[int]
    num_experts: int
    group_names: list[str]
    num_tokens_seen: int
    num_tokens_sampled: int
    atoms: np.ndarray  # [K, L, E]
    usage: np.ndarray  # [K] mean code over sampled tokens
    domain_activation: np.ndarray  # [K, D]
    domain_share: np.ndarray  # [K, D]
    specificity: np.ndarray  # [K]
    preferred_domain: np.ndarray  # [K]
    ranking: list[int]
    domain_ranking: dict[str, list[int]]  # patterns by descending share of that domain
    meta_atoms: np.ndarray  # [M, L, E]
    meta_codes: np.ndarray  # [K, M]
    pattern_meta: np.ndarray  # [K] meta-pattern each pattern loads on most
    reconstruction_error: float  # ||X - codes @ atoms||_F / ||X||_F on the sample
    top_experts: dict[str, list[dict]]
    specialization: DomainSpecialization
    notes: list[str] = field(default_factory=list)

    def pattern_units(self, k: int, n: int = 10, min_weight: float = 1e-3) -> list[tuple[int, int, float]]:
        """The ``n`` heaviest (model layer, expert, weight) units of pattern ``k``."""
        a = self.atoms[k]
        order = np.argsort(-a, axis=None)[:n]
        li, ei = np.unravel_index(order, a.shape)
        return [(int(self.moe_layers[l]), int(e), float(a[l, e])) for l, e in zip(li, ei) if a[l, e] > min_weight]


class CollaborationMiner:
    """Dictionary-learning miner of cross-layer expert co-activation (parameters as in seed 003).

    ``weight``: "topk_weight" (the weight the expert received; 0 if unselected) or "probs".
    ``n_components`` patterns, ``n_meta_components`` meta-patterns, ``alpha`` sparsity.
    ``activation_threshold``: with ``threshold_rule="relative"`` (default) a fraction of the uniform
    share (1/k of the token's selected weight); with "absolute" a weight, as in seed 003.
    Uses scikit-learn's batch dictionary learning, all rows coded at once (:mod:`core.analysis.sparse_coding`),
    up to ``batch_threshold`` sampled tokens and ``MiniBatchDictionaryLearning`` beyond. Memory stays bounded
    whatever the number of tokens: a uniform sample of at most ``max_rows`` sampled tokens is kept (see
    :class:`CollaborationAccumulator`), and the patterns are learned and measured on it.
    Memory: ``max_rows x L x E`` float32 (82 MB at OLMoE's 16 x 64).
    """

    def __init__(
        self,
        activation_threshold: float = 0.2,
        sample_ratio: float = 1 / 3,
        random_seed: int = 42,
        top_k: int = 10,
        n_components: int = 16,
        n_meta_components: int = 4,
        alpha: float = 0.1,
        weight: Literal["topk_weight", "probs"] = "topk_weight",
        by: Literal["domain", "dataset"] = "domain",
        max_iter: int = 200,
        batch_threshold: int = 5000,
        threshold_rule: Literal["relative", "absolute"] = "relative",
        max_rows: int = 20_000,
    ) -> None:
        if not 0 < sample_ratio <= 1:
            raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
        if activation_threshold < 0:
            raise ValueError(f"activation_threshold must be >= 0, got {activation_threshold}")
        if threshold_rule not in ("relative", "absolute"):
            raise ValueError(f"threshold_rule must be 'relative' or 'absolute', got {threshold_rule!r}")
        if weight not in ("topk_weight", "probs"):
            raise ValueError(f"weight must be 'topk_weight' or 'probs', got {weight!r}")
        if by not in ("domain", "dataset"):
            raise ValueError(f"by must be 'domain' or 'dataset', got {by!r}")
        if max_rows < batch_threshold:
            raise ValueError(f"max_rows ({max_rows}) must be at least batch_threshold ({batch_threshold})")
        if n_components < 1 or not 1 <= n_meta_components <= n_components:
            raise ValueError(f"need 1 <= n_meta_components <= n_components, got {n_meta_components}, {n_components}")
        self.activation_threshold = activation_threshold
        self.sample_ratio = sample_ratio
        self.random_seed = random_seed
        self.top_k = top_k
        self.n_components = n_components
        self.n_meta_components = n_meta_components
        self.alpha = alpha
        self.weight = weight
        self.by = by
        self.max_iter = max_iter
        self.batch_threshold = batch_threshold
        self.threshold_rule = threshold_rule
        self.max_rows = max_rows

    def params(self) -> dict:
        return dict(vars(self))

    def _activations(self, rd: RoutingData) -> np.ndarray:
        if self.weight == "probs":
            require(rd, "router_logits", why="collaboration mining on probabilities")
            a = rd.probs().double().numpy()
            uniform = 1.0 / rd.num_experts
        else:
            require(rd, "topk_idx", "topk_weight", why="collaboration mining on top-k weights")
            a = np.zeros((rd.num_tokens, rd.num_layers, rd.num_experts))
            idx = rd.topk_idx.numpy()
            w = rd.topk_weight.double().numpy()
            n, l, k = np.nonzero(rd.selected_slots().numpy())
            a[n, l, idx[n, l, k]] = w[n, l, k]
            uniform = 1.0 / rd.top_k
        if self.threshold_rule == "absolute":
            keep = a >= self.activation_threshold
        else:
            share = a / np.clip(a.sum(-1, keepdims=True), 1e-300, None)
            keep = (share >= self.activation_threshold * uniform) & (a > 0)
        return np.where(keep, a, 0.0).reshape(rd.num_tokens, -1)

    def accumulator(self) -> "CollaborationAccumulator":
        """The streaming half of :meth:`fit`: feed it chunks (e.g. from ``fold``); ``result()`` mines the patterns."""
        return CollaborationAccumulator(self)

    def activation_matrix(self, routing: RoutingData | Iterable[RoutingData]) -> ActivationMatrix:
        """Sample ``sample_ratio`` of each chunk's tokens (seeded) into the activation matrix."""
        acc = self.accumulator()
        for chunk in as_chunks(routing):
            acc.update(chunk)
        return acc.matrix()

    def _learner_kwargs(self, n_components: int, alpha: float) -> dict:
        """Settings shared by the pattern and meta-pattern learners (non-negative codes and atoms)."""
        return {
            "n_components": n_components,
            "alpha": alpha,
            "max_iter": self.max_iter,
            "fit_algorithm": "cd",
            "transform_algorithm": "lasso_cd",
            "transform_alpha": alpha,
            "positive_code": True,
            "positive_dict": True,
            "random_state": self.random_seed,
        }

    def _learner(self, n_components: int, n_rows: int, alpha: float | None = None):
        """scikit-learn's batch algorithm with all rows coded at once (:mod:`core.analysis.sparse_coding`) up to
        ``batch_threshold`` rows, its mini-batch one beyond."""
        alpha = self.alpha if alpha is None else alpha
        if n_rows <= self.batch_threshold:
            return PositiveDictionaryLearning(n_components, alpha=alpha, max_iter=self.max_iter, transform_alpha=alpha,
                                              random_state=self.random_seed)
        return MiniBatchDictionaryLearning(batch_size=BATCH_ROWS, **self._learner_kwargs(n_components, alpha))

    def fit(self, routing: RoutingData | Iterable[RoutingData]) -> CollaborationResult:
        """Mine co-activation patterns, their hierarchy, domain specificity and top experts per domain."""
        return fold_one(routing, self.accumulator())

    def fit_matrix(self, am: ActivationMatrix, spec: DomainSpecialization,
                   num_sampled: int | None = None) -> CollaborationResult:
        """Mine the patterns of a sampled activation matrix; ``spec`` is the specialization of all tokens seen.

        ``num_sampled``: how many tokens were sampled, when the matrix keeps a uniform part of them.
        """
        X, g = am.values.astype(np.float64), am.groups
        L, E = len(am.moe_layers), am.num_experts
        K = min(self.n_components, X.shape[0])
        notes = self._sample_notes(X.shape[0], K, num_sampled)
        atoms, codes, err, bad1 = self._learn_patterns(X, K)
        D = len(spec.group_names)
        dom_act, share = _domain_use(codes, g, K, D)
        spec_k = share.max(1)
        ranking = [int(i) for i in np.argsort(-spec_k, kind="stable")]
        dom_rank = {spec.group_names[d]: [int(i) for i in np.argsort(-share[:, d], kind="stable")] for d in range(D)}
        M = min(self.n_meta_components, K)
        meta = self._learner(M, len(atoms), self.alpha / 10)
        meta_codes, bad2 = _fit_transform(meta, atoms)
        if bad1 + bad2:
            notes.append(
                f"{bad1 + bad2} sparse-coding steps stopped before convergence; raise max_iter if atoms look noisy"
            )
        top = self._top_experts(spec)
        return CollaborationResult(
            params=self.params(),
            moe_layers=am.moe_layers,
            num_experts=E,
            group_names=spec.group_names,
            num_tokens_seen=am.num_tokens_seen,
            num_tokens_sampled=int(num_sampled if num_sampled is not None else X.shape[0]),
            atoms=atoms.reshape(K, L, E),
            usage=codes.mean(0),
            domain_activation=dom_act,
            domain_share=share,
            specificity=spec_k,
            preferred_domain=share.argmax(1),
            ranking=ranking,
            domain_ranking=dom_rank,
            meta_atoms=meta.components_.reshape(M, L, E),
            meta_codes=meta_codes,
            pattern_meta=meta_codes.argmax(1),
            reconstruction_error=err,
            top_experts=top,
            specialization=spec,
            notes=notes,
        )

    def _sample_notes(self, n_rows: int, K: int, num_sampled: int | None) -> list[str]:
        """What the result says about the sample's size: fewer patterns than asked, or a uniform part of the tokens."""
        notes = []
        if K < self.n_components:
            notes.append(f"only {n_rows} sampled tokens: learned {K} patterns instead of {self.n_components}")
        if num_sampled is not None and num_sampled > n_rows:
            notes.append(f"patterns learned and measured on a uniform sample of {n_rows} of the {num_sampled} "
                         "sampled tokens (max_rows)")
        return notes

    def _learn_patterns(self, X: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray, float, int]:
        """Unit-norm atoms, codes rescaled to match, relative reconstruction error and unconverged steps of ``K`` patterns."""
        learner = self._learner(K, X.shape[0])
        raw_codes, bad = _fit_transform(learner, X)
        norms = np.linalg.norm(learner.components_, axis=1, keepdims=True)
        atoms = learner.components_ / np.clip(norms, 1e-12, None)
        codes = raw_codes * norms.T
        xn = np.linalg.norm(X)
        err = float(np.linalg.norm(X - codes @ atoms) / xn) if xn > 0 else 0.0
        return atoms, codes, err, bad

    def _top_experts(self, spec: DomainSpecialization) -> dict[str, list[dict]]:
        """The ``top_k`` most specialized experts of every domain that had tokens, as records."""
        top = {}
        for d, name in enumerate(spec.group_names):
            if spec.tokens[d] == 0:
                continue
            t = spec.top_experts(d, self.top_k)
            top[name] = t.to_dict(orient="records")
        return top


def _domain_use(codes: np.ndarray, g: np.ndarray, K: int, D: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean code of each pattern per domain ``[K, D]`` and each pattern's share of it per domain (rows sum to 1)."""
    dom_act = np.zeros((K, D))
    for d in range(D):
        if (g == d).any():
            dom_act[:, d] = codes[g == d].mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.nan_to_num(dom_act / dom_act.sum(1, keepdims=True), nan=0.0)
    return dom_act, share


def _fit_transform(estimator, X: np.ndarray) -> tuple[np.ndarray, int]:
    """Fit and encode, counting unconverged sparse-coding steps instead of printing hundreds of warnings."""
    with counted_convergence_warnings() as unconverged:
        codes = estimator.fit(X).transform(X)
    return codes, unconverged[0] + getattr(estimator, "unconverged_", 0)


class CollaborationAccumulator(RoutingAccumulator):
    """Samples each chunk's tokens (and counts domain specialization over all of them), in bounded memory.

    A chunk samples ``sample_ratio`` of its tokens with a seed from where the chunk is, and every
    sampled row draws a uniform priority; the ``max_rows`` rows of lowest priority are kept, in
    stream order (a bottom-k sample: uniform over all sampled tokens). Shares of a stream read by
    several processes therefore merge into exactly the sample one process keeps. The patterns
    are learned on that sample by ``result()``.
    """

    needs = ("topk_idx",)

    def __init__(self, miner: CollaborationMiner) -> None:
        super().__init__()
        self.miner = miner
        self.name = f"collaboration mining by {miner.by}"
        self.spec = DomainSpecializationAccumulator(miner.by)
        self.rows: np.ndarray | None = None  # kept rows [<= max_rows, L*E] float32, in stream order
        self.groups = np.zeros(0, np.int64)
        self.priority = np.zeros(0)
        self.sampled = 0

    def _add(self, chunk: RoutingData) -> None:
        ids = group_ids(chunk, self.miner.by)
        self.spec.update(chunk)
        pick, priority = self._sample(chunk)
        if not len(pick):
            return
        self.sampled += len(pick)
        if len(self.priority) >= self.miner.max_rows:  # rows that cannot make the sample are never computed
            enter = priority < self.priority.max()
            pick, priority = pick[enter], priority[enter]
            if not len(pick):
                return
        x = self.miner._activations(chunk.select(torch.from_numpy(pick.astype(np.int64)))).astype(np.float32)
        self._keep(x, ids[pick], priority)

    def _sample(self, chunk: RoutingData) -> tuple[np.ndarray, np.ndarray]:
        """The tokens sampled (about ``sample_ratio`` of them) and their priorities, from where each token is.

        Each token's draw depends on its dataset, document and position only, so the sample is the
        same however the stream is cut; without those labels, ``sample_ratio`` of the chunk is drawn
        with a seed from where the chunk starts.
        """
        u = token_uniforms(chunk, self.miner.random_seed, 0)
        if u is not None:
            pick = np.flatnonzero(u < self.miner.sample_ratio)
            return pick, token_uniforms(chunk, self.miner.random_seed, 1)[pick]
        m = round(chunk.num_tokens * self.miner.sample_ratio)
        rng = np.random.default_rng(chunk_seed(chunk, self.miner.random_seed))
        pick = np.sort(rng.choice(chunk.num_tokens, size=m, replace=False))
        return pick, rng.random(m)

    def _keep(self, x: np.ndarray, g: np.ndarray, priority: np.ndarray) -> None:
        """Append rows, then keep the ``max_rows`` of lowest priority in the order they came."""
        self.rows = x if self.rows is None else np.concatenate([self.rows, x])
        self.groups = np.concatenate([self.groups, g])
        self.priority = np.concatenate([self.priority, priority])
        cap = self.miner.max_rows
        if len(self.priority) > cap:
            keep = np.sort(np.argpartition(self.priority, cap - 1)[:cap])
            self.rows, self.groups, self.priority = self.rows[keep], self.groups[keep], self.priority[keep]

    def _merge(self, other: "CollaborationAccumulator") -> None:
        self.spec = self.spec.merge(other.spec)
        self.sampled += other.sampled
        if other.rows is not None:
            self._keep(other.rows, other.groups, other.priority)

    def matrix(self) -> ActivationMatrix:
        if self.layout is None or self.rows is None or not len(self.rows):
            raise ValueError("no tokens were sampled for collaboration mining (empty routing or too small sample_ratio)")
        names = self.domain_names if self.miner.by == "domain" else self.dataset_names
        return ActivationMatrix(self.rows, self.groups, list(self.layout.moe_layers), self.layout.num_experts, names,
                                self.num_tokens)

    def _result(self) -> CollaborationResult:
        return self.miner.fit_matrix(self.matrix(), self.spec.result(), num_sampled=self.sampled)
