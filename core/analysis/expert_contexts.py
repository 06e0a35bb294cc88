"""Each expert's max-activating contexts: the tokens it took with the largest routing weight, with the text around them.

For every (layer, expert) :class:`TopContexts` keeps the ``top_n`` heaviest (token, weight) of the
stream and ``window`` token ids either side of the token, within its document (-1 elsewhere).
Memory is ``L x E x top_n x (2 window + 1)`` ids whatever the number of tokens. A token's right
context may lie in the next chunk, so the last ``window`` tokens of a chunk wait for it (a
share of the stream ends between documents, so its last tokens are finished by :meth:`flush`).
Ties in weight go to the earlier (dataset, document, position), so the kept set does not depend
on how the stream is cut.
"""

from __future__ import annotations

import numpy as np

_FIELDS = ("tok", "key", "dataset", "domain", "doc", "pos", "idx", "w", "done")
_META = ("dataset", "domain", "doc", "pos")


class TopContexts:
    """The ``top_n`` heaviest routings of each of ``num_cols`` (layer x expert) columns, with their contexts."""

    def __init__(self, num_cols: int, num_experts: int, top_n: int, window: int) -> None:
        self.E, self.top_n, self.window = num_experts, top_n, window
        self.weight = np.full((num_cols, top_n), -np.inf)
        self.meta = np.full((num_cols, top_n, len(_META)), -1, np.int64)
        self.tokens = np.full((num_cols, top_n, 2 * window + 1), -1, np.int64)
        self.carry: dict[str, np.ndarray] | None = None  # the last 2 x window tokens: context, and some not yet done

    def update(self, rows: dict[str, np.ndarray]) -> None:
        """Add a chunk's tokens (``rows``: the arrays of ``_FIELDS`` but ``done``, one row per token)."""
        rows = dict(rows, done=np.zeros(len(rows["tok"]), bool))
        buf = rows if self.carry is None else {f: np.concatenate([self.carry[f], rows[f]]) for f in _FIELDS}
        ready = ~buf["done"]
        ready[max(0, len(ready) - self.window):] = False  # their right context is still to come
        self._take(buf, np.nonzero(ready)[0])
        buf["done"] = buf["done"] | ready
        self.carry = {f: v[-2 * self.window:] if self.window else v[:0] for f, v in buf.items()}

    def flush(self) -> None:
        """Finish the tokens still waiting (the stream, or this share of it, ended)."""
        if self.carry is not None:
            self._take(self.carry, np.nonzero(~self.carry["done"])[0])
            self.carry = None

    def merge(self, later: "TopContexts") -> None:
        """Fold in the contexts of the share of the stream that follows this one's."""
        self.flush()
        self._keep(later.weight, later.meta, later.tokens)
        self.carry = later.carry

    def _take(self, buf: dict[str, np.ndarray], rows: np.ndarray) -> None:
        """Offer the routings of ``rows`` of ``buf`` to their columns' top lists."""
        if not len(rows):
            return
        idx, w = buf["idx"][rows], buf["w"][rows]  # [r, L, k]
        r, L, k = idx.shape
        # only a routing at least as heavy as its column's current last kept one can enter (ties may, by position)
        ok = (idx >= 0) & (w >= self.weight[np.arange(L)[None, :, None] * self.E + np.maximum(idx, 0), -1])
        row = np.broadcast_to(np.arange(r)[:, None, None], idx.shape)[ok]
        col = (np.broadcast_to(np.arange(L)[None, :, None], idx.shape) * self.E + idx)[ok]
        weight = w[ok]
        meta = np.stack([buf[f][rows][row] for f in _META], -1)
        order = np.lexsort((meta[:, 3], meta[:, 2], meta[:, 0], -weight, col))
        col, weight, meta, row = col[order], weight[order], meta[order], row[order]
        starts = np.r_[0, np.nonzero(col[1:] != col[:-1])[0] + 1]
        rank = np.arange(len(col)) - np.repeat(starts, np.diff(np.r_[starts, len(col)]))
        top = rank < self.top_n
        col, weight, meta, rank, row = col[top], weight[top], meta[top], rank[top], row[top]
        cw = np.full(self.weight.shape, -np.inf)
        cm = np.full(self.meta.shape, -1, np.int64)
        ct = np.full(self.tokens.shape, -1, np.int64)
        cw[col, rank], cm[col, rank] = weight, meta
        ct[col, rank] = self._windows(buf, rows[row])
        self._keep(cw, cm, ct)

    def _windows(self, buf: dict[str, np.ndarray], centre: np.ndarray) -> np.ndarray:
        """``[n, 2 window + 1]`` token ids around each centre row of ``buf``, -1 outside its document or the buffer."""
        offsets = np.arange(-self.window, self.window + 1)
        at = centre[:, None] + offsets[None, :]
        inside = (at >= 0) & (at < len(buf["tok"]))
        at = np.clip(at, 0, max(len(buf["tok"]) - 1, 0))
        same = inside & (buf["key"][at] == buf["key"][centre][:, None])
        return np.where(same, buf["tok"][at], -1)

    def _keep(self, weight: np.ndarray, meta: np.ndarray, tokens: np.ndarray) -> None:
        """The ``top_n`` heaviest of the kept and the offered, per column (ties: earlier dataset, document, position)."""
        w = np.concatenate([self.weight, weight], 1)
        m = np.concatenate([self.meta, meta], 1)
        t = np.concatenate([self.tokens, tokens], 1)
        big = np.iinfo(np.int64).max
        tie = [np.where(np.isfinite(w), m[..., j], big) for j in (3, 2, 0)]  # empty slots last
        order = np.lexsort((*tie, -w), axis=1)[:, :self.top_n]
        self.weight = np.take_along_axis(w, order, 1)
        self.meta = np.take_along_axis(m, order[..., None], 1)
        self.tokens = np.take_along_axis(t, order[..., None], 1)
