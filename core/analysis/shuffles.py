"""Document-respecting shuffles: the nulls that keep what a document shares while breaking a link inside it.

A token's place in a shuffle is drawn from where it is (dataset, document, position and a seed,
:func:`token_uniforms`), so whole documents are shuffled the same way however the stream is cut
into chunks or shares (:class:`WholeDocuments` holds a document back until it ends). Inside a
document, :func:`shuffle_within_documents` permutes tokens and :func:`shift_within_documents`
rotates them (keeping runs of tokens that keep their experts); :func:`permute_within` and
:func:`permute_labels` shuffle inside groups and between units with a generator.
"""

from __future__ import annotations

import numpy as np

from core.analysis.resampling import document_keys
from core.analysis.streaming import chunk_seed
from core.routing_data import RoutingData

def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every bit of the input reaches every bit of the output."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def token_uniforms(chunk: RoutingData, *seed: int) -> np.ndarray | None:
    """A uniform number in [0, 1) per token, from where the token is (dataset, document, position) and ``seed``.

    So a token is sampled the same way however the stream is cut into chunks or shared between
    processes. None when the chunk has no document or position labels.
    """
    if chunk.doc_ids is None or chunk.positions is None:
        return None
    with np.errstate(over="ignore"):
        h = _mix(document_keys(chunk).astype(np.uint64)) ^ (chunk.positions.numpy().astype(np.int64).astype(np.uint64) + np.uint64(1))
        for s in seed:
            h = _mix(h ^ _mix(np.full_like(h, np.uint64(int(s) & 0xFFFFFFFFFFFFFFFF))))
        return (_mix(h) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def permute_within(groups: np.ndarray, rng: np.random.Generator, times: int | None = None) -> np.ndarray:
    """An index that shuffles positions only inside each group (same group id): x[idx] is x shuffled within groups.

    With ``times``, that many independent shuffles at once, ``[times, N]``.
    """
    _, inv = np.unique(groups, return_inverse=True)
    n = 1 if times is None else times
    order = np.argsort(inv[None, :] + rng.random((n, len(groups))), axis=1)  # by group, random inside a group
    idx = np.empty((n, len(groups)), np.int64)
    idx[:, np.argsort(inv, kind="stable")] = order
    return idx[0] if times is None else idx


class WholeDocuments:
    """Holds back a stream's last document until it ends, so a within-document shuffle always sees whole documents.

    ``push(chunk)`` returns the parts of the stream whose documents have all ended (the held-back
    document joined to its rest, then the chunk's whole documents, as views); ``flush()`` returns the
    last document. Where chunks end then changes nothing: with :func:`shuffle_within_documents` a
    document is shuffled the same way however the stream was cut. Memory: a copy of one document.
    """

    def __init__(self) -> None:
        self.tail: RoutingData | None = None

    def push(self, chunk: RoutingData) -> list[RoutingData]:
        if not chunk.num_tokens:
            return []
        keys = document_keys(chunk)
        starts = np.nonzero(keys[1:] != keys[:-1])[0] + 1  # where the chunk's later documents begin
        out: list[RoutingData] = []
        if self.tail is not None and int(document_keys(self.tail)[-1]) != int(keys[0]):
            out.append(self.tail)  # the held-back document ended where the chunk begins
            self.tail = None
        if not len(starts):  # the chunk lies inside one document
            self.tail = RoutingData.concat([chunk] if self.tail is None else [self.tail, chunk])
            return out
        first, last = int(starts[0]), int(starts[-1])
        head = chunk.select(slice(0, first))
        out.append(head if self.tail is None else RoutingData.concat([self.tail, head]))
        if last > first:
            out.append(chunk.select(slice(first, last)))
        self.tail = RoutingData.concat([chunk.select(slice(last, chunk.num_tokens))])  # a copy: the chunk is let go
        return out

    def flush(self) -> RoutingData | None:
        done, self.tail = self.tail, None
        return done


def shuffle_within_documents(chunk: RoutingData, *seed: int, times: int = 1) -> np.ndarray:
    """``times`` shuffles of the chunk's tokens inside each document, ``[times, N]``, drawn from where each token is.

    A token's place in a shuffle depends on its dataset, document, position and ``seed`` only, so
    whole documents are shuffled the same way in any chunk (see :class:`WholeDocuments`). Without
    position labels, the chunk's own seed (:func:`core.analysis.streaming.chunk_seed`) draws them.
    """
    keys = document_keys(chunk)
    _, inv = np.unique(keys, return_inverse=True)
    draws = [token_uniforms(chunk, *seed, t) for t in range(times)]
    if any(d is None for d in draws):
        return permute_within(keys, np.random.default_rng(chunk_seed(chunk, *seed)), times=times)
    order = np.argsort(inv[None, :] + np.stack(draws), axis=1)  # by document, then by each token's draw
    idx = np.empty((times, len(keys)), np.int64)
    idx[:, np.argsort(inv, kind="stable")] = order
    return idx


def shift_within_documents(chunk: RoutingData, *seed: int, times: int = 1) -> np.ndarray:
    """``times`` circular shifts of each document's tokens, ``[times, N]``: token i of a document takes token i + s's place.

    A shuffle breaks what neighbouring tokens share (runs of tokens that keep their experts), so a
    statistic of autocorrelated sequences sits above a shuffled null with no link between them; a
    shift keeps each sequence's runs and only moves one sequence against another. The shift s of a
    document (1 to n - 1) depends on its dataset, document and ``seed`` only (as in
    :func:`shuffle_within_documents`, the same in any chunk of whole documents).
    """
    keys = document_keys(chunk)
    starts = np.r_[0, np.nonzero(keys[1:] != keys[:-1])[0] + 1]
    ends = np.r_[starts[1:], len(keys)]
    lengths = ends - starts
    out = np.empty((times, len(keys)), np.int64)
    with np.errstate(over="ignore"):
        base = _mix(keys[starts].astype(np.uint64))
        for t in range(times):
            h = base
            for s in (*seed, t):
                h = _mix(h ^ _mix(np.full_like(h, np.uint64(int(s) & 0xFFFFFFFFFFFFFFFF))))
            u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
            shift = 1 + np.floor(u * np.maximum(lengths - 1, 1)).astype(np.int64)  # never 0 where n > 1
            within = np.arange(len(keys)) - np.repeat(starts, lengths)
            n = np.repeat(lengths, lengths)
            out[t] = np.repeat(starts, lengths) + (within + np.repeat(shift, lengths)) % n
    return out


def permute_labels(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels shuffled between units (each unit keeps one label)."""
    return labels[rng.permutation(len(labels))]
