"""Expert weight analysis: each expert's input subspace and how well its router row aligns with it.

An expert reads the hidden state through its input-side projections (gate and up; up only
for 2-matrix experts). The span of their top right singular vectors is the expert's input
subspace. If the router row for expert e lies inside that subspace, the router selects the
expert on the very directions the expert reads. Softmax router rows are centred first (the
routing ignores a shift shared by all rows; sigmoid rows are kept). The score only means something
against baselines: random subspaces of the same dimension (exactly r/H on average, large when r
is a large share of H, and too easy for anisotropic trained weights), and the test that matters,
a permutation null over experts: does row e align with its own expert more than with the others?
Permuting experts keeps every router row and every expert subspace as it is, anisotropy included
(only the pairing is lost), so unlike a random rotation it cannot mistake directions all experts
share for alignment. Layers are tested together: Holm's correction over them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.analysis.measures import (
    center_router_rows, check_score_fn, draws_for_holm, layer_rng, require_score_fn, score_fn_of,
)
from core.analysis.resampling import holm, interval, p_value
from core.analysis.results import ResultMixin

ExpertWeights = Mapping[int, Mapping[str, "torch.Tensor | np.ndarray | None"]]
RouterWeights = Mapping[int, "torch.Tensor | np.ndarray"]


@dataclass
class ExpertSubspaces(ResultMixin):
    """Input subspace of each expert: rank chosen per expert, bases in hidden space.

    ``ranks[l, e]`` is a fixed ``rank`` if given, else the fewest components holding
    ``energy`` of the squared spectrum of the stacked input projections ``[gate; up]``.
    ``bases[layer][e]`` is an orthonormal ``[H, r]`` basis (not serialized by ``to_dict``).
    """

    layers: list[int]
    num_experts: int
    hidden_size: int
    projections: list[str]  # which matrices were stacked, e.g. ["gate", "up"]
    ranks: np.ndarray  # [L, E]
    singular_values: list[np.ndarray]  # per layer [E, min(rows, H)]
    energy: float | None
    rank: int | None
    bases: dict[int, list[np.ndarray]]

    _not_serialized = ("bases",)


@dataclass
class AlignmentResult(ResultMixin):
    """Fraction of each router row's energy inside expert input subspaces (all shares in [0, 1]).

    Router rows are centred first when ``centered`` (softmax routers: ``score_fn``).
    Per layer (axis 0) and expert (axis 1): ``own`` = ||U_e^T r_e||^2; ``other_mean``/``other_std``
    over e' != e; ``cross[l, i, j]`` = share of router row i in expert j's subspace.
    ``random_mean`` = r_e/H, the exact expected share for a random r_e-dim subspace, and
    ``random_std`` its exact spread (Beta(r/2, (H-r)/2)): a reference only, since trained weights
    are anisotropic and beat it easily.

    The test, per layer: does row e align with its own expert more than with the others?
    Statistic ``mean_own`` = mean over e of ``own``; null = the same statistic with the experts
    permuted (row e against expert pi(e)), ``num_permutations`` draws from a stream seeded by
    ``seed`` and the layer index (at least enough for the smallest p to pass Holm's correction over
    the layers). ``perm_null_mean`` = its exact mean (mean of ``cross``),
    ``perm_null_low/high`` = 2.5/97.5% quantiles of the draws, ``perm_p`` = (1 + #{null >= observed})
    / (1 + num_permutations), ``perm_p_adjusted`` = ``perm_p`` after Holm's correction over the
    layers (the verdict a finding counts), ``effect`` = ``mean_own - perm_null_mean``.
    """

    layers: list[int]
    num_experts: int
    hidden_size: int
    ranks: np.ndarray  # [L, E]
    own: np.ndarray  # [L, E]
    other_mean: np.ndarray  # [L, E]
    other_std: np.ndarray  # [L, E]
    random_mean: np.ndarray  # [L, E] exact r/H
    random_std: np.ndarray  # [L, E] exact sd for an isotropic random subspace
    cross: np.ndarray  # [L, E, E]
    mean_own: np.ndarray  # [L]
    mean_other: np.ndarray  # [L]
    mean_random: np.ndarray  # [L]
    perm_null_mean: np.ndarray  # [L]
    perm_null_low: np.ndarray  # [L]
    perm_null_high: np.ndarray  # [L]
    perm_p: np.ndarray  # [L]
    effect: np.ndarray  # [L]
    num_permutations: int
    seed: int
    score_fn: str
    centered: bool
    perm_p_adjusted: np.ndarray  # [L]


def random_subspace_share(rank: np.ndarray | int, hidden_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean r/H and sd of the energy share of a unit vector in a uniformly random r-dim subspace of R^H.

    By rotation invariance the share is that of a uniform unit vector's first r coordinates,
    Beta(r/2, (H-r)/2): no sampling needed.
    """
    r = np.asarray(rank, dtype=np.float64)
    h = float(hidden_size)
    return r / h, np.sqrt(2.0 * r * (h - r) / (h * h * (h + 2.0)))


def expert_permutation_null(
    cross: np.ndarray, num_permutations: int, rng: np.random.Generator
) -> tuple[float, float, float, float, float]:
    """``(observed, null mean, null 2.5%, null 97.5%, p)`` of mean_e cross[e, e] against permuted experts.

    The E x E share matrix is computed once, so each permutation is only a gather.
    """
    E = cross.shape[0]
    observed = float(np.mean(np.diagonal(cross)))
    perms = np.argsort(rng.random((num_permutations, E)), axis=1)
    null = cross[np.arange(E)[None, :], perms].mean(1)
    low, high = interval(null)
    return observed, float(cross.mean()), float(low), float(high), float(p_value(observed, null))


def _as_tensor(x: Any) -> torch.Tensor:
    """Weights as a torch tensor on their own device; half precisions computed in float32."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _input_projections(layer: int, w: Mapping[str, Any]) -> tuple[list[torch.Tensor], list[str]]:
    """The input-side projections of one layer's experts, each ``[E, I, H]``."""
    if "up" not in w or w["up"] is None:
        raise ValueError(f"expert weights of layer {layer} have no 'up' projection [E, I, H]")
    names = ["up"] if w.get("gate") is None else ["gate", "up"]
    mats = [_as_tensor(w[n]) for n in names]
    for n, m in zip(names, mats):
        if m.ndim != 3:
            raise ValueError(f"expert '{n}' weight of layer {layer} must be [E, I, H], got shape {tuple(m.shape)}")
    if len(mats) == 2 and (mats[0].shape[0], mats[0].shape[2]) != (mats[1].shape[0], mats[1].shape[2]):
        raise ValueError(f"gate {tuple(mats[0].shape)} and up {tuple(mats[1].shape)} of layer {layer} do not match")
    return mats, names


BATCH_BYTES = 256 << 20  # experts decomposed together: one batched Gram product and eigendecomposition


def experts_per_batch(rows: int, h: int, budget: int = BATCH_BYTES) -> int:
    """How many experts' ``[rows, H]`` inputs, Gram matrices and eigenvectors fit ``budget`` bytes in float32."""
    n = min(rows, h)
    return max(1, budget // (4 * (rows * h + 2 * n * n)))


def _iter_expert_subspaces(
    expert_weights: ExpertWeights, energy: float | None, rank: int | None, device: str | torch.device | None = None,
    progress: bool = False, total: int | None = None, layers: list[int] | None = None,
):
    """Yield ``(layer, names, expert, singular values, basis [H, r] tensor)`` one expert at a time.

    Experts are decomposed in batches of about 256 MB (:func:`experts_per_batch`), one layer's
    weights read at a time, so memory stays bounded whatever the model size; the work runs on
    ``device`` if given (e.g. "cuda"), else where the weights are. ``progress`` shows a bar over experts (``total`` of them, if known). ``layers``: only these
    (default all), each read from ``expert_weights`` when its turn comes.
    """
    from tqdm.auto import tqdm

    bar = tqdm(desc="expert input subspaces", unit="expert", total=total, disable=not progress)
    with bar:
        for layer in sorted(expert_weights) if layers is None else layers:
            mats, names = _input_projections(layer, expert_weights[layer])
            E, H = mats[0].shape[0], mats[0].shape[2]
            rows = sum(m.shape[1] for m in mats)
            if rank is not None and not 1 <= rank <= min(rows, H):
                raise ValueError(f"rank must be in 1..{min(rows, H)} for layer {layer}, got {rank}")
            if total is None:
                bar.total = (bar.total or 0) + E
            step = experts_per_batch(rows, H)
            for e0 in range(0, E, step):
                a = torch.cat([m[e0:e0 + step] for m in mats], dim=1)
                if device is not None:
                    a = a.to(device)
                for i, (s_np, right) in enumerate(input_bases(a)):
                    if rank is not None:
                        r = rank
                    else:
                        e2 = np.cumsum(s_np**2) / max(float(np.sum(s_np**2)), 1e-300)
                        r = int(np.searchsorted(e2, energy - 1e-12) + 1)
                    yield layer, names, e0 + i, s_np, right(r)
                    bar.update(1)


def input_basis(a: torch.Tensor) -> tuple[np.ndarray, Any]:
    """Singular values of ``a [rows, H]`` (descending) and a function giving its top-``r`` right singular vectors ``[H, r]``.

    Through the eigendecomposition of the smaller Gram matrix, in the weights' precision
    (float32, or float64 if given), not a full SVD: at OLMoE's shape (2048 x 2048 per expert,
    float32, 2 CPU threads) 0.93 s instead of 2.19 s, and only the vectors of the subspace actually
    used are formed. Squaring the matrix costs precision only on the smallest singular values,
    far below the energy the subspace keeps.
    """
    return input_bases(a[None])[0]


def input_bases(a: torch.Tensor) -> list[tuple[np.ndarray, Any]]:
    """:func:`input_basis` for a batch ``a [b, rows, H]``: one batched Gram product and eigendecomposition."""
    a64 = a if a.dtype == torch.float64 else a.to(torch.float32)
    rows, h = a64.shape[-2:]
    gram = a64.mT @ a64 if h <= rows else a64 @ a64.mT
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    s = evals.sqrt()
    s_np = s.to("cpu", torch.float64).numpy()
    out_dtype = a.dtype if a.dtype.is_floating_point else torch.float32

    def right(i: int, r: int) -> torch.Tensor:
        if h <= rows:
            v = evecs[i, :, :r]
        else:  # v = a^T u / s for the left vectors u of the smaller Gram
            tiny = torch.finfo(a64.dtype).tiny
            v = (a64[i].T @ evecs[i, :, :r]) / s[i, :r].clamp_min(tiny)
            v = v / v.norm(dim=0, keepdim=True).clamp_min(tiny)
        return v.to(out_dtype)

    return [(s_np[i], lambda r, i=i: right(i, r)) for i in range(a64.shape[0])]


def _resolve(energy: float | None, rank: int | None, default_energy: float, default_rank: int | None):
    if energy is None and rank is None:
        energy, rank = default_energy, default_rank
    if rank is not None:
        return None, int(rank)
    if energy is None or not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1] when no rank is fixed, got {energy}")
    return float(energy), None


class ExpertAnalyzer:
    """Expert weight analyses; ``model`` is a ``MoEModelWrapper`` or ``None`` to pass weights directly.

    Subspace dimension: fixed ``rank`` if given, else the fewest singular directions holding
    ``energy`` (default 0.9) of the squared spectrum of ``[gate; up]`` (``up`` alone without a gate).
    ``device``: where to run the decompositions. OLMoE has 1024 experts with a 2048x2048 ``[gate; up]``
    each: 15 min on 2 CPU threads (``exp/benchmark_alignment.py``), one layer's weights in memory at a time.
    ``score_fn`` ("softmax" centres router rows, "sigmoid" does not): given per call, else here,
    else the wrapper's own; without any, the router alignment raises a TypeError (no default:
    centring a sigmoid router changes its answer). ``progress`` shows a bar over experts.
    """

    def __init__(
        self,
        model: Any | None = None,
        energy: float = 0.9,
        rank: int | None = None,
        device: str | torch.device | None = None,
        score_fn: str | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.progress = progress
        self.energy = energy
        self.rank = rank
        self.device = device
        self.score_fn = None if score_fn is None else check_score_fn(score_fn)

    def _score_fn(self, score_fn: str | None) -> str:
        for given in (score_fn, self.score_fn, score_fn_of(self.model)):
            if given is not None:
                return check_score_fn(given)
        return require_score_fn(None, "ExpertAnalyzer.analyze_expert_router_alignment")

    def extract_all_expert_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """``{model layer index: {"gate": [E,I,H] | None, "up": [E,I,H], "down": [E,H,I]}}`` from the wrapper."""
        if self.model is None:
            raise ValueError("ExpertAnalyzer was built without a model; pass expert weights to the methods directly")
        return self.model.get_expert_weights(device=self.device or "cpu")

    def _expert_weights(self, expert_weights: ExpertWeights | None) -> ExpertWeights:
        if expert_weights is None:
            expert_weights = self.extract_all_expert_weights()
        if not expert_weights:
            raise ValueError("no expert weights given")
        return expert_weights

    def expert_input_subspaces(
        self,
        expert_weights: ExpertWeights | None = None,
        energy: float | None = None,
        rank: int | None = None,
        keep_bases: bool = True,
    ) -> ExpertSubspaces:
        """Input subspace of every expert (top right singular vectors of ``[gate; up]``).

        ``keep_bases=False`` keeps only ranks and spectra (bases of a large model take many GB).
        """
        energy, rank = _resolve(energy, rank, self.energy, self.rank)
        expert_weights = self._expert_weights(expert_weights)
        layers = sorted(expert_weights)
        ranks = {l: [] for l in layers}
        svals = {l: [] for l in layers}
        bases: dict[int, list[np.ndarray]] = {l: [] for l in layers}
        names: list[str] = []
        H = 0
        for layer, names, _, s, u in _iter_expert_subspaces(expert_weights, energy, rank, self.device, self.progress):
            H = u.shape[0]
            ranks[layer].append(u.shape[1])
            svals[layer].append(s)
            if keep_bases:
                bases[layer].append(u.detach().to("cpu", torch.float64).numpy())
        E = {len(v) for v in ranks.values()}
        if len(E) != 1:
            raise ValueError(f"layers have different expert counts {sorted(E)}")
        return ExpertSubspaces(
            layers,
            E.pop(),
            H,
            names,
            np.array([ranks[l] for l in layers]),
            [np.stack(svals[l]) for l in layers],
            energy,
            rank,
            bases if keep_bases else {},
        )

    def _routers(self, router_weights: RouterWeights | None) -> RouterWeights:
        if router_weights is not None:
            return router_weights
        if self.model is None:
            raise ValueError("no router weights given and no model to extract them from")
        return self.model.get_router_weights()

    def analyze_expert_router_alignment(
        self,
        expert_weights: ExpertWeights | None = None,
        router_weights: RouterWeights | None = None,
        energy: float | None = None,
        rank: int | None = None,
        num_random: int | None = None,
        seed: int = 0,
        num_permutations: int = 1000,
        score_fn: str | None = None,
    ) -> AlignmentResult:
        """Does each router row lie in its own expert's input subspace more than in the other experts'?

        ``num_random`` is accepted for old callers and ignored: the random-subspace baseline is
        now exact (r/H). ``score_fn`` as for the analyzer (softmax rows are centred).
        """
        if num_random is not None:
            warnings.warn("num_random is ignored: the random-subspace baseline is exact (r/H); "
                          "use num_permutations for the expert-permutation null", DeprecationWarning, stacklevel=2)
        if num_permutations < 1:
            raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
        score_fn = self._score_fn(score_fn)
        energy, rank = _resolve(energy, rank, self.energy, self.rank)
        expert_weights = self._expert_weights(expert_weights)
        router_weights = self._routers(router_weights)
        layers = [l for l in sorted(expert_weights) if l in router_weights]
        if not layers:
            raise ValueError(
                f"no layer has both expert weights {sorted(expert_weights)} and router weights {sorted(router_weights)}"
            )
        routers = {l: center_router_rows(router_weights[l], score_fn) for l in layers}
        shapes = {r.shape for r in routers.values()}
        if len(shapes) != 1:
            raise ValueError(f"routers of different shapes {sorted(shapes)}")
        E, H = shapes.pop()
        ranks, cross = self._cross_shares(expert_weights, routers, layers, E, H, energy, rank)
        L = len(layers)
        own = np.diagonal(cross, axis1=1, axis2=2).copy()
        off = ~np.eye(E, dtype=bool)
        others = cross[:, off].reshape(L, E, E - 1) if E > 1 else np.full((L, E, 1), np.nan)
        rm, rs = random_subspace_share(ranks, H)
        num_permutations = draws_for_holm(num_permutations, L)
        perm = np.array([expert_permutation_null(cross[i], num_permutations, layer_rng(seed, l)) for i, l in enumerate(layers)])
        return AlignmentResult(
            layers, E, H, ranks, own, others.mean(2), others.std(2), rm, rs, cross,
            own.mean(1), others.mean((1, 2)), rm.mean(1),
            perm[:, 1], perm[:, 2], perm[:, 3], perm[:, 4], perm[:, 0] - perm[:, 1],
            num_permutations, seed, score_fn, score_fn == "softmax", holm(perm[:, 4]),
        )

    def _cross_shares(
        self, expert_weights: ExpertWeights, routers: Mapping[int, np.ndarray], layers: list[int],
        E: int, H: int, energy: float | None, rank: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``ranks [L, E]`` and ``cross [L, E, E]``: share of router row i in expert j's input subspace."""
        L = len(layers)
        ranks = np.zeros((L, E), dtype=int)
        cross = np.zeros((L, E, E))
        unit: dict[int, torch.Tensor] = {}
        for layer, _, e, _, u in _iter_expert_subspaces(expert_weights, energy, rank, self.device, self.progress, L * E,
                                                          layers=layers):
            i = layers.index(layer)
            if layer not in unit:
                if u.shape[0] != H:
                    raise ValueError(f"router of layer {layer} reads H={H}, its experts read H={u.shape[0]}")
                r = torch.as_tensor(routers[layer]).to(u.device, u.dtype)
                unit = {layer: r / r.norm(dim=1, keepdim=True).clamp_min(1e-30)}
            if e >= E:
                raise ValueError(f"layer {layer} has more experts than its router's {E} rows")
            cross[i, :, e] = ((unit[layer] @ u) ** 2).sum(1).detach().to("cpu", torch.float64).numpy()
            ranks[i, e] = u.shape[1]
        if (ranks == 0).any():
            l = layers[int(np.nonzero((ranks == 0).any(1))[0][0])]
            raise ValueError(f"layer {l} has fewer experts than its router's {E} rows")
        return ranks, cross
