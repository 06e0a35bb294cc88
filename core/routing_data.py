"""The one in-memory shape of routing that every part of the toolkit passes around.

The wrapper produces it for a traced batch, the collector writes it to disk in shards,
the cache reader hands it back, and every analyzer consumes it. Token-major layout
(``[N, L, ...]``) so that batches and shards concatenate along the first axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Iterator

import torch

# Per-token fields (first axis = token); ``None`` means "not recorded".
TOKEN_FIELDS = (
    "router_logits",  # float [N, L, E]   raw router logits (pre-softmax / pre-sigmoid)
    "topk_idx",  # long  [N, L, k]   experts the experts module actually received
    "topk_weight",  # float [N, L, k]   the weights the experts module actually received
    "token_ids",  # long  [N]
    "doc_ids",  # long  [N]         global document id (index into ``documents`` metadata)
    "positions",  # long  [N]         position of the token inside its sequence
    "domain_ids",  # long  [N]         index into ``domain_names``
    "dataset_ids",  # long  [N]         index into ``dataset_names``
)


@dataclass
class RoutingData:
    """Routing of N non-padding tokens through the L MoE layers of a model.

    ``moe_layers`` gives the model layer index of each of the L MoE layers (dense layers are
    not included). ``score_fn`` says how the family turns logits into routing probabilities
    ("softmax" for most, "sigmoid" for DeepSeek-V3-style routers), so analyses can compute
    probabilities the way the model does. ``hidden`` optionally maps a model layer index to
    the hidden state entering that layer, ``[N, H]``.
    """

    moe_layers: list[int]
    num_experts: int
    top_k: int
    router_logits: torch.Tensor | None = None
    topk_idx: torch.Tensor | None = None
    topk_weight: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    domain_ids: torch.Tensor | None = None
    dataset_ids: torch.Tensor | None = None
    domain_names: list[str] = field(default_factory=list)
    dataset_names: list[str] = field(default_factory=list)
    score_fn: str = "softmax"
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ shape
    @property
    def num_tokens(self) -> int:
        for name in ("topk_idx", "router_logits", "token_ids"):
            t = getattr(self, name)
            if t is not None:
                return int(t.shape[0])
        return 0

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def __len__(self) -> int:
        return self.num_tokens

    # ------------------------------------------------------------- derived
    def probs(self) -> torch.Tensor:
        """Routing probabilities ``[N, L, E]`` (float32) from the logits, as the family scores them."""
        if self.router_logits is None:
            raise ValueError("this routing was stored without router logits (compact storage); probabilities need them")
        logits = self.router_logits.float()
        if self.score_fn == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def selected_slots(self) -> torch.Tensor:
        """Boolean ``[N, L, k]``: the slots that reached an expert (not -1, not a capacity drop of weight 0)."""
        if self.topk_idx is None:
            raise ValueError("this routing has no selected experts recorded")
        ok = self.topk_idx >= 0
        if self.topk_weight is not None:
            ok &= self.topk_weight != 0
        return ok

    def selection_mask(self) -> torch.Tensor:
        """Boolean ``[N, L, E]``: True where the expert was among the token's selected experts.

        Capacity-dropped slots (weight 0) are not selections: the expert never saw the token.
        """
        ok = self.selected_slots()
        n, l, _ = self.topk_idx.shape
        # unselected slots go to an extra column that is dropped, so they never touch a real expert
        idx = torch.where(ok, self.topk_idx, self.num_experts)
        mask = torch.zeros(n, l, self.num_experts + 1, dtype=torch.bool)
        mask.scatter_(2, idx, True)
        return mask[..., : self.num_experts]

    # --------------------------------------------------------- combination
    def select(self, index: torch.Tensor | slice) -> "RoutingData":
        """A new RoutingData holding only the tokens picked by ``index`` (mask, indices or slice)."""
        kw = {}
        for name in TOKEN_FIELDS:
            t = getattr(self, name)
            kw[name] = None if t is None else t[index]
        hidden = {k: v[index] for k, v in self.hidden.items()}
        return replace(self, hidden=hidden, **kw)

    @staticmethod
    def concat(parts: Iterable["RoutingData"]) -> "RoutingData":
        """Concatenate along tokens; all parts must describe the same layers and experts."""
        parts = [p for p in parts]
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if (p.moe_layers, p.num_experts, p.top_k) != (first.moe_layers, first.num_experts, first.top_k):
                raise ValueError(
                    f"cannot concatenate routing of layers {p.moe_layers}, E={p.num_experts}, k={p.top_k} "
                    f"with layers {first.moe_layers}, E={first.num_experts}, k={first.top_k}"
                )
            if p.domain_names != first.domain_names or p.dataset_names != first.dataset_names:
                raise ValueError("cannot concatenate routing with different domain/dataset name tables")
        kw = {}
        for name in TOKEN_FIELDS:
            ts = [getattr(p, name) for p in parts]
            kw[name] = None if any(t is None for t in ts) else torch.cat(ts, dim=0)
        hidden = {}
        for layer in first.hidden:
            if all(layer in p.hidden for p in parts):
                hidden[layer] = torch.cat([p.hidden[layer] for p in parts], dim=0)
        return replace(first, hidden=hidden, **kw)

    def iter_chunks(self, chunk_tokens: int) -> Iterator["RoutingData"]:
        """Yield consecutive token chunks, for code written against streaming input."""
        for start in range(0, self.num_tokens, chunk_tokens):
            yield self.select(slice(start, start + chunk_tokens))

    def field_names(self) -> list[str]:
        return [f.name for f in fields(self)]
