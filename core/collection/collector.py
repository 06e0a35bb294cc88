"""The collection loop: run tokenized data through an MoE wrapper and stream routing to a cache.

This is the toolkit's hot path. Each batch is traced once (``wrapper.trace_routing``), its
per-token metadata attached, converted straight to the storage precision and buffered until
a shard's worth of tokens is reached, then committed (see ``core.store.cache``). Memory is
bounded by one shard plus one batch, never by the dataset.

Resume is at row granularity and relies on deterministic batching: rows are taken in order,
``batch_size`` at a time from row 0, and a shard always ends on a batch boundary, so a resumed
run starts on the same batch boundary as an uninterrupted one and writes identical shards.
The manifest pins the data (a fingerprint of the token ids and labels) and every setting
that changes what is written, so a resume can never mix two different collections.

Per-token labels (doc id, position, domain, dataset) come from the tokenized data when it
has them (for packed rows ``positions`` is the position inside the document), else the
position is the index inside the row. Trailing all-padding columns of a batch are cut
before tracing (right padding cannot change causal outputs); padding never enters a cache.
Memory: about ``shard_tokens x bytes/token`` twice over (buffer + encoded shard); for
OLMoE-1B-7B in full storage (2.6 kB/token) the default 65,536-token shard is ~170 MB.
"""

from __future__ import annotations

import contextlib

import functools
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from core.collection.loaded_identity import wrapper_identity
from core.distributed import Ranks
from core.routing_data import RoutingData
from core.store.cache import RoutingCache, RoutingCacheWriter
from core.store.cache_format import FLOAT_DTYPES, check_storage
from core.store.rows import concat_batches, token_rows
from core.store.split_cache import collect_parts, has_parts, join_parts, plan_shards

_LABEL_FIELDS = ("doc_ids", "positions", "domain_ids", "dataset_ids")
DEFAULT_SHARD_TOKENS = 65_536


@dataclass
class TokenRows:
    """Minimal tokenized input (rows of ids + mask + labels), e.g. from ``collect_router_activations``.

    ``data.TokenizedDataset`` has the same fields; either can be passed to ``collect``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    doc_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    domain_ids: torch.Tensor | None = None
    dataset_ids: torch.Tensor | None = None
    domain_names: list[str] = field(default_factory=list)
    dataset_names: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- input checks
def data_fingerprint(tokenized: Any) -> str:
    """SHA-256 over token ids, mask and labels: a resume must see exactly the same data."""
    ids, mask = token_rows(tokenized)
    h = hashlib.sha256()
    for name, t in [("input_ids", ids), ("attention_mask", mask)] + [
        (n, getattr(tokenized, n, None)) for n in _LABEL_FIELDS
    ]:
        if t is None:
            continue
        a = np.ascontiguousarray(t.detach().cpu().to(torch.int64).numpy())
        h.update(f"{name}:{a.shape}".encode())
        h.update(a.tobytes())
    h.update(repr((list(getattr(tokenized, "domain_names", [])), list(getattr(tokenized, "dataset_names", [])))).encode())
    return h.hexdigest()


def _score_fn(wrapper: Any) -> str | None:
    for obj in (wrapper, getattr(wrapper, "moe_spec", None)):
        s = getattr(obj, "score_fn", None)
        if isinstance(s, str):
            return s
    return None


def _hidden_size(wrapper: Any) -> int:
    size = getattr(wrapper, "hidden_size", None)
    if not isinstance(size, int):
        size = getattr(getattr(getattr(wrapper, "hf_model", None), "config", None), "hidden_size", 0)
    return int(size or 0)


def _empty_routing(wrapper: Any, storage: str, names: tuple[list[str], list[str]], hidden_layers: Sequence[int]) -> RoutingData:
    """Zero-token routing for a batch whose rows are all padding (rows still count as done)."""
    L, E, k = len(wrapper.moe_layers), int(wrapper.num_experts), int(wrapper.top_k)
    return RoutingData(
        moe_layers=list(wrapper.moe_layers),
        num_experts=E,
        top_k=k,
        router_logits=torch.zeros(0, L, E) if storage == "full" else None,
        topk_idx=torch.zeros(0, L, k, dtype=torch.long),
        topk_weight=torch.zeros(0, L, k),
        token_ids=torch.zeros(0, dtype=torch.long),
        doc_ids=torch.zeros(0, dtype=torch.long),
        positions=torch.zeros(0, dtype=torch.long),
        domain_ids=torch.zeros(0, dtype=torch.long),
        dataset_ids=torch.zeros(0, dtype=torch.long),
        domain_names=names[0],
        dataset_names=names[1],
        score_fn=_score_fn(wrapper) or "softmax",
        hidden={layer: torch.zeros(0, _hidden_size(wrapper)) for layer in hidden_layers},
    )


def batch_bounds(num_rows: int, batch_size: int, start_row: int = 0) -> Iterator[tuple[int, int]]:
    """``(first_row, stop_row)`` of each batch: fixed from row 0, so a resume lands on the same bounds."""
    if start_row % batch_size and start_row != num_rows:
        raise ValueError(f"resume row {start_row} is not on a batch boundary of batch_size {batch_size}")
    for start in range(start_row, num_rows, batch_size):
        yield start, min(start + batch_size, num_rows)


def trimmed_batch(ids: torch.Tensor, mask: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows ``[start, stop)`` with trailing all-padding columns cut (they cannot affect causal outputs)."""
    m = mask[start:stop]
    cols = m.any(dim=0).nonzero()
    width = int(cols.max()) + 1 if len(cols) else 0
    return ids[start:stop, :width], m[:, :width], width


