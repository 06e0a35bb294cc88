"""One cache traced by several torchrun processes: its shards planned up front, written as parts, joined by one rank.

When a sweep has fewer caches to collect than processes, each cache is split. The shards are
known before any tracing: a shard ends on the first batch boundary at or past ``shard_tokens``
tokens, and :func:`plan_shards` finds those ends from the attention mask (one process's
``ActivationCollector.collect`` cuts its shards at the same plan). Each rank traces the planned shards it
owns and writes each as a *part* beside where the manifest goes (``part-<first row>.safetensors``
and its entry ``part-<first row>.json``, both atomic), with the cache's header in ``parts.json``.
After a barrier one rank joins them (:func:`join_parts`): a manifest listing the parts in row
order. The shards are byte for byte those of one process, so the cache is the same whoever
wrote it, and a part once written is never traced again, whatever the number of processes of
the next run (``collect`` of one process finishes a split cache the same way). Entry files are
named from the plan's row numbers and removed only through ``core.owned_files``; the file an entry
names must be one of the folder's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from core.distributed import Ranks
from core.owned_files import remove_file
from core.routing_data import RoutingData
from core.safe_io import atomic_write_bytes, atomic_write_json
from core.store.cache import RoutingCache, discard_cache, shard_payload
from core.store.cache_format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheCorruptError,
    CacheError,
    identity_differences,
    is_own_file,
    read_manifest,
    sealed_manifest,
)
from core.store.rows import concat_batches, token_rows

PARTS_FILE = "parts.json"


def plan_shards(mask: torch.Tensor, batch_size: int, shard_tokens: int) -> list[tuple[int, int]]:
    """The ``(first_row, stop_row)`` of every shard one process writes for rows with this attention mask."""
    counts = mask.sum(1).tolist()
    rows = len(counts)
    out, start, buffered = [], 0, 0
    for lo in range(0, rows, batch_size):
        hi = min(lo + batch_size, rows)
        buffered += sum(counts[lo:hi])
        if buffered >= shard_tokens:
            out.append((start, hi))
            start, buffered = hi, 0
    if start < rows:
        out.append((start, rows))
    return out


def part_name(first_row: int) -> str:
    return f"part-{first_row:09d}.safetensors"


def _entry_name(first_row: int) -> str:
    return f"part-{first_row:09d}.json"


def _entry_path(cache_dir: Path, first_row: int) -> Path:
    return cache_dir / _entry_name(first_row)


def has_parts(cache_dir: str | Path) -> bool:
    """Whether a split collection left parts here (then any later collection of this cache finishes them)."""
    return (Path(cache_dir) / PARTS_FILE).exists()


def _finished(cache_dir: Path, first_row: int, num_rows: int) -> bool:
    path = _entry_path(cache_dir, first_row)
    if not path.exists():
        return False
    entry = json.loads(path.read_text())
    if not is_own_file(entry.get("file")):  # a part, or a shard adopted from one process's cache: a file of this folder
        raise CacheCorruptError(f"{path} names {str(entry.get('file'))[:80]!r}, not a file of its folder; delete the "
                                "folder and collect again")
    part = cache_dir / entry["file"]
    return entry["num_rows"] == num_rows and part.exists() and part.stat().st_size == entry["bytes"]


def collect_parts(collector: Any, tokenized: Any, cache_dir: str | Path, header: dict, ranks: Ranks, *,
                  batch_size: int, trace_kw: dict, progress: bool = False, force: bool = False) -> list[tuple[int, int]]:
    """Trace this rank's planned shards that are not written yet, each into a part; returns the whole plan.

    Planned shard ``i`` is rank ``i % world_size``'s. ``force`` traces them again.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _, mask = token_rows(tokenized)
    plan = plan_shards(mask, batch_size, header["settings"]["shard_tokens"])
    atomic_write_json(cache_dir / PARTS_FILE, {"header": header, "plan": plan})  # the same from every rank
    if force:  # one rank removes the old cache's files, and no rank writes a part before they are gone
        if ranks.rank == 0:
            discard_cache(cache_dir)
        ranks.barrier()
    else:
        _adopt_shards(cache_dir, header)
    mine = [(a, b) for i, (a, b) in enumerate(plan) if ranks.owns(i) and (force or not _finished(cache_dir, a, b - a))]
    total = sum(int(mask[a:b].sum()) for a, b in mine)
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"routing {header['dataset']} (parts)",
              disable=not progress) as bar:
        for a, b in mine:
            batches: list[RoutingData] = []
            for _, _, rd in collector.trace_batches(tokenized, batch_size=batch_size, start_row=a, stop_row=b, **trace_kw):
                batches.append(rd)
                bar.update(rd.num_tokens)
            data = concat_batches(batches)
            payload, entry = shard_payload(data, header["settings"], a, b - a, ranks)
            atomic_write_bytes(cache_dir / part_name(a), payload)
            atomic_write_json(_entry_path(cache_dir, a), {"file": part_name(a), **entry, "score_fn": data.score_fn})
    return plan


def _adopt_shards(cache_dir: Path, header: dict) -> None:
    """Shards one process committed before the split (the same planned shards) count as written parts."""
    old = read_manifest(cache_dir)
    if old is None or old.get("complete") or identity_differences(old, {"format_version": FORMAT_VERSION, **header}):
        return
    for e in old["shards"]:
        if not _entry_path(cache_dir, e["first_row"]).exists():
            atomic_write_json(_entry_path(cache_dir, e["first_row"]), {**e, "score_fn": old.get("score_fn")})


def join_parts(cache_dir: str | Path) -> RoutingCache:
    """Write the manifest of a split cache from its parts (all must be there); returns the cache."""
    cache_dir = Path(cache_dir)
    done = read_manifest(cache_dir)
    if done is not None and done.get("complete"):
        return RoutingCache(cache_dir, done)
    meta = json.loads((cache_dir / PARTS_FILE).read_text())
    header, plan = meta["header"], meta["plan"]
    if not all(isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in plan):
        raise CacheCorruptError(f"{cache_dir / PARTS_FILE} has a damaged plan (not pairs of row numbers); delete the "
                                "folder and collect again")
    missing = [f"{a}-{b}" for a, b in plan if not _finished(cache_dir, a, b - a)]
    if missing:
        raise CacheError(f"the split cache at {cache_dir} lacks rows {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} (a rank stopped early); run the same command again")
    entries = [json.loads(_entry_path(cache_dir, a).read_text()) for a, _ in plan]
    score_fns = {e.pop("score_fn") for e in entries} - {None}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = {"format_version": FORMAT_VERSION, **header, "shards": entries, "rows_done": header["num_rows"],
                "total_tokens": sum(e["num_tokens"] for e in entries), "complete": True, "created_at": now,
                "updated_at": now}
    if header.get("score_fn") is None and score_fns:
        manifest["score_fn"] = score_fns.pop()
    atomic_write_json(cache_dir / MANIFEST_NAME, sealed_manifest(manifest))
    for a, _ in plan:  # the manifest now lists the parts; their entry files have done their job
        remove_file(cache_dir, _entry_name(a))
    remove_file(cache_dir, PARTS_FILE)
    return RoutingCache(cache_dir, manifest)

