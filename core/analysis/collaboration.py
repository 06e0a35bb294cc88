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

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from sklearn.decomposition import DictionaryLearning, MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning

from core.analysis.results import ResultMixin
from core.analysis.specialization import DomainSpecialization, DomainSpecializationAccumulator
from core.analysis.streaming import RoutingAccumulator, as_chunks, fold_one, group_ids, require
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
    Uses batch ``DictionaryLearning`` up to ``batch_threshold`` sampled tokens. Beyond that,
    memory stays bounded whatever the number of tokens: every sampled token updates a
    ``MiniBatchDictionaryLearning`` by ``partial_fit`` as the chunks stream past, and a uniform
    reservoir of at most ``max_rows`` sampled tokens is kept to refine the dictionary and to
    measure each domain's codes. Memory: ``max_rows x L x E`` float32 (82 MB at OLMoE's 16 x 64).
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

    def _learner(self, n_components: int, n_rows: int, init: np.ndarray | None = None):
        kw = self._learner_kwargs(n_components, self.alpha)
        if n_rows <= self.batch_threshold and init is None:
            return DictionaryLearning(**kw)
        if init is not None and init.shape[0] == n_components:
            kw["dict_init"] = init
        return MiniBatchDictionaryLearning(batch_size=BATCH_ROWS, **kw)

    def streaming_learner(self) -> MiniBatchDictionaryLearning:
        """The learner every sampled token updates with ``partial_fit`` while the chunks stream past."""
        return MiniBatchDictionaryLearning(batch_size=BATCH_ROWS, **self._learner_kwargs(self.n_components, self.alpha))

    def fit(self, routing: RoutingData | Iterable[RoutingData]) -> CollaborationResult:
        """Mine co-activation patterns, their hierarchy, domain specificity and top experts per domain."""
        return fold_one(routing, self.accumulator())

    def fit_matrix(self, am: ActivationMatrix, spec: DomainSpecialization, init: np.ndarray | None = None,
                   num_sampled: int | None = None) -> CollaborationResult:
        """Mine the patterns of a sampled activation matrix; ``spec`` is the specialization of all tokens seen.

        ``init``: a dictionary already learned from every sampled token (``num_sampled`` of them),
        refined here on the matrix (a reservoir of them).
        """
        X, g = am.values.astype(np.float64), am.groups
        L, E = len(am.moe_layers), am.num_experts
        notes = []
        K = min(self.n_components, X.shape[0])
        if K < self.n_components:
            notes.append(f"only {X.shape[0]} sampled tokens: learned {K} patterns instead of {self.n_components}")
        if num_sampled is not None and num_sampled > X.shape[0]:
            notes.append(f"patterns learned from all {num_sampled} sampled tokens as they streamed past, refined and "
                         f"measured on a uniform reservoir of {X.shape[0]} of them")
        learner = self._learner(K, X.shape[0], init)
        raw_codes, bad1 = _fit_transform(learner, X)
        norms = np.linalg.norm(learner.components_, axis=1, keepdims=True)
        atoms = learner.components_ / np.clip(norms, 1e-12, None)
        codes = raw_codes * norms.T
        xn = np.linalg.norm(X)
        err = float(np.linalg.norm(X - codes @ atoms) / xn) if xn > 0 else 0.0
        D = len(spec.group_names)
        dom_act = np.zeros((K, D))
        for d in range(D):
            if (g == d).any():
                dom_act[:, d] = codes[g == d].mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.nan_to_num(dom_act / dom_act.sum(1, keepdims=True), nan=0.0)
        spec_k = share.max(1)
        ranking = [int(i) for i in np.argsort(-spec_k, kind="stable")]
        dom_rank = {spec.group_names[d]: [int(i) for i in np.argsort(-share[:, d], kind="stable")] for d in range(D)}
        M = min(self.n_meta_components, K)
        meta = DictionaryLearning(**self._learner_kwargs(M, self.alpha / 10))
        meta_codes, bad2 = _fit_transform(meta, atoms)
        if bad1 + bad2:
            notes.append(
                f"{bad1 + bad2} sparse-coding steps stopped before convergence; raise max_iter if atoms look noisy"
            )
        top = {}
        for d, name in enumerate(spec.group_names):
            if spec.tokens[d] == 0:
                continue
            t = spec.top_experts(d, self.top_k)
            top[name] = t.to_dict(orient="records")
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


