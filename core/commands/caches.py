"""List and prune routing caches: every setting gets its own cache, so old ones pile up.

    uv run exp/caches.py list [--cache-dir results/cache]
    uv run exp/caches.py prune [--cache-dir results/cache] [--dry-run]

``prune`` removes the caches the latest run of their model did not use (other settings, data or
weights). It deletes only what a cache wrote (its manifest and shards), never other files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CACHE_FILES = ("manifest.json", ".lock")


def _indexes(root: Path) -> list[Path]:
    return sorted(root.glob("*/index.json"))


def cache_rows(root: Path) -> list[dict]:
    """One row per cache in every sweep index under ``root``, with whether the latest sweep used it."""
    from core.collection.sweep import load_sweep_index

    rows = []
    for idx in _indexes(root):
        index = load_sweep_index(idx)
        used = set(index.get("last_paths", {}).values())
        for e in index.get("entries", []):
            folder = idx.parent / e["path"]
            size = sum(f.stat().st_size for f in folder.glob("*") if f.is_file()) if folder.is_dir() else 0
            rows.append({"model": index.get("model"), "checkpoint": e["checkpoint"], "dataset": e["dataset"],
                         "identity": e.get("identity"), "tokens": e.get("num_tokens"), "bytes": size,
                         "complete": e.get("complete"), "in_latest_run": e["path"] in used, "path": folder,
                         "index": idx})
    return rows


def remove_cache(folder: Path) -> list[Path]:
    """Delete a cache's manifest and the shards it lists (nothing else); the folder goes if it is then empty."""
    from core.store.cache_format import read_manifest

    manifest = read_manifest(folder) or {}
    files = [folder / s["file"] for s in manifest.get("shards", [])] + [folder / name for name in CACHE_FILES]
    removed = [f for f in files if f.exists()]
    for f in removed:
        f.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return removed


def prune(root: Path, dry_run: bool = False) -> list[dict]:
    """Remove the caches their model's latest sweep did not use, and drop them from the index."""
    from core.collection.sweep import _index_digest, load_sweep_index
    from core.safe_io import atomic_write_json

    stale = [r for r in cache_rows(root) if not r["in_latest_run"]]
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
    rows = cache_rows(root) if args.action == "list" else prune(root, args.dry_run)
    verb = {"list": "", "prune": "would remove " if args.dry_run else "removed "}[args.action]
    for r in rows:
        mark = "" if args.action != "list" else ("  (latest run)" if r["in_latest_run"] else "  (not in the latest run)")
        print(f"{verb}{r['model']} {r['checkpoint']} {r['dataset']} [{r['identity']}] {r['tokens']} tokens, "
              f"{r['bytes'] / 1e6:.1f} MB{mark}  {r['path']}")
    print(f"{len(rows)} cache(s)" + (f", {sum(r['bytes'] for r in rows) / 1e6:.1f} MB" if rows else ""))
    return 0
