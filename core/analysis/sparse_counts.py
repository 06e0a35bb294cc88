"""Counts over a huge key space (token id x layer x expert x document block) kept sparse and bounded.

An expert card lists the tokens an expert takes most often relative to their frequency. Counting
every (layer, expert, token id) densely would take ``L x E x V`` cells (3 GB at OLMoE's 16 x 64
with its 50k vocabulary, per document block); the keys that occur are far fewer (at most
``tokens x L x k``). :class:`SparseCounts` keeps them as a sorted key array and a count array,
buffers new keys (sorted runs) and folds them in when the buffer outgrows the kept keys, and, past ``max_entries``, drops the
keys whose group (``key // group``, e.g. one (layer, expert, token) over its blocks) has the
smallest total, so memory stays bounded whatever the number of tokens. ``dropped_below`` then
says the largest group total dropped: a count that small may be undercounted.
"""

from __future__ import annotations

import numpy as np

MAX_ENTRIES = 4_000_000  # ~64 MB of keys and counts


class SparseCounts:
    """``key -> count`` for int64 keys; ``group``: keys sharing ``key // group`` are pruned together."""

    def __init__(self, max_entries: int = MAX_ENTRIES, group: int = 1) -> None:
        if max_entries < 1 or group < 1:
            raise ValueError(f"sparse counts need max_entries >= 1 and group >= 1, not {max_entries}, {group}")
        self.max_entries, self.group = max_entries, group
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_size = 0
        self.dropped_below = 0  # the largest group total ever dropped (0: nothing dropped, the counts are exact)

    def add(self, keys: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Count ``keys`` (each once, or ``counts`` times)."""
        keys = np.asarray(keys, np.int64).ravel()
        if counts is None:
            keys, counts = np.unique(keys, return_counts=True)  # a sorted run: compact merges runs in linear time
        else:
            keys, counts = _sorted_sums(keys, np.asarray(counts, np.int64).ravel())
        if len(keys):
            self.pending.append((keys, counts.astype(np.int64)))
            self.pending_size += len(keys)
        if self.pending_size > max(len(self.keys), min(1 << 16, self.max_entries)):
            self.compact()

    def compact(self) -> "SparseCounts":
        """Fold the buffered keys in (sorted, unique) and prune past ``max_entries``."""
        if self.pending:
            self.keys, self.counts = _sorted_sums(np.concatenate([self.keys] + [k for k, _ in self.pending]),
                                                  np.concatenate([self.counts] + [c for _, c in self.pending]))
            self.pending, self.pending_size = [], 0
        if len(self.keys) > self.max_entries:
            self._prune()
        return self

    def _prune(self) -> None:
        """Drop the groups of smallest total until at most half of ``max_entries`` keys remain."""
        groups, inverse = np.unique(self.keys // self.group, return_inverse=True)
        totals = np.bincount(inverse, weights=self.counts).astype(np.int64)
        sizes = np.bincount(inverse)
        order = np.argsort(totals, kind="stable")[::-1]  # largest totals kept first
        keep_groups = order[np.cumsum(sizes[order]) <= self.max_entries // 2]
        mask = np.zeros(len(groups), bool)
        mask[keep_groups] = True
        dropped = totals[~mask]
        self.dropped_below = max(self.dropped_below, int(dropped.max()) if len(dropped) else 0)
        keep = mask[inverse]
        self.keys, self.counts = self.keys[keep], self.counts[keep]

    def merge(self, other: "SparseCounts") -> "SparseCounts":
        other.compact()
        self.add(other.keys, other.counts)
        self.dropped_below = max(self.dropped_below, other.dropped_below)
        return self.compact()

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The count of each of ``keys`` (0 where absent)."""
        self.compact()
        keys = np.asarray(keys, np.int64)
        at = np.searchsorted(self.keys, keys)
        at = np.minimum(at, max(len(self.keys) - 1, 0))
        found = (len(self.keys) > 0) & (self.keys[at] == keys) if len(self.keys) else np.zeros(keys.shape, bool)
        return np.where(found, self.counts[at] if len(self.keys) else 0, 0)


def _sorted_sums(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys, sorted, with their summed counts (a stable sort: runs already sorted merge in linear time)."""
    if not len(keys):
        return keys.astype(np.int64), counts.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.r_[0, np.nonzero(keys[1:] != keys[:-1])[0] + 1]
    return keys[starts], np.add.reduceat(counts, starts)