def _finish_batch(start: int, stop: int, width: int, b_ids: torch.Tensor, sel: torch.Tensor, pending: Any, *,
                  labels: dict[str, torch.Tensor | None], names: tuple[list[str], list[str]], storage: str,
                  float_dtype: torch.dtype | None) -> tuple[int, int, RoutingData]:
    """One traced batch waited for, checked against its rows and labelled: kept out of the loop that keeps a batch in flight."""
    rd = pending.wait()
    n = int(sel.sum())
    if rd.num_tokens != n:
        raise RuntimeError(
            f"wrapper returned routing for {rd.num_tokens} tokens but rows {start}-{stop} have {n} non-padding tokens"
        )
    token_ids = b_ids[sel].cpu()
    if rd.token_ids is not None and not torch.equal(rd.token_ids.cpu().long(), token_ids.long()):
        raise RuntimeError("wrapper returned tokens in a different order than row-major non-padding order")
    rd.token_ids = token_ids.long()
    for name in _LABEL_FIELDS:
        t = labels[name]
        if t is not None:
            setattr(rd, name, t[start:stop, :width][sel].cpu().long())
    if rd.positions is None:  # index within the row, as the contract defines it
        rd.positions = torch.arange(width).expand(stop - start, width)[sel]
    rd.domain_names, rd.dataset_names = names
    return start, stop, _to_storage(rd, storage, float_dtype)


def _to_storage(rd: RoutingData, storage: str, float_dtype: torch.dtype | None) -> RoutingData:
    """A batch as the cache stores it (no logits in compact storage, floats in the storage precision), made once per batch."""
    if storage == "compact":
        rd.router_logits = None
    if float_dtype is not None:  # shrink to storage precision now: bounds the shard buffer
        for name in ("router_logits", "topk_weight"):
            t = getattr(rd, name)
            if t is not None:
                setattr(rd, name, t.detach().cpu().to(float_dtype))
        rd.hidden = {k: v.detach().cpu().to(float_dtype) for k, v in rd.hidden.items()}
    return rd


class _Ready:
    """A traced batch that is already on the host (for wrappers with only ``trace_routing``)."""

    def __init__(self, routing: RoutingData) -> None:
        self.routing = routing

    def wait(self) -> RoutingData:
        return self.routing


