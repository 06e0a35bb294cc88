"""Sample documents of each domain with every token's routing, kept whole, to show text coloured by routing.

Mixtral's Fig. 8 colours text by each token's first expert: the reader sees which tokens an
expert takes (digits, keywords, indentation) in context. That needs a few whole documents with
their token ids and experts per layer, not counts. :class:`RoutedTextAccumulator` keeps the
first ``docs_per_domain`` documents of each domain met in the stream, each cut at
``max_tokens`` tokens: its memory is bounded whatever the size of the caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.analysis.resampling import document_keys
from core.analysis.results import ResultMixin
from core.analysis.streaming import RoutingAccumulator, fold_one
from core.routing_data import RoutingData


@dataclass
class RoutedText(ResultMixin):
    """Documents (grouped by domain, in stream order), their tokens, and the k experts and weights of each token per layer.

    The tokens of document ``d`` are rows ``doc_start[d]:doc_start[d + 1]`` of the token arrays.
    ``weights`` is NaN where the routing was stored without weights.
    """

    moe_layers: list[int]
    num_experts: int
    top_k: int
    docs_per_domain: int
    max_tokens: int
    doc_domain: list[str]  # [D] the domain of each document
    doc_dataset: list[str]  # [D]
    doc_id: np.ndarray  # [D] the document's id in its dataset
    doc_start: np.ndarray  # [D + 1] offsets into the token rows
    token_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    experts: np.ndarray  # [T, L, k] int, -1 where a slot reached no expert
    weights: np.ndarray  # [T, L, k] float32

    @property
    def num_documents(self) -> int:
        return len(self.doc_domain)

    def document(self, d: int) -> slice:
        """The token rows of document ``d``."""
        return slice(int(self.doc_start[d]), int(self.doc_start[d + 1]))


class _Kept:
    """One kept document: where it came from and its token rows so far (at most ``max_tokens``)."""

    def __init__(self, domain: int, dataset: int, doc: int) -> None:
        self.domain, self.dataset, self.doc = domain, dataset, doc
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.size = 0

    def add(self, rows: tuple[np.ndarray, ...], room: int) -> None:
        take = min(room - self.size, len(rows[0]))
        if take > 0:
            self.parts.append(tuple(r[:take] for r in rows))
            self.size += take


class RoutedTextAccumulator(RoutingAccumulator):
    """The first ``docs_per_domain`` documents of each domain, each up to ``max_tokens`` tokens, with their routing.

    Documents are taken in stream order (a share merged after another comes after it), so the
    kept set does not depend on how the stream is cut. Without domain labels every token is of
    one domain, "all".
    """

    name = "routed text"
    needs = ("topk_idx", "token_ids", "doc_ids")

    def __init__(self, docs_per_domain: int = 2, max_tokens: int = 200) -> None:
        super().__init__()
        if docs_per_domain < 1 or max_tokens < 1:
            raise ValueError(f"routed text keeps at least one document of one token, not {docs_per_domain} x {max_tokens}")
        self.docs_per_domain, self.max_tokens = docs_per_domain, max_tokens
        self.kept: dict[int, _Kept] = {}  # document key -> the document, in the order first met
        self.per_domain: dict[int, int] = {}

    def _full(self, domain: int) -> bool:
        return self.per_domain.get(domain, 0) >= self.docs_per_domain

    def _add(self, chunk: RoutingData) -> None:
        n = chunk.num_tokens
        keys = document_keys(chunk)
        domains = chunk.domain_ids.numpy() if chunk.domain_ids is not None else np.zeros(n, np.int64)
        datasets = chunk.dataset_ids.numpy() if chunk.dataset_ids is not None else np.zeros(n, np.int64)
        uniq, first = np.unique(keys, return_index=True)
        order = np.argsort(first, kind="stable")
        rows = None
        for key, at in zip(uniq[order].tolist(), first[order].tolist()):
            doc = self.kept.get(key)
            if doc is None:
                if self._full(int(domains[at])):
                    continue
                doc = self.kept[key] = _Kept(int(domains[at]), int(datasets[at]), int(chunk.doc_ids[at]))
                self.per_domain[doc.domain] = self.per_domain.get(doc.domain, 0) + 1
            if doc.size >= self.max_tokens:
                continue
            rows = rows if rows is not None else _rows(chunk)
            mine = np.nonzero(keys == key)[0]
            doc.add(tuple(r[mine] for r in rows), self.max_tokens)

    def _merge(self, other: "RoutedTextAccumulator") -> None:
        for key, doc in other.kept.items():
            mine = self.kept.get(key)
            if mine is None:
                if self._full(doc.domain):
                    continue
                mine = self.kept[key] = _Kept(doc.domain, doc.dataset, doc.doc)
                self.per_domain[doc.domain] = self.per_domain.get(doc.domain, 0) + 1
            for part in doc.parts:
                mine.add(part, self.max_tokens)

    def _result(self) -> RoutedText:
        docs = sorted((d for d in self.kept.values() if d.size), key=lambda d: d.domain)  # stable: stream order within a domain
        L, k = self.layout.num_layers, self.layout.top_k
        cols = [np.concatenate([p[i] for d in docs for p in d.parts]) if docs else np.zeros((0,) + shape, dt)
                for i, (shape, dt) in enumerate((((), np.int64), ((), np.int64), ((L, k), np.int64), ((L, k), np.float32)))]
        name = _namer(self.domain_names, "all")
        return RoutedText(list(self.layout.moe_layers), self.layout.num_experts, k, self.docs_per_domain, self.max_tokens,
                          [name(d.domain) for d in docs], [_namer(self.dataset_names, "")(d.dataset) for d in docs],
                          np.array([d.doc for d in docs], np.int64), np.cumsum([0] + [d.size for d in docs]).astype(np.int64),
                          *cols)


def _rows(chunk: RoutingData) -> tuple[np.ndarray, ...]:
    """The per-token arrays kept of a chunk: token ids, positions, experts and weights (NaN when not recorded)."""
    n = chunk.num_tokens
    pos = chunk.positions.numpy().astype(np.int64) if chunk.positions is not None else np.full(n, -1, np.int64)
    idx = chunk.topk_idx.numpy().astype(np.int64)
    w = chunk.topk_weight.float().numpy() if chunk.topk_weight is not None else np.full(idx.shape, np.nan, np.float32)
    return chunk.token_ids.numpy().astype(np.int64), pos, idx, w.astype(np.float32)


def _namer(names: list[str], default: str):
    """Id -> its name in the table (the id itself, as text, past the table; ``default`` without a table)."""
    return lambda i: names[i] if 0 <= i < len(names) else (default if not names else str(i))


def routed_text(routing: RoutingData, docs_per_domain: int = 2, max_tokens: int = 200) -> RoutedText:
    """The first documents of each domain of ``routing`` (one RoutingData or chunks) with their routing."""
    return fold_one(routing, RoutedTextAccumulator(docs_per_domain, max_tokens))
