"""The one pass's stored results: an unchanged rerun takes each pass analysis's result and reads no cache.

A pass analysis's result depends on the caches it reads, each (checkpoint, dataset) cache by its
sealed manifest (which holds every shard's SHA-256 and the identity of the model and data it was
collected from), in stream order with the checkpoints' names and steps; on the settings its
accumulator is built with (resamples, seed, micro, the token ids vocabulary specialization tracks);
and on the code that computes it (:func:`core.pipeline.code_version.code_version`). Each pass analysis's result is stored under
that identity in :class:`core.pipeline.result_store.ResultStore` (verified when read back), so an
analysis turned on again is computed alone. A cache whose shard files are not all there at their
recorded sizes, or written since (its modification time), is read, never trusted. ``--recompute pass`` (or ``all``) computes the pass again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.pipeline.code_version import code_version
from core.pipeline.result_store import ResultStore
from core.pipeline.reuse import recompute_asked, value_digest

STAGE = "pass"  # what --recompute names to compute the one pass again


def _cache_digest(cache: Any) -> str | None:
    """A cache's sealed manifest checksum with each shard's size and modification time, or None where a shard file is
    missing or not its recorded size.

    A shard written since the result was stored (even at its size) changes its time, so the pass reads it, and the
    read verifies its checksum; hashing every shard on each rerun instead would read the whole cache.
    """
    stamps = []
    for s in cache.manifest["shards"]:
        try:
            st = (cache.dir / s["file"]).stat()
        except OSError:
            return None
        if st.st_size != int(s["bytes"]):
            return None
        stamps.append([s["file"], st.st_size, st.st_mtime_ns])
    return value_digest([cache.manifest.get("sha256") or value_digest(cache.manifest), stamps])


def pass_identity(ctx: Any) -> dict[str, Any] | None:
    """What every pass analysis of ``ctx`` depends on, or None where a cache cannot be trusted without reading it."""
    sweep = ctx.sweep
    caches = []
    for name in sweep.datasets:
        for ckpt, cache in zip(sweep.checkpoints, sweep.caches[name]):
            digest = _cache_digest(cache)
            if digest is None:
                return None
            caches.append([name, ckpt.name, ckpt.step, digest])
    return {"caches": caches, "resamples": ctx.resamples, "seed": ctx.seed, "micro": ctx.micro,
            "token_ids": value_digest(ctx.frequent_ids), "code": code_version()}


class PassResults:
    """The stored results of one run's pass analyses: :meth:`load` those there are, :meth:`save` the rest."""

    def __init__(self, ctx: Any, world_size: int = 1) -> None:
        # under torchrun every process folds its share of the one pass: they read the caches together or not at all
        usable = world_size == 1 and not recompute_asked(ctx.options, STAGE)
        self.identity = pass_identity(ctx) if world_size == 1 else None
        self.usable = usable and self.identity is not None
        self.store = ResultStore(ctx.options.cache_root)

    def _key(self, name: str) -> dict[str, Any]:
        return {"analysis": name, "stage": STAGE, **(self.identity or {})}

    def load(self, names: list[str]) -> dict[str, Any]:
        """The verified stored result of each of ``names`` that has one (a stored None: the analysis had nothing)."""
        if not self.usable:
            return {}
        out = {}
        for name in names:
            found = self.store.load(name, self._key(name), missing=_MISSING)
            if found is not _MISSING:
                out[name] = found
        return out

    def save(self, results: Mapping[str, Any]) -> None:
        """Store each freshly computed result (a result that cannot be stored is said in one line; the run goes on)."""
        if self.identity is None:
            return
        for name, value in results.items():
            self.store.save(name, self._key(name), value)


_MISSING = object()
