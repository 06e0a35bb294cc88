"""The one shape every streaming analysis has, and the one loop that feeds them all.

An analysis of routing is an *accumulator*, in the spirit of scikit-learn's ``partial_fit``:
``update(chunk)`` adds a chunk of tokens, ``result()`` returns a result dataclass. ``fold``
reads a stream once and feeds every accumulator each chunk, so a cache is read (and its
checksums verified) once however many analyses run on it. The per-analysis functions
(``routing_stats(routing)``...) are one-accumulator folds.

:class:`RoutingAccumulator` holds the setup every analysis needs, written once: the layout of
the first chunk (layers, experts, top-k, name tables), refusing chunks of another layout,
skipping empty chunks, and a one-line error when a field it needs was not recorded.
Adapters compose accumulators without new loops: :class:`PerGroup` (one per dataset or
domain), :class:`WhenRecorded` (only if a field was recorded), :class:`Pick` (one checkpoint of
an aligned stream), and :func:`align` zips the same tokens at several checkpoints.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from core.analysis.results import ResultMixin
from core.routing_data import RoutingData

GroupBy = Literal["dataset", "domain"]


@runtime_checkable
class Accumulator(Protocol):
    """Anything with ``update(chunk)`` and ``result()``: what :func:`fold` feeds."""

    def update(self, chunk: Any) -> Any: ...

    def result(self) -> Any: ...


# ---------------------------------------------------------------------------- the stream
def as_chunks(routing: RoutingData | Iterable[RoutingData]) -> Iterator[RoutingData]:
    """Yield RoutingData chunks from one RoutingData or an iterable of them."""
    if isinstance(routing, RoutingData):
        yield routing
        return
    if not hasattr(routing, "__iter__"):
        raise TypeError(f"expected RoutingData or an iterable of RoutingData, got {type(routing).__name__}")
    for chunk in routing:
        if not isinstance(chunk, RoutingData):
            raise TypeError(f"expected RoutingData chunks, got {type(chunk).__name__}")
        yield chunk


def fold(stream: Iterable[Any], accumulators: Mapping[str, Accumulator], *, progress: bool = False,
         desc: str = "analyses", timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Read ``stream`` once, give every chunk to every accumulator, and return ``{name: result}``.

    ``stream`` yields what the accumulators take: RoutingData chunks, or aligned lists of
    chunks from :func:`align`. A progress bar counts tokens when ``progress``. ``timings``, if
    given, receives the seconds each accumulator took (updates and result) and, under
    ``"reading"``, the seconds spent reading the stream.
    """
    accs = dict(accumulators)
    clock = {name: 0.0 for name in accs} | {"reading": 0.0}
    bar = tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress)
    it = iter(stream)
    with bar:
        while True:
            t0 = time.perf_counter()
            item = next(it, _END)
            clock["reading"] += time.perf_counter() - t0
            if item is _END:
                break
            for name, acc in accs.items():
                t0 = time.perf_counter()
                acc.update(item)
                clock[name] += time.perf_counter() - t0
            first = item[-1] if isinstance(item, (list, tuple)) else item
            bar.update(getattr(first, "num_tokens", 0))
    out = {}
    for name, acc in accs.items():
        t0 = time.perf_counter()
        out[name] = acc.result()
        clock[name] += time.perf_counter() - t0
    if timings is not None:
        timings.update({k: round(v, 3) for k, v in clock.items()})
    return out


_END = object()


def fold_one(routing: RoutingData | Iterable[RoutingData], accumulator: Accumulator) -> Any:
    """The result of one accumulator over one RoutingData or a stream of chunks."""
    return fold(as_chunks(routing), {"result": accumulator})["result"]