def _fit_transform(estimator, X: np.ndarray) -> tuple[np.ndarray, int]:
    """Fit and encode, counting sklearn's convergence warnings instead of printing hundreds of them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        codes = estimator.fit(X).transform(X)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return codes, sum(issubclass(w.category, ConvergenceWarning) for w in caught)


class CollaborationAccumulator(RoutingAccumulator):
    """Samples each chunk's tokens (and counts domain specialization over all of them), in bounded memory.

    Sampled rows go to a uniform reservoir of at most ``max_rows`` (Algorithm R) and, once more
    than ``batch_threshold`` have been sampled, to the streaming dictionary learner in batches.
    """

    needs = ("topk_idx",)

    def __init__(self, miner: CollaborationMiner) -> None:
        super().__init__()
        self.miner = miner
        self.name = f"collaboration mining by {miner.by}"
        self.rng = np.random.default_rng(miner.random_seed)
        self.spec = DomainSpecializationAccumulator(miner.by)
        self.rows: np.ndarray | None = None  # reservoir [<= max_rows, L*E] float32
        self.groups = np.zeros(0, np.int64)
        self.sampled = 0
        self.learner: MiniBatchDictionaryLearning | None = None
        self.pending: list[np.ndarray] = []  # rows not yet given to the streaming learner (< BATCH_ROWS)

    def _add(self, chunk: RoutingData) -> None:
        ids = group_ids(chunk, self.miner.by)
        self.spec.update(chunk)
        m = round(chunk.num_tokens * self.miner.sample_ratio)
        if m == 0:
            return
        pick = np.sort(self.rng.choice(chunk.num_tokens, size=m, replace=False))
        x = self.miner._activations(chunk.select(torch.from_numpy(pick.astype(np.int64)))).astype(np.float32)
        before = self.sampled
        self._reservoir(x, ids[pick])
        self.sampled += m
        if self.sampled > self.miner.batch_threshold:
            self._stream(x, before)

    def _reservoir(self, x: np.ndarray, g: np.ndarray) -> None:
        cap = self.miner.max_rows
        if self.rows is None:
            self.rows = np.zeros((0, x.shape[1]), np.float32)
        room = max(0, cap - len(self.rows))
        if room:
            self.rows = np.concatenate([self.rows, x[:room]])
            self.groups = np.concatenate([self.groups, g[:room]])
        rest = np.arange(room, len(x))
        if len(rest):
            slot = self.rng.integers(0, self.sampled + rest + 1)  # row t replaces a random earlier one with p = cap/(t+1)
            take = slot < cap
            slot, rest = slot[take], rest[take]
            last = len(slot) - 1 - np.unique(slot[::-1], return_index=True)[1]  # a slot drawn twice keeps the later row
            self.rows[slot[last]] = x[rest[last]]
            self.groups[slot[last]] = g[rest[last]]

    def _stream(self, x: np.ndarray, before: int) -> None:
        """Give sampled rows to the streaming learner in full batches.

        On the first call the ``before`` rows sampled earlier go too: the reservoir still holds them all.
        """
        if self.learner is None:
            self.learner = self.miner.streaming_learner()
            x = np.concatenate([self.rows[:before], x])
        self.pending.append(x)
        buf = np.concatenate(self.pending)
        full = len(buf) // BATCH_ROWS * BATCH_ROWS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for lo in range(0, full, BATCH_ROWS):
                self.learner.partial_fit(buf[lo: lo + BATCH_ROWS].astype(np.float64))
        self.pending = [buf[full:]]

    def matrix(self) -> ActivationMatrix:
        if self.layout is None or self.rows is None or not len(self.rows):
            raise ValueError("no tokens were sampled for collaboration mining (empty routing or too small sample_ratio)")
        names = self.domain_names if self.miner.by == "domain" else self.dataset_names
        return ActivationMatrix(self.rows, self.groups, list(self.layout.moe_layers), self.layout.num_experts, names,
                                self.num_tokens)

    def _result(self) -> CollaborationResult:
        init = getattr(self.learner, "components_", None) if self.learner is not None else None
        return self.miner.fit_matrix(self.matrix(), self.spec.result(), init=init, num_sampled=self.sampled)
