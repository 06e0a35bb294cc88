"""Expert cards: what one expert does, for every (layer, expert), from one pass over the caches.

A researcher asks of layer 5, expert 17: how much of each dataset and domain does it take, which
tokens does it take more than their frequency predicts, and in which contexts does it fire
hardest. :class:`ExpertCardsAccumulator` gathers, in one pass:

- each expert's share of the routed slots of every dataset and domain, summed per document block,
  so the 95% intervals resample documents (a bootstrap over blocks, as the other findings);
- (layer, expert, token id, block) counts, sparse and bounded (:mod:`core.analysis.sparse_counts`),
  and each token id's occurrences per block: a token's *lift* at an expert is its count there over
  the count its frequency predicts (``occurrences x P(expert selected)``), ranked among tokens
  seen at the expert at least ``min_count`` times (so a rare token does not top the list),
  with a bootstrap interval over document blocks;
- the ``top_n`` heaviest routings of each expert with ``window`` tokens either side
  (:mod:`core.analysis.expert_contexts`).

Memory: shares ``blocks x groups x L x E``, contexts ``L x E x top_n x (2 window + 1)``, token counts
at most ``max_entries`` keys, whatever the number of tokens. Co-activation partners, ablation and
pruning costs and shares over checkpoints are read from the run's other results when the card is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.analysis.expert_contexts import TopContexts
from core.analysis.resampling import LEVEL, MIN_DOCUMENTS, RESAMPLES, block_of, bootstrap, document_keys, interval
from core.analysis.results import ResultMixin
from core.analysis.sparse_counts import MAX_ENTRIES, SparseCounts
from core.analysis.streaming import RoutingAccumulator, fold_one
from core.routing_data import RoutingData

BLOCKS = 32
TOKEN_BITS = 24  # token ids below 2^24 (16.7M; the largest vocabularies have ~256k)
MIN_COUNT, TOP_TOKENS, TOP_CONTEXTS, WINDOW = 5, 8, 5, 8


@dataclass
class ExpertCards(ResultMixin):
    """Per (layer position, expert): shares with intervals, top tokens by lift, max-activating contexts.

    ``share_*[..., l, e]``: the expert's share of the routed slots (sums to 1 over experts) of all
    tokens, each dataset, each domain; ``*_low``/``*_high`` the 95% interval over document blocks
    (NaN with fewer than ``MIN_DOCUMENTS`` blocks). ``top_tokens[l, e, m]``: token ids by lift
    (-1 past the tokens that qualify); ``top_count`` their count at the expert, ``top_expected``
    the count their frequency predicts, ``top_lift`` = count / expected. ``ctx_tokens[l, e, n]``:
    ``2 window + 1`` token ids centred on the n-th heaviest routing (-1 outside its document),
    ``ctx_weight`` its weight (-inf: no context), ``ctx_meta`` its (dataset id, domain id, document id, position).
    """

    moe_layers: list[int]
    num_experts: int
    top_k: int
    num_tokens: int
    datasets: list[str]
    domains: list[str]
    min_count: int
    window: int
    weights_recorded: bool
    share: np.ndarray  # [L, E]
    share_low: np.ndarray
    share_high: np.ndarray
    share_dataset: np.ndarray  # [Gd, L, E]
    share_dataset_low: np.ndarray
    share_dataset_high: np.ndarray
    share_domain: np.ndarray  # [Gm, L, E]
    share_domain_low: np.ndarray
    share_domain_high: np.ndarray
    top_tokens: np.ndarray  # [L, E, M]
    top_count: np.ndarray
    top_occurrences: np.ndarray
    top_expected: np.ndarray
    top_lift: np.ndarray
    top_lift_low: np.ndarray
    top_lift_high: np.ndarray
    ctx_weight: np.ndarray  # [L, E, N]
    ctx_meta: np.ndarray  # [L, E, N, 4]
    ctx_tokens: np.ndarray  # [L, E, N, 2W+1]
    counts_dropped_below: int = 0  # token counts per expert this small may be undercounted (0: exact)


class _GroupSums:
    """Selections per (block, group, layer x expert) and routed slots per (block, group, layer)."""

    def __init__(self, L: int, E: int) -> None:
        self.L, self.E = L, E
        self.sel: dict[int, np.ndarray] = {}
        self.slots: dict[int, np.ndarray] = {}

    def add(self, group: np.ndarray, block: np.ndarray, col: np.ndarray, token: np.ndarray) -> None:
        """One routed slot per entry: its token's group and block, its layer x expert column."""
        LE = self.L * self.E
        for g in np.unique(group[token]).tolist():
            mine = group[token] == g
            sel = np.bincount(block[token[mine]] * LE + col[mine], minlength=BLOCKS * LE).reshape(BLOCKS, LE)
            self.sel[g] = self.sel.get(g, 0) + sel

    def merge(self, other: "_GroupSums") -> None:
        for g, v in other.sel.items():
            self.sel[g] = self.sel.get(g, 0) + v

    def shares(self, groups: int, seed: int, resamples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[groups, L, E]`` share, low and high (zero-filled for a group without tokens)."""
        out = np.full((3, groups, self.L, self.E), np.nan)
        for g in range(groups):
            if g in self.sel:
                out[:, g] = _share_interval(self.sel[g], self.L, self.E, seed, resamples)
        return out[0], out[1], out[2]


def _interval(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`core.analysis.resampling.interval` (non-finite draws ignored), fast: ``nanquantile`` goes column by
    column, so only the columns with a non-finite draw take it."""
    if not len(draws):
        return interval(draws)
    a = (1 - LEVEL) / 2
    flat = np.where(np.isfinite(draws), draws, np.nan).reshape(len(draws), -1)
    clean = ~np.isnan(flat).any(0)
    low, high = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    low[clean], high[clean] = np.quantile(flat[:, clean], [a, 1 - a], axis=0)
    if not clean.all():
        low[~clean], high[~clean] = interval(flat[:, ~clean])
    return low.reshape(draws.shape[1:]), high.reshape(draws.shape[1:])


def _share_interval(sel: np.ndarray, L: int, E: int, seed: int, resamples: int) -> np.ndarray:
    """``[3, L, E]``: each expert's share of its layer's routed slots, and its bootstrap interval over blocks."""
    slots = sel.reshape(BLOCKS, L, E).sum(-1)
    used = slots.sum(-1) > 0

    def stat(t):
        return t["sel"].reshape(-1, L, E) / t["slots"][..., None]

    value, draws = bootstrap(stat, {"sel": sel.astype(np.float64), "slots": slots.astype(np.float64)}, used,
                             resamples=resamples if used.sum() >= MIN_DOCUMENTS else 0, seed=seed)
    low, high = _interval(draws)
    return np.stack([value, low, high])


class ExpertCardsAccumulator(RoutingAccumulator):
    """One pass gathering every expert's card (see the module docstring); ``update``, ``merge``, ``result``."""

    name = "the expert cards"
    needs = ("topk_idx", "token_ids")

    def __init__(self, min_count: int = MIN_COUNT, top_tokens: int = TOP_TOKENS, top_contexts: int = TOP_CONTEXTS,
                 window: int = WINDOW, max_entries: int = MAX_ENTRIES, seed: int = 0, resamples: int = RESAMPLES) -> None:
        super().__init__()
        if min(min_count, top_tokens, top_contexts) < 1 or window < 0:
            raise ValueError(f"expert cards need min_count, top_tokens, top_contexts >= 1 and window >= 0, not "
                             f"{min_count}, {top_tokens}, {top_contexts}, {window}")
        self.min_count, self.top_tokens, self.top_contexts, self.window = min_count, top_tokens, top_contexts, window
        self.seed, self.resamples = seed, resamples
        self.pairs = SparseCounts(max_entries, group=BLOCKS)  # ((col << TOKEN_BITS) + token) * BLOCKS + block
        self.occurrences = SparseCounts(1 << 62, group=BLOCKS)  # token * BLOCKS + block: one per token id seen
        self.weights_recorded = True

    def _start(self) -> None:
        L, E = self.layout.num_layers, self.layout.num_experts
        self.by_dataset, self.by_domain = _GroupSums(L, E), _GroupSums(L, E)
        self.contexts = TopContexts(L * E, E, self.top_contexts, self.window)

    def _add(self, chunk: RoutingData) -> None:
        n, E = chunk.num_tokens, self.layout.num_experts
        keys = document_keys(chunk)
        block = block_of(keys, BLOCKS)
        ok = chunk.selected_slots().numpy()
        idx = chunk.topk_idx.numpy().astype(np.int64)
        token, layer, _ = np.nonzero(ok)
        col = layer * E + idx[ok]
        tok = chunk.token_ids.numpy().astype(np.int64)
        if tok.size and (tok.min() < 0 or tok.max() >= 1 << TOKEN_BITS):
            raise ValueError(f"expert cards take token ids in [0, 2^{TOKEN_BITS}), not {tok.min()}..{tok.max()}")
        ids = {f: (getattr(chunk, f"{f}_ids").numpy().astype(np.int64) if getattr(chunk, f"{f}_ids") is not None
                   else np.zeros(n, np.int64)) for f in ("dataset", "domain", "doc")}
        self.by_dataset.add(ids["dataset"], block, col, token)
        self.by_domain.add(ids["domain"], block, col, token)
        self.pairs.add(((col << TOKEN_BITS) + tok[token]) * BLOCKS + block[token])
        self.occurrences.add(tok * BLOCKS + block)
        if chunk.topk_weight is None:
            self.weights_recorded = False
            w = np.ones(idx.shape)
        else:
            w = chunk.topk_weight.float().numpy().astype(np.float64)
        pos = chunk.positions.numpy().astype(np.int64) if chunk.positions is not None else np.full(n, -1, np.int64)
        self.contexts.update({"tok": tok, "key": keys, "dataset": ids["dataset"], "domain": ids["domain"],
                              "doc": ids["doc"], "pos": pos, "idx": np.where(ok, idx, -1), "w": w})

    def _merge(self, other: "ExpertCardsAccumulator") -> None:
        self.by_dataset.merge(other.by_dataset)
        self.by_domain.merge(other.by_domain)
        self.pairs.merge(other.pairs)
        self.occurrences.merge(other.occurrences)
        self.contexts.merge(other.contexts)
        self.weights_recorded &= other.weights_recorded

    def _result(self) -> ExpertCards:
        L, E, k = self.layout.num_layers, self.layout.num_experts, self.layout.top_k
        self.contexts.flush()
        sel = sum(self.by_dataset.sel.values(), np.zeros((BLOCKS, L * E), np.int64))  # [B, L*E] all tokens
        every = _share_interval(sel, L, E, self.seed, self.resamples)
        ds = self.by_dataset.shares(max(len(self.dataset_names), max(self.by_dataset.sel, default=-1) + 1), self.seed, self.resamples)
        dm = self.by_domain.shares(max(len(self.domain_names), max(self.by_domain.sel, default=-1) + 1), self.seed, self.resamples)
        tokens = _top_tokens(self.pairs, self.occurrences, sel, L * E, self.min_count, self.top_tokens, self.seed,
                             self.resamples)
        c = self.contexts
        return ExpertCards(list(self.layout.moe_layers), E, k, self.num_tokens, list(self.dataset_names),
                           list(self.domain_names), self.min_count, self.window, self.weights_recorded,
                           *every, *ds, *dm, *(t.reshape(L, E, -1) for t in tokens),
                           c.weight.reshape(L, E, -1), c.meta.reshape(L, E, self.top_contexts, -1),
                           c.tokens.reshape(L, E, self.top_contexts, -1), self.pairs.dropped_below)


def _top_tokens(pairs: SparseCounts, occurrences: SparseCounts, sel: np.ndarray, num_cols: int, min_count: int,
                top: int, seed: int, resamples: int) -> list[np.ndarray]:
    """Per column, the ``top`` token ids by lift among those counted ``min_count``+ times: ids, count, occurrences,
    expected, lift and its interval, each ``[num_cols, top]`` (-1 / NaN past the tokens that qualify)."""
    pairs.compact()
    occurrences.compact()
    pair, inverse = np.unique(pairs.keys // BLOCKS, return_inverse=True)
    count = np.bincount(inverse, weights=pairs.counts, minlength=len(pair))
    col, tok = pair >> TOKEN_BITS, pair & ((1 << TOKEN_BITS) - 1)
    occ_tok, occ_inv = np.unique(occurrences.keys // BLOCKS, return_inverse=True)
    occ = np.bincount(occ_inv, weights=occurrences.counts, minlength=len(occ_tok))
    n_t = occ[np.searchsorted(occ_tok, tok)] if len(tok) else np.zeros(0)
    total = occ.sum()
    p_sel = sel.sum(0)[col] / max(total, 1)  # P(expert selected) of a token
    expected = n_t * p_sel
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = count / expected
    keep = count >= min_count
    col, tok, count, n_t, expected, lift = (a[keep] for a in (col, tok, count, n_t, expected, lift))
    order = np.lexsort((tok, -count, -lift, col))
    col, tok, count, n_t, expected, lift = (a[order] for a in (col, tok, count, n_t, expected, lift))
    starts = np.r_[0, np.nonzero(col[1:] != col[:-1])[0] + 1] if len(col) else np.zeros(0, np.int64)
    rank = np.arange(len(col)) - np.repeat(starts, np.diff(np.r_[starts, len(col)])) if len(col) else starts
    take = rank < top
    col, tok, count, n_t, expected, lift, rank = (a[take] for a in (col, tok, count, n_t, expected, lift, rank))
    low, high = _lift_intervals(pairs, occurrences, sel, col, tok, seed, resamples)
    out = [np.full((num_cols, top), -1, np.int64)] + [np.full((num_cols, top), np.nan) for _ in range(6)]
    for dst, src in zip(out, (tok, count, n_t, expected, lift, low, high)):
        dst[col, rank] = src
    return out


def _lift_intervals(pairs: SparseCounts, occurrences: SparseCounts, sel: np.ndarray, col: np.ndarray, tok: np.ndarray,
                    seed: int, resamples: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap interval over document blocks of each (column, token)'s lift, ``batch`` pairs at a time."""
    blocks = np.arange(BLOCKS)
    per_block = np.bincount(occurrences.keys % BLOCKS, weights=occurrences.counts, minlength=BLOCKS)
    used = per_block > 0
    resamples = resamples if used.sum() >= MIN_DOCUMENTS else 0
    low, high = np.full(len(col), np.nan), np.full(len(col), np.nan)

    def stat(t):
        return t["c"] / (t["n"] * t["s"] / t["t"])

    for lo in range(0, len(col), batch):
        c, o = col[lo:lo + batch], tok[lo:lo + batch]
        pair_keys = (((c << TOKEN_BITS) + o) * BLOCKS)[None, :] + blocks[:, None]  # [B, P]
        sums = {"c": pairs.lookup(pair_keys).astype(np.float64),
                "n": occurrences.lookup(o[None, :] * BLOCKS + blocks[:, None]).astype(np.float64),
                "s": sel[:, c].astype(np.float64), "t": per_block[:, None].astype(np.float64)}
        _, draws = bootstrap(stat, sums, used, resamples=resamples, seed=seed)
        low[lo:lo + batch], high[lo:lo + batch] = _interval(draws)
    return low, high


def expert_cards(routing: RoutingData, **kwargs) -> ExpertCards:
    """Every expert's card from ``routing`` (one RoutingData or chunks); ``kwargs``: :class:`ExpertCardsAccumulator`'s."""
    return fold_one(routing, ExpertCardsAccumulator(**kwargs))