# ---------------------------------------------------------------------------- shared setup
@dataclass(frozen=True)
class Layout:
    """What every chunk of one stream must agree on."""

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int

    @classmethod
    def of(cls, rd: RoutingData) -> "Layout":
        return cls(tuple(int(x) for x in rd.moe_layers), int(rd.num_experts), int(rd.top_k))

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def check(self, rd: RoutingData) -> None:
        """Chunks of one stream must describe the same layers and experts."""
        if Layout.of(rd) != self:
            raise ValueError(
                f"chunk has layers {list(rd.moe_layers)}, E={rd.num_experts}, k={rd.top_k}; "
                f"stream started with layers {list(self.moe_layers)}, E={self.num_experts}, k={self.top_k}"
            )


def require(rd: RoutingData, *names: str, why: str = "this analysis") -> None:
    """Raise a one-line error when a field the analysis needs was not recorded."""
    missing = [n for n in names if getattr(rd, n) is None]
    if missing:
        raise ValueError(f"{why} needs routing with {', '.join(missing)} recorded; this routing has none")


CHUNK_FLOATS = 8_000_000  # a dense [tokens, L, E] float64 view of one chunk stays near 64 MB


def chunk_tokens(num_layers: int, num_experts: int) -> int:
    """Tokens per chunk such that one dense ``[tokens, L, E]`` array of it stays within ``CHUNK_FLOATS``."""
    return max(256, CHUNK_FLOATS // max(1, num_layers * num_experts))


def rechunk(stream: Iterable[Any], max_tokens: int | Callable[[RoutingData], int]) -> Iterator[Any]:
    """The same tokens in chunks of at most ``max_tokens`` (a number, or one computed from the first chunk).

    Items are RoutingData chunks or aligned lists of them (from :func:`align`); a list is cut at
    the same token offsets in every checkpoint. What an accumulator holds while it works on a
    chunk (dense selection masks, feature matrices) then no longer scales with the shard size.
    """
    size = max_tokens if isinstance(max_tokens, int) else None
    for item in stream:
        first = item[-1] if isinstance(item, (list, tuple)) else item
        if size is None:
            size = max(1, int(max_tokens(first)))
        n = first.num_tokens
        if n <= size:
            yield item
            continue
        for lo in range(0, n, size):
            part = slice(lo, min(n, lo + size))
            yield [c.select(part) for c in item] if isinstance(item, (list, tuple)) else item.select(part)


def state_nbytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes of the arrays an object holds (numpy, torch, scipy sparse), through attributes, lists and dicts.

    The measure of an accumulator's memory: what it keeps between chunks.
    """
    seen = _seen if _seen is not None else set()
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if hasattr(obj, "data") and hasattr(obj, "indices") and hasattr(obj, "indptr"):  # scipy sparse
        return obj.data.nbytes + obj.indices.nbytes + obj.indptr.nbytes
    if isinstance(obj, Mapping):  # Python containers: their own size, and tuple keys (counted paths)
        keys = sum(sys.getsizeof(k) for k in obj if isinstance(k, tuple))
        return sys.getsizeof(obj) + keys + sum(state_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sys.getsizeof(obj) + sum(state_nbytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(state_nbytes(v, seen) for v in vars(obj).values())
    return 0


class RoutingAccumulator:
    """Base of the streaming analyses: layout, empty chunks and required fields, handled once.

    Subclasses set ``name`` (for messages) and ``needs`` (fields that must be recorded), and
    implement ``_start()`` (allocate state once ``self.layout`` is known), ``_add(chunk)`` and
    ``_result()``. ``self.num_tokens`` counts the tokens added, ``self.domain_names`` and
    ``self.dataset_names`` are the first chunk's name tables.
    """

    name = "this analysis"
    needs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.layout: Layout | None = None
        self.num_tokens = 0
        self.domain_names: list[str] = []
        self.dataset_names: list[str] = []

    def update(self, chunk: RoutingData) -> "RoutingAccumulator":
        if not isinstance(chunk, RoutingData):
            raise TypeError(f"{self.name} takes RoutingData chunks, got {type(chunk).__name__}")
        if self.layout is None:
            self.layout = Layout.of(chunk)
            self.domain_names, self.dataset_names = list(chunk.domain_names), list(chunk.dataset_names)
            self._start()
        self.layout.check(chunk)
        if chunk.num_tokens == 0:
            return self
        require(chunk, *self.needs, why=self.name)
        self._add(chunk)
        self.num_tokens += chunk.num_tokens
        return self

    def result(self) -> Any:
        if self.layout is None or self.num_tokens == 0:
            raise ValueError(f"no tokens were given to {self.name}")
        return self._result()

    # for subclasses
    def _start(self) -> None:
        pass

    def _add(self, chunk: RoutingData) -> None:
        raise NotImplementedError

    def _result(self) -> Any:
        raise NotImplementedError


# ---------------------------------------------------------------------------- adapters
@dataclass
class GroupedResults(ResultMixin):
    """One result per dataset (or domain), by name; reads like a dict of results."""

    by: str
    groups: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)  # group name -> why it has no result

    def __getitem__(self, name: str) -> Any:
        return self.groups[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __contains__(self, name: object) -> bool:
        return name in self.groups

    def keys(self):
        return self.groups.keys()

    def values(self):
        return self.groups.values()

    def items(self):
        return self.groups.items()


def group_ids(chunk: RoutingData, by: GroupBy) -> np.ndarray:
    """The chunk's dataset or domain id per token, as numpy."""
    if by not in ("dataset", "domain"):
        raise ValueError(f"group by 'dataset' or 'domain', not {by!r}")
    ids = getattr(chunk, f"{by}_ids")
    if ids is None:
        raise ValueError(f"grouping by {by} needs routing with {by}_ids recorded; this routing has none")
    return ids.numpy()


def group_names(chunk: RoutingData, by: GroupBy) -> list[str]:
    return list(chunk.dataset_names if by == "dataset" else chunk.domain_names)


class PerGroup:
    """One accumulator per dataset (or domain): each gets only its own tokens of every chunk.

    ``make`` builds a fresh accumulator. Tokens with a negative id (no label) belong to no group
    and are counted in ``unlabelled``. A group whose accumulator cannot give a result (too few
    tokens, say) is listed in ``skipped`` with the reason instead of failing the others.
    """

    def __init__(self, make: Callable[[], Accumulator], by: GroupBy = "dataset") -> None:
        if by not in ("dataset", "domain"):
            raise ValueError(f"by must be 'dataset' or 'domain', got {by!r}")
        self.make, self.by = make, by
        self.accs: dict[int, Accumulator] = {}
        self.names: list[str] | None = None
        self.unlabelled = 0

    def update(self, chunk: RoutingData) -> "PerGroup":
        if self.names is None:
            self.names = group_names(chunk, self.by)
        if chunk.num_tokens == 0:
            return self
        ids = group_ids(chunk, self.by)
        self.unlabelled += int((ids < 0).sum())
        for g in np.unique(ids[ids >= 0]):
            self.accs.setdefault(int(g), self.make()).update(chunk.select(_index(ids == g)))
        return self

    def _name(self, g: int) -> str:
        return self.names[g] if self.names and 0 <= g < len(self.names) else str(g)

    def result(self) -> GroupedResults:
        if not self.accs:
            raise ValueError(f"no labelled tokens were given to a per-{self.by} analysis")
        groups, skipped = {}, {}
        for g in sorted(self.accs):
            name = self._name(g)
            try:
                res = self.accs[g].result()
            except ValueError as e:
                skipped[name] = str(e)
                continue
            if getattr(res, "group", False) is None:  # results that carry their group's name get it
                res.group = name
            groups[name] = res
        return GroupedResults(self.by, groups, skipped)


class WhenRecorded:
    """Feed ``acc`` only if every chunk recorded ``field_name``; otherwise ``result()`` is None.

    For analyses that need router logits on a stream that may be compact storage.
    """

    def __init__(self, acc: Accumulator, field_name: str = "router_logits") -> None:
        self.acc, self.field_name = acc, field_name
        self.missing = False
        self.seen = False

    def update(self, chunk: RoutingData) -> "WhenRecorded":
        self.seen = True
        if getattr(chunk, self.field_name) is None:
            self.missing = True
        elif not self.missing:
            self.acc.update(chunk)
        return self

    def result(self) -> Any:
        return None if self.missing or not self.seen else self.acc.result()


class Pick:
    """Feed ``acc`` one element of each aligned item (by default the last: the final checkpoint)."""

    def __init__(self, acc: Accumulator, index: int = -1) -> None:
        self.acc, self.index = acc, index

    def update(self, item: Sequence[RoutingData]) -> "Pick":
        self.acc.update(item[self.index])
        return self

    def result(self) -> Any:
        return self.acc.result()


def _index(mask: np.ndarray):
    return torch.from_numpy(np.nonzero(mask)[0])


def align(streams: Sequence[Iterable[RoutingData]]) -> Iterator[list[RoutingData]]:
    """Zip several streams of the same tokens (e.g. one per checkpoint) into aligned chunk lists.

    Chunk boundaries may differ between streams; each yielded list holds the same token range
    of every stream. A stream that ends before the others holds other tokens: that is an error.
    """
    its = [iter(as_chunks(s)) for s in streams]
    if not its:
        return
    bufs: list[RoutingData | None] = [None] * len(its)
    offs = [0] * len(its)
    done = 0

    def refill(i: int) -> bool:
        while bufs[i] is None or offs[i] >= bufs[i].num_tokens:
            nxt = next(its[i], None)
            if nxt is None:
                return False
            bufs[i], offs[i] = nxt, 0
        return True

    while True:
        alive = [refill(i) for i in range(len(its))]
        if not any(alive):
            return
        if not all(alive):
            short = [i for i, a in enumerate(alive) if not a]
            raise ValueError(
                f"the aligned streams hold different numbers of tokens: stream(s) {short} end after {done} tokens "
                "while the others go on (not the same tokens at every checkpoint)"
            )
        n = min(bufs[i].num_tokens - offs[i] for i in range(len(its)))
        done += n
        out = []
        for i in range(len(its)):
            b, o = bufs[i], offs[i]
            out.append(b if (o == 0 and n == b.num_tokens) else b.select(slice(o, o + n)))
            offs[i] = o + n
        yield out


# ---------------------------------------------------------------------------- chunk features
def selection_np(rd: RoutingData) -> np.ndarray:
    """Selected-expert mask ``[N, L, E]`` as float64 numpy (1 where selected)."""
    require(rd, "topk_idx", why="routing statistics")
    return rd.selection_mask().numpy().astype(np.float64)


def top1_np(rd: RoutingData) -> np.ndarray:
    """Top-1 expert per token and layer ``[N, L]``: the selected expert with the largest weight.

    Slots that were not selected (-1, or capacity drops) never count; a token with none gets -1.
    """
    require(rd, "topk_idx", why="top-1 routing")
    idx, ok = rd.topk_idx, rd.selected_slots()
    w = rd.topk_weight.float() if rd.topk_weight is not None else -torch.arange(idx.shape[-1]).float().expand(idx.shape)
    pick = w.masked_fill(~ok, float("-inf")).argmax(dim=-1, keepdim=True)
    top = idx.gather(-1, pick).squeeze(-1)
    return torch.where(ok.any(-1), top, -1).numpy()


def normalized_probs_np(rd: RoutingData) -> np.ndarray:
    """Router probabilities ``[N, L, E]`` renormalised to sum to 1 (sigmoid routers do not)."""
    p = rd.probs().double().numpy()
    return p / np.clip(p.sum(-1, keepdims=True), 1e-300, None)
