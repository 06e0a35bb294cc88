"""Expert weight analysis: each expert's input subspace and how well its router row aligns with it.

An expert reads the hidden state through its input-side projections (gate and up; up only
for 2-matrix experts). The span of their top right singular vectors is the expert's input
subspace. If the router row for expert e lies inside that subspace, the router selects the
expert on the very directions the expert reads. The alignment score only means something
against baselines: the other experts' subspaces, and random subspaces of the same dimension
(expected value r/H, which is large when r is a large share of H).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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

    Per layer (axis 0) and expert (axis 1):
    ``own`` = ||U_e^T r_e||^2; ``other_mean``/``other_std`` over e' != e;
    ``random_mean``/``random_std`` for random subspaces of the same dimension r_e
    (empirical, ``num_random`` draws, seed ``seed``; expected r/H); ``z = (own - random_mean) / random_std``.
    ``cross[l, i, j]`` = alignment of router row i with expert j's subspace.
    Summary per layer: means over experts; ``layer_z`` = (mean own - mean random) / (random std / sqrt(E)).
    """

    layers: list[int]
    num_experts: int
    hidden_size: int
    ranks: np.ndarray  # [L, E]
    own: np.ndarray  # [L, E]
    other_mean: np.ndarray  # [L, E]
    other_std: np.ndarray  # [L, E]
    random_mean: np.ndarray  # [L, E]
    random_std: np.ndarray  # [L, E]
    z: np.ndarray  # [L, E]
    cross: np.ndarray  # [L, E, E]
    mean_own: np.ndarray  # [L]
    mean_other: np.ndarray  # [L]
    mean_random: np.ndarray  # [L]
    layer_z: np.ndarray  # [L]
    num_random: int
    seed: int


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


def _iter_expert_subspaces(
    expert_weights: ExpertWeights, energy: float | None, rank: int | None, device: str | torch.device | None = None
):
    """Yield ``(layer, names, expert, singular values, basis [H, r] tensor)`` one expert at a time.

    One expert at a time keeps memory at one ``[rows, H]`` SVD, whatever the model size;
    the SVD runs on ``device`` if given (e.g. "cuda": the wrapper hands weights out on CPU),
    else where the weights are.
    """
    for layer in sorted(expert_weights):
        mats, names = _input_projections(layer, expert_weights[layer])
        E, H = mats[0].shape[0], mats[0].shape[2]
        rows = sum(m.shape[1] for m in mats)
        if rank is not None and not 1 <= rank <= min(rows, H):
            raise ValueError(f"rank must be in 1..{min(rows, H)} for layer {layer}, got {rank}")
        for e in range(E):
            a = torch.cat([m[e] for m in mats], dim=0)
            if device is not None:
                a = a.to(device)
            _, s, vh = torch.linalg.svd(a, full_matrices=False)
            s_np = s.detach().to("cpu", torch.float64).numpy()
            if rank is not None:
                r = rank
            else:
                e2 = np.cumsum(s_np**2) / max(float(np.sum(s_np**2)), 1e-300)
                r = int(np.searchsorted(e2, energy - 1e-12) + 1)
            yield layer, names, e, s_np, vh[:r].T


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
    ``device``: where to run the per-expert SVDs. Use a GPU for full-size models: OLMoE has 1024
    experts with a 2048x2048 ``[gate; up]`` each, one SVD per expert, which takes hours on a small CPU.
    """

    def __init__(
        self,
        model: Any | None = None,
        energy: float = 0.9,
        rank: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.model = model
        self.energy = energy
        self.rank = rank
        self.device = device

    def extract_all_expert_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """``{model layer index: {"gate": [E,I,H] | None, "up": [E,I,H], "down": [E,H,I]}}`` from the wrapper."""
        if self.model is None:
            raise ValueError("ExpertAnalyzer was built without a model; pass expert weights to the methods directly")
        return self.model.get_expert_weights()

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
        for layer, names, _, s, u in _iter_expert_subspaces(expert_weights, energy, rank, self.device):
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

    def analyze_expert_router_alignment(
        self,
        expert_weights: ExpertWeights | None = None,
        router_weights: RouterWeights | None = None,
        energy: float | None = None,
        rank: int | None = None,
        num_random: int = 200,
        seed: int = 0,
    ) -> AlignmentResult:
        """Alignment of each router row with its own expert's input subspace, against baselines."""
        if num_random < 2:
            raise ValueError(f"num_random must be >= 2, got {num_random}")
        energy, rank = _resolve(energy, rank, self.energy, self.rank)
        expert_weights = self._expert_weights(expert_weights)
        if router_weights is None:
            if self.model is None:
                raise ValueError("no router weights given and no model to extract them from")
            router_weights = self.model.get_router_weights()
        layers = [l for l in sorted(expert_weights) if l in router_weights]
        if not layers:
            raise ValueError(
                f"no layer has both expert weights {sorted(expert_weights)} and router weights {sorted(router_weights)}"
            )
        shapes = {tuple(_as_tensor(router_weights[l]).shape) for l in layers}
        if len(shapes) != 1:
            raise ValueError(f"routers of different shapes {sorted(shapes)}")
        E, H = shapes.pop()
        L = len(layers)
        # Random baseline: ||U^T r||^2 for a random r-dim subspace equals, by rotation invariance,
        # the share of a random Gaussian vector's energy in its first r coordinates.
        g = np.random.default_rng(seed).standard_normal((num_random, H)) ** 2
        frac = np.cumsum(g, axis=1) / g.sum(1, keepdims=True)  # column r-1 <-> dimension r
        rmean, rstd = frac.mean(0), frac.std(0, ddof=1)
        ranks = np.zeros((L, E), dtype=int)
        cross = np.zeros((L, E, E))
        routers: dict[int, torch.Tensor] = {}
        subset = {l: expert_weights[l] for l in layers}
        for layer, _, e, _, u in _iter_expert_subspaces(subset, energy, rank, self.device):
            i = layers.index(layer)
            if layer not in routers:
                r = _as_tensor(router_weights[layer]).to(u.device, u.dtype)
                if u.shape[0] != H:
                    raise ValueError(f"router of layer {layer} reads H={H}, its experts read H={u.shape[0]}")
                routers = {layer: r / r.norm(dim=1, keepdim=True).clamp_min(1e-30)}
            if e >= E:
                raise ValueError(f"layer {layer} has more experts than its router's {E} rows")
            cross[i, :, e] = ((routers[layer] @ u) ** 2).sum(1).detach().to("cpu", torch.float64).numpy()
            ranks[i, e] = u.shape[1]
        if (ranks == 0).any():
            l = layers[int(np.nonzero((ranks == 0).any(1))[0][0])]
            raise ValueError(f"layer {l} has fewer experts than its router's {E} rows")
        own = np.diagonal(cross, axis1=1, axis2=2).copy()
        off = ~np.eye(E, dtype=bool)
        others = cross[:, off].reshape(L, E, E - 1) if E > 1 else np.full((L, E, 1), np.nan)
        rm, rs = rmean[ranks - 1], rstd[ranks - 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (own - rm) / rs
            layer_z = (own.mean(1) - rm.mean(1)) / (np.sqrt((rs**2).mean(1)) / np.sqrt(E))
        return AlignmentResult(
            layers,
            E,
            H,
            ranks,
            own,
            others.mean(2),
            others.std(2),
            rm,
            rs,
            z,
            cross,
            own.mean(1),
            others.mean((1, 2)),
            rm.mean(1),
            layer_z,
            num_random,
            seed,
        )
