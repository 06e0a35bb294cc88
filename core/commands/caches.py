"""List and prune routing caches: every setting gets its own cache, so old ones pile up.

    uv run exp/caches.py list [--cache-dir results/cache]
    uv run exp/caches.py prune [--cache-dir results/cache] [--dry-run]

``prune`` removes the caches the latest run of their model did not use (other settings, data or
weights). It deletes only what a cache wrote, by its checksummed manifest (its shards, a pending
one, the manifest, its lock), never other files, and only inside ``--cache-dir``
(``core.owned_files``). Every cache to prune is checked before any is removed: an index entry
that leaves the cache folder, or a manifest edited by hand, is a one-line error and nothing goes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LOCK_FILE = ".lock"


def _indexes(root: Path) -> list[Path]:
    return sorted(root.glob("*/index.json"))


def cache_rows(root: Path) -> list[dict]:
    """One row per cache in every sweep index under ``root``, with whether the latest sweep used it."""
    from core.collection.sweep import load_sweep_index

    from core.owned_files import inside
    from core.store.cache_format import CacheError

    rows = []
    for idx in _indexes(root):
        index = load_sweep_index(idx)
        last, entries = index.get("last_paths", {}), index.get("entries", [])
        if not isinstance(last, dict) or not isinstance(entries, list):
            raise CacheError(f"sweep index {idx} is malformed; delete it, the next sweep writes it again")
        used = set(last.values())
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("path"), str) or "checkpoint" not in e or "dataset" not in e:
                raise CacheError(f"sweep index {idx} has a malformed entry ({str(e)[:80]}); delete the index, the next "
                                 "sweep writes it again")
            folder = idx.parent / e["path"]
            inside(idx.parent, folder)  # an entry edited to point elsewhere is refused, before anything is read or removed
            size = sum(f.stat().st_size for f in folder.glob("*") if f.is_file()) if folder.is_dir() else 0
            rows.append({"model": index.get("model"), "checkpoint": e["checkpoint"], "dataset": e["dataset"],
                         "identity": e.get("identity"), "tokens": e.get("num_tokens"), "bytes": size,
                         "complete": e.get("complete"), "in_latest_run": e["path"] in used, "path": folder,
                         "index": idx})
    return rows


def remove_cache(folder: Path) -> None:
    """Delete what a cache wrote, by its manifest (nothing else); the folder goes if it is then empty."""
    from core.owned_files import remove_empty_folder, remove_file
    from core.store.cache import discard_cache

    had_cache = (folder / "manifest.json").is_file()
    discard_cache(folder)
    lock = folder / LOCK_FILE
    if had_cache and lock.is_file() and not lock.is_symlink() and lock.stat().st_size == 0:  # the writers' lock is always empty
        remove_file(folder, LOCK_FILE)
    remove_empty_folder(folder.parent, folder)


def prune(root: Path, dry_run: bool = False) -> list[dict]:
    """Remove the caches their model's latest sweep did not use, and drop them from the index."""
    from core.collection.sweep import _index_digest, load_sweep_index
    from core.safe_io import atomic_write_json

    from core.owned_files import inside
    from core.store.cache_format import read_manifest

    stale = [r for r in cache_rows(root) if not r["in_latest_run"]]
    for row in stale:  # every record checked before anything is removed
        manifest = read_manifest(row["path"]) or {"shards": []}
        for s in manifest["shards"]:
            inside(row["path"], row["path"] / s["file"])  # a shard that is a link out of the folder
    if dry_run:
        return stale
    for row in stale:
        remove_cache(row["path"])
    for idx in {r["index"] for r in stale}:
        index = load_sweep_index(idx)
        gone = {str(r["path"].relative_to(idx.parent)) for r in stale if r["index"] == idx}
        index["entries"] = [e for e in index["entries"] if e["path"] not in gone]
        atomic_write_json(idx, {**index, "sha256": _index_digest(index)})
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("action", choices=["list", "prune"])
    ap.add_argument("--cache-dir", default="results/cache", help="where the routing caches are (default results/cache)")
    ap.add_argument("--dry-run", action="store_true", help="prune: say what would go, remove nothing")
    args = ap.parse_args(argv)
    root = Path(args.cache_dir)
    if not root.is_dir():
        print(f"error: no cache directory {root}", file=sys.stderr)
        return 2
    from core.collection.checkpoints import CheckpointError
    from core.owned_files import OwnershipError
    from core.store.cache_format import CacheError

    try:
        rows = cache_rows(root) if args.action == "list" else prune(root, args.dry_run)
    except (CacheError, CheckpointError, OwnershipError) as e:
        print(f"error: {e}; nothing was removed", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or root}: {e.strerror or e}", file=sys.stderr)
        return 1
    verb = {"list": "", "prune": "would remove " if args.dry_run else "removed "}[args.action]
    for r in rows:
        mark = "" if args.action != "list" else ("  (latest run)" if r["in_latest_run"] else "  (not in the latest run)")
        print(f"{verb}{r['model']} {r['checkpoint']} {r['dataset']} [{r['identity']}] {r['tokens']} tokens, "
              f"{r['bytes'] / 1e6:.1f} MB{mark}  {r['path']}")
    print(f"{len(rows)} cache(s)" + (f", {sum(r['bytes'] for r in rows) / 1e6:.1f} MB" if rows else ""))
    return 0