class _Immediate:
    """``start_trace`` for a wrapper that only has ``trace_routing``: the result is ready at once."""

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def start_trace(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_layers: tuple = ()) -> _Ready:
        return _Ready(self.wrapper.trace_routing(input_ids, attention_mask, hidden_layers=hidden_layers))


# ---------------------------------------------------------------------------- collector
class ActivationCollector:
    """Collects router activations of an MoE model: to a resumable on-disk cache, or in memory.

    ``model`` is a ``MoEModelWrapper`` (or anything with its ``trace_routing`` contract); a
    model name or ``nn.Module`` is wrapped for you.
    """

    def __init__(self, model: Any, *, batch_size: int = 8, max_length: int = 512, progress: bool = True):
        if isinstance(model, str) or isinstance(model, torch.nn.Module):
            from core.model_access.wrapper import MoEModelWrapper

            model = MoEModelWrapper(model)
        if not callable(getattr(model, "trace_routing", None)):
            raise TypeError(f"ActivationCollector needs an MoEModelWrapper (with trace_routing), got {type(model).__name__}")
        self.wrapper = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress

    # ----------------------------------------------------------------- tracing
    def trace_batches(
        self,
        tokenized: Any,
        *,
        batch_size: int,
        start_row: int = 0,
        stop_row: int | None = None,
        hidden_layers: Sequence[int] = (),
        storage: str = "full",
        float_dtype: torch.dtype | None = None,
    ) -> Iterator[tuple[int, int, RoutingData]]:
        """Yield ``(first_row, stop_row, routing)`` per batch of rows ``[start_row, stop_row)``, metadata attached, padding dropped.

        One batch is kept in flight: the next batch is traced before the previous one's host
        copy is waited for, so on a GPU the copy overlaps the next forward pass.
        """
        ids, mask = token_rows(tokenized)
        names = (list(getattr(tokenized, "domain_names", [])), list(getattr(tokenized, "dataset_names", [])))
        labels = {n: getattr(tokenized, n, None) for n in _LABEL_FIELDS}
        start_trace = getattr(self.wrapper, "start_trace", None) or _Immediate(self.wrapper).start_trace
        finish = functools.partial(_finish_batch, labels=labels, names=names, storage=storage, float_dtype=float_dtype)

        rows = ids.shape[0] if stop_row is None else min(int(stop_row), ids.shape[0])
        session = getattr(self.wrapper, "tracing_session", None)
        with session() if session is not None else contextlib.nullcontext():  # nnsight's wrappers set aside once
            in_flight = None
            for start, stop in batch_bounds(rows, batch_size, start_row):
                b_ids, b_mask, width = trimmed_batch(ids, mask, start, stop)
                sel = b_mask.bool()
                if not sel.any():
                    if in_flight is not None:
                        yield finish(*in_flight)
                        in_flight = None
                    yield start, stop, _empty_routing(self.wrapper, storage, names, hidden_layers)
                    continue
                try:
                    pending = start_trace(b_ids, b_mask, hidden_layers=tuple(hidden_layers))
                except BaseException:
                    if in_flight is not None:  # the batch already traced is handed on before the error
                        yield finish(*in_flight)
                    raise
                if in_flight is not None:
                    yield finish(*in_flight)
                in_flight = (start, stop, width, b_ids, sel, pending)
            if in_flight is not None:
                yield finish(*in_flight)

    # ----------------------------------------------------------------- to disk
    def cache_header(
        self,
        tokenized: Any,
        *,
        dataset_name: str | None,
        batch_size: int,
        storage: str,
        dtype: str,
        hidden_layers: Sequence[int],
        shard_tokens: int,
    ) -> dict:
        """What identifies this collection: a resume must match it key for key."""
        w = self.wrapper
        ids, _ = token_rows(tokenized)
        tok = getattr(w, "tokenizer", None)
        dataset_names = list(getattr(tokenized, "dataset_names", []))
        return {
            "model_name": str(getattr(w, "model_name", type(w).__name__)),
            "revision": getattr(w, "revision", None),
            "model_identity": wrapper_identity(w),  # weights and config digests, dtype, device type
            "dataset": dataset_name or getattr(tokenized, "name", None) or ("+".join(dataset_names) or "unnamed"),
            "settings": {
                "storage": storage,
                "dtype": dtype,
                "batch_size": batch_size,
                "shard_tokens": shard_tokens,
                "hidden_layers": [int(x) for x in hidden_layers],
                "max_length": int(ids.shape[1]),
                "pack": getattr(tokenized, "packed", getattr(tokenized, "pack", None)),
                "tokenizer": getattr(tok, "name_or_path", None) if tok is not None else None,
            },
            "moe_layers": [int(x) for x in w.moe_layers],
            "num_experts": int(w.num_experts),
            "top_k": int(w.top_k),
            "score_fn": _score_fn(w),
            "domain_names": list(getattr(tokenized, "domain_names", [])),
            "dataset_names": dataset_names,
            "num_rows": int(ids.shape[0]),
            "data_fingerprint": data_fingerprint(tokenized),
        }

    def collect(
        self,
        tokenized: Any,
        cache_dir: str | os.PathLike,
        *,
        batch_size: int | None = None,
        storage: str = "full",
        dtype: str = "float16",
        hidden_layers: Sequence[int] = (),
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        dataset_name: str | None = None,
        progress: bool | None = None,
        force: bool = False,
        verify_existing: bool = False,
        ranks: Ranks | None = None,
    ) -> RoutingCache | None:
        """Collect routing of ``tokenized`` into ``cache_dir``, resuming a run that stopped part way.

        ``storage``: "full" (logits + selections) or "compact" (selections only).
        ``shard_tokens``: tokens per shard (rounded up to whole batches); also the resume unit.
        ``force``: discard an existing cache at ``cache_dir`` instead of resuming or refusing.
        ``ranks``: several torchrun processes share this one cache; each writes its planned shards
        and gets None (rank 0 joins them after a barrier, ``split_cache.join_parts``).
        """
        batch_size = batch_size or self.batch_size
        if batch_size < 1 or shard_tokens < 1:
            raise ValueError(f"batch_size and shard_tokens must be positive, got {batch_size} and {shard_tokens}")
        check_storage(storage, dtype)
        header = self.cache_header(
            tokenized,
            dataset_name=dataset_name,
            batch_size=batch_size,
            storage=storage,
            dtype=dtype,
            hidden_layers=hidden_layers,
            shard_tokens=shard_tokens,
        )
        if (ranks is not None and ranks.world_size > 1) or has_parts(cache_dir):  # split, or a split run stopped part way
            return self.collect_share(tokenized, cache_dir, ranks or Ranks(), header=header, progress=progress, force=force)
        writer = RoutingCacheWriter(cache_dir, header, force=force, verify_existing=verify_existing)
        try:
            if writer.complete:
                return RoutingCache(writer.dir, writer.manifest)
            return self._fill(writer, tokenized, header, batch_size, hidden_layers, storage, dtype, shard_tokens, progress)
        finally:
            writer.close()

    def collect_share(self, tokenized: Any, cache_dir: str | os.PathLike, ranks: Ranks, *, header: dict,
                      progress: bool | None = None, force: bool = False) -> RoutingCache | None:
        """This rank's planned shards of a cache split over ranks (``core.store.split_cache``).

        Returns the cache when one process holds every part (then it joins them), else None: after
        a barrier, rank 0 joins them.
        """
        s = header["settings"]
        trace_kw = dict(hidden_layers=s["hidden_layers"], storage=s["storage"], float_dtype=FLOAT_DTYPES[s["dtype"]])
        collect_parts(self, tokenized, cache_dir, header, ranks, batch_size=s["batch_size"], trace_kw=trace_kw,
                      progress=self.progress if progress is None else progress, force=force)
        return join_parts(cache_dir) if ranks.world_size == 1 else None

    def _fill(self, writer: RoutingCacheWriter, tokenized: Any, header: dict, batch_size: int, hidden_layers: Sequence[int],
              storage: str, dtype: str, shard_tokens: int, progress: bool | None) -> RoutingCache:
        """Trace the rows the cache does not hold yet and commit them shard by shard, where :func:`plan_shards` ends them."""
        _, mask = token_rows(tokenized)
        ends = {stop for _, stop in plan_shards(mask, batch_size, shard_tokens)}  # the same cuts a split collection makes
        start = writer.next_row
        show = self.progress if progress is None else progress
        bar = tqdm(
            total=int(mask.sum()), initial=int(mask[:start].sum()), unit="tok", unit_scale=True,
            desc=f"routing {header['dataset']}", disable=not show,
        )
        buffer: list[RoutingData] = []
        shard_start = start
        with bar:
            for _, stop, rd in self.trace_batches(
                tokenized, batch_size=batch_size, start_row=start, hidden_layers=hidden_layers,
                storage=storage, float_dtype=FLOAT_DTYPES[dtype],
            ):
                buffer.append(rd)
                bar.update(rd.num_tokens)
                if stop in ends:
                    writer.write_shard(concat_batches(buffer), shard_start, stop - shard_start)
                    buffer, shard_start = [], stop
        return writer.finish()

    # ----------------------------------------------------------------- seed API
    def tokenize_texts(self, texts: Sequence[str], max_length: int | None = None) -> TokenRows:
        """Tokenize raw texts with the wrapper's tokenizer into right-padded rows (one text per row)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must all be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        tok = getattr(self.wrapper, "tokenizer", None)
        if tok is None:
            raise ValueError("this model has no tokenizer; tokenize yourself and call collect() with token ids")
        max_length = max_length or self.max_length
        encoded = tok(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        width = max(1, max(len(e) for e in encoded))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[i, : len(e)] = 1
        doc_ids = torch.arange(len(encoded)).unsqueeze(1).expand(-1, width).masked_fill(mask == 0, -1)
        positions = torch.arange(width).expand(len(encoded), width).masked_fill(mask == 0, -1)
        return TokenRows(ids, mask, doc_ids=doc_ids.clone(), positions=positions.clone())

    def collect_router_activations(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        hidden_layers: Sequence[int] = (),
        cache_dir: str | os.PathLike | None = None,
        progress: bool | None = None,
        **collect_kwargs: Any,
    ) -> RoutingData:
        """Routing of raw texts (``doc_ids`` = index of the text), in memory or via a cache when ``cache_dir`` is given."""
        rows = self.tokenize_texts(texts, max_length)
        batch_size = batch_size or self.batch_size
        if cache_dir is not None:
            cache = self.collect(
                rows, cache_dir, batch_size=batch_size, hidden_layers=hidden_layers, progress=progress, **collect_kwargs
            )
            return cache.load()
        show = self.progress if progress is None else progress
        parts = [
            rd
            for _, _, rd in tqdm(
                self.trace_batches(rows, batch_size=batch_size, hidden_layers=hidden_layers),
                total=-(-rows.input_ids.shape[0] // batch_size), desc="routing", unit="batch", disable=not show,
            )
        ]
        return concat_batches(parts)

    def compute_activation_correlations(self, activations: RoutingData | RoutingCache | Iterable[RoutingData]) -> Any:
        """The seed's call: cross-layer correlation of routing (``core.analysis.correlations.activation_correlations``).

        Accepts in-memory routing, a ``RoutingCache`` (streamed shard by shard) or any iterable
        of RoutingData chunks. Returns an ``ActivationCorrelations`` that reads like the seed's
        ``{"topk": ..., "probs": ...}`` (probs only with logits).
        """
        from core.analysis.correlations import activation_correlations

        if isinstance(activations, RoutingCache):
            activations = activations.iter_shards()
        return activation_correlations(activations)

