"""The one shape every streaming analysis has, and the one loop that feeds them all.

An analysis of routing is an *accumulator*, in the spirit of scikit-learn's ``partial_fit``:
``update(chunk)`` adds a chunk of tokens, ``result()`` returns a result dataclass, and
``merge(other)`` folds in the same analysis of other tokens (another process's share of the
caches): the result of merged shares equals the result of one accumulator fed them all, up to
floating-point summation order. ``fold`` reads a stream once and feeds every accumulator each
chunk, so a cache is read (and its checksums verified) once however many analyses run on it.
The per-analysis functions (``routing_stats(routing)``...) are one-accumulator folds.

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
    """Anything with ``update(chunk)`` and ``result()``: what :func:`fold` feeds (``merge`` for shares)."""

    def update(self, chunk: Any) -> Any: ...

    def result(self) -> Any: ...


def merge_all(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accumulators of several shares of one stream, merged by name in share order (the stream's order)."""
    out = dict(parts[0])
    for part in parts[1:]:
        for name, acc in part.items():
            out[name] = out[name].merge(acc)
    return out


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
    clock: dict[str, float] = {}
    accs = feed(stream, accumulators, progress=progress, desc=desc, clock=clock)
    return results_of(accs, clock, timings)


def feed(stream: Iterable[Any], accumulators: Mapping[str, Accumulator], *, progress: bool = False,
         desc: str = "analyses", clock: dict[str, float] | None = None) -> dict[str, Accumulator]:
    """The first half of :func:`fold`: every chunk to every accumulator; returns them, fed (to merge or finish).

    ``clock``, if given, accumulates the seconds of each accumulator and of ``"reading"``.
    """
    accs = dict(accumulators)
    clock = clock if clock is not None else {}
    for name in list(accs) + ["reading"]:
        clock.setdefault(name, 0.0)
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
    return accs


def results_of(accs: Mapping[str, Accumulator], clock: dict[str, float] | None = None,
               timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The second half of :func:`fold`: ``{name: result}``; ``timings`` gets ``clock`` plus the seconds of each result."""
    clock = dict(clock or {})
    out = {}
    for name, acc in accs.items():
        t0 = time.perf_counter()
        out[name] = acc.result()
        clock[name] = clock.get(name, 0.0) + time.perf_counter() - t0
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
        self.check_same(Layout.of(rd), "chunk")

    def check_same(self, other: "Layout", what: str = "share") -> None:
        if other != self:
            raise ValueError(
                f"{what} has layers {list(other.moe_layers)}, E={other.num_experts}, k={other.top_k}; "
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

    def merge(self, other: "RoutingAccumulator") -> "RoutingAccumulator":
        """Fold in the same analysis of the tokens that follow this one's (the next share of the stream)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.layout is None:
            return self
        if self.layout is None:  # this share had no chunks: the other's state is the merged one
            return other
        self.layout.check_same(other.layout)
        self._merge(other)
        self.num_tokens += other.num_tokens
        return self

    # for subclasses
    def _start(self) -> None:
        pass

    def _add(self, chunk: RoutingData) -> None:
        raise NotImplementedError

    def _result(self) -> Any:
        raise NotImplementedError

    def _merge(self, other: "RoutingAccumulator") -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot merge shares")


def chunk_seed(chunk: RoutingData, *prefix: int) -> list[int]:
    """A seed for a chunk's shuffles from where its first token is (document and position), not from who reads it.

    So a chunk is shuffled the same way whether one process reads the whole stream or several
    read shares of it. Without document labels every chunk gets the same seed.
    """
    key = 0 if chunk.doc_ids is None else int(chunk.doc_ids[0]) + 1
    ds = 0 if chunk.dataset_ids is None else int(chunk.dataset_ids[0]) + 1
    pos = 0 if chunk.positions is None else int(chunk.positions[0]) + 1
    return [*prefix, ds, key, pos]


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

    def merge(self, other: "PerGroup") -> "PerGroup":
        """Each group's accumulator merged with the other share's (a group only one share saw is taken as is)."""
        self.names = self.names if self.names is not None else other.names
        self.unlabelled += other.unlabelled
        for g, acc in other.accs.items():
            self.accs[g] = self.accs[g].merge(acc) if g in self.accs else acc
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

    def merge(self, other: "WhenRecorded") -> "WhenRecorded":
        self.missing |= other.missing
        if other.seen and not self.missing:
            self.acc = self.acc.merge(other.acc) if self.seen else other.acc
        self.seen |= other.seen
        return self


class Pick:
    """Feed ``acc`` one element of each aligned item (by default the last: the final checkpoint)."""

    def __init__(self, acc: Accumulator, index: int = -1) -> None:
        self.acc, self.index = acc, index

    def update(self, item: Sequence[RoutingData]) -> "Pick":
        self.acc.update(item[self.index])
        return self

    def result(self) -> Any:
        return self.acc.result()

    def merge(self, other: "Pick") -> "Pick":
        self.acc = self.acc.merge(other.acc)
        return self


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
