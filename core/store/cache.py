"""One routing cache on disk: a resumable, atomic writer and a checked, streaming reader.

Routing is collected once and analysed many times, so the cache must never lose finished
work, never mix stale work into new, and be checkable (format: ``core.store.cache_format``).

The manifest is the commit point. A shard is first named in the manifest as pending, then written
to a temporary file named after it, fsynced, renamed into place, and only then listed in a manifest
that is itself replaced atomically. A pending shard (a run killed mid-write) and its temporary file
are the writer's own by that record, and are removed on resume; a file the manifest does not name is
never removed or overwritten (``core.owned_files``). Each listed shard carries its size and SHA-256,
so corruption is detected on read.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.distributed import Ranks, current_ranks
from core.routing_data import RoutingData
from core.owned_files import remove_file
from core.safe_io import atomic_write_bytes, atomic_write_json
from core.store.cache_format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PENDING,
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    check_manifest_numbers,
    decode_shard,
    describe_differences,
    encode_shard,
    identity_differences,
    read_manifest,
    sealed_manifest,
    shard_file_name,
    shard_temp_name,
    validate_header,
)

__all__ = [
    "CacheCorruptError", "CacheError", "CacheIncompleteError", "CacheMismatchError", "CacheStream", "RoutingCache",
    "RoutingCacheWriter", "discard_cache",
]


LOCK_NAME = ".lock"
RECOLLECT = "collect it again with --recollect (force=True from Python)"


_HELD: dict[Path, list] = {}  # cache folder -> [lock file, writers of this process holding it]


class _Claim:
    """This process's hold on a cache folder: an exclusive ``flock`` on ``.lock``, shared by its writers.

    Another process blocks (with a message) until the hold is released; writers within one process
    share it, since an abandoned writer (an exception, a test) must not lock its own process out.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.key = cache_dir.resolve()
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            return
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: one writer per cache is then the user's to keep
            _HELD[self.key] = [None, 1]
            return
        fh = open(cache_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another process is writing the cache at {cache_dir}; waiting for it to finish", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        _HELD[self.key] = [fh, 1]

    def close(self) -> None:
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del _HELD[self.key]
            if held[0] is not None:
                held[0].close()



def shard_payload(data: RoutingData, settings: dict, first_row: int, num_rows: int,
                  ranks: Ranks | None = None) -> tuple[bytes, dict]:
    """The bytes of a shard of rows ``[first_row, first_row + num_rows)`` and its manifest entry (less the file name)."""
    tensors = encode_shard(data, settings)
    # one metadata key only: safetensors does not keep key order, and shards must be byte-reproducible
    payload = st_save(tensors, metadata={"rows": f"{first_row}:{first_row + num_rows}"})
    return payload, {
        "first_row": first_row,
        "num_rows": num_rows,
        "num_tokens": data.num_tokens,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "written_by": (ranks or current_ranks()).as_dict(),  # which torchrun rank (of how many) wrote this shard
    }


class RoutingCacheWriter:
    """Appends shards to a cache directory, resuming after the last committed shard.

    ``header`` says what is being collected (see ``IDENTITY_KEYS``). Opening a directory
    whose manifest has a different identity raises ``CacheMismatchError`` naming each
    difference, unless ``force=True``, which discards the old cache (the files its manifest
    lists, nothing else: :func:`discard_cache`). ``verify_existing``
    re-checks the checksums of committed shards before resuming.
    """

    def __init__(self, cache_dir: str | os.PathLike, header: dict, *, force: bool = False, verify_existing: bool = False):
        validate_header(header)
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock: _Claim | None = _Claim(self.dir)  # one writer per cache: another process waits, then finds the work done
        try:
            self._open(header, force, verify_existing)
        except BaseException:
            self.close()
            raise

    def _open(self, header: dict, force: bool, verify_existing: bool) -> None:
        """Read the cache's state under the claim: resume it, refuse it, or start it."""
        header = {"format_version": FORMAT_VERSION, **header}
        if force:
            discard_cache(self.dir)
        old = read_manifest(self.dir)
        if old is not None:
            diffs = identity_differences(old, header)
            if diffs:
                raise CacheMismatchError(
                    f"cache at {self.dir} was collected differently: " + "; ".join(diffs)
                    + " — use another cache folder, or --recollect (force=True from Python) to replace it"
                )
            self.manifest = old
        else:
            self.manifest = {
                **header,
                "shards": [],
                "rows_done": 0,
                "total_tokens": 0,
                "complete": False,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        self._clear_pending()
        if old is not None:
            self._check_committed(verify_existing)
        # a new cache gets its manifest with its first shard: until then there is nothing to keep

    # ----------------------------------------------------------------- state
    @property
    def next_row(self) -> int:
        """First dataset row not yet in a committed shard: where collection resumes."""
        return int(self.manifest["rows_done"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    def _clear_pending(self) -> None:
        """Remove the shard a stopped writer had named pending, and its temporary file: its own by the manifest's record."""
        pending = self.manifest.pop(PENDING, None)
        if pending is not None and pending not in {s["file"] for s in self.manifest["shards"]}:
            remove_file(self.dir, pending)
            remove_file(self.dir, shard_temp_name(pending))

    def close(self) -> None:
        """Let another writer of this cache go on (also done when the writer is garbage collected)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _check_committed(self, verify: bool) -> None:
        for s in self.manifest["shards"]:
            path = self.dir / s["file"]
            if not path.exists() or path.stat().st_size != s["bytes"]:
                raise CacheCorruptError(f"shard {s['file']} of {self.dir} is missing or has the wrong size; {RECOLLECT}")
        if verify:  # checksums only: decoding every shard is not needed to trust it
            RoutingCache(self.dir, self.manifest).verify()

    # ----------------------------------------------------------------- write
    def write_shard(self, data: RoutingData, first_row: int, num_rows: int) -> dict:
        """Commit the routing of rows ``[first_row, first_row + num_rows)`` as the next shard."""
        if self.complete:
            raise CacheError(f"cache at {self.dir} is already complete; nothing more can be appended")
        if first_row != self.next_row:
            raise CacheError(
                f"shard starts at row {first_row} but the cache continues at row {self.next_row}; "
                "rows would be duplicated or dropped"
            )
        if first_row + num_rows > self.manifest["num_rows"]:
            raise CacheError(f"shard ends at row {first_row + num_rows}, past the dataset's {self.manifest['num_rows']} rows")
        if data.num_tokens == 0:
            pass  # an all-padding placeholder says nothing about the model's scoring
        elif self.manifest.get("score_fn") is None:  # known for sure once routing is traced
            self.manifest["score_fn"] = data.score_fn
        elif data.score_fn != self.manifest["score_fn"]:
            raise CacheError(f"routing scored with {data.score_fn!r} but the cache holds {self.manifest['score_fn']!r} routing")
        payload, entry = shard_payload(data, self.settings, first_row, num_rows)
        name = shard_file_name(len(self.manifest["shards"]))
        in_the_way = [n for n in (name, shard_temp_name(name)) if (self.dir / n).exists() or (self.dir / n).is_symlink()]
        if in_the_way:
            raise CacheError(f"{self.dir / in_the_way[0]} is in the way of the cache's next shard; its manifest does not name "
                             "it, so it is not the toolkit's to overwrite: move it away and run again")
        self.manifest[PENDING] = name  # the record that makes a stopped write the writer's own to clear
        self._commit()
        atomic_write_bytes(self.dir / name, payload, temp=shard_temp_name(name))
        entry = {"file": name, **entry}
        del self.manifest[PENDING]
        self.manifest["shards"].append(entry)
        self.manifest["rows_done"] = first_row + num_rows
        self.manifest["total_tokens"] += data.num_tokens
        # the last shard also marks the cache complete, in the same atomic manifest write
        self.manifest["complete"] = self.manifest["rows_done"] == self.manifest["num_rows"]
        self._commit()
        return entry

    def finish(self) -> "RoutingCache":
        """Mark the cache complete once every row is in; returns a reader over it."""
        if self.next_row != self.manifest["num_rows"]:
            raise CacheIncompleteError(
                f"cache at {self.dir} holds rows [0, {self.next_row}) of {self.manifest['num_rows']}; cannot mark it complete"
            )
        if not self.complete or not (self.dir / MANIFEST_NAME).exists():  # e.g. a dataset of no rows
            self.manifest["complete"] = True
            self._commit()
        self.close()
        return RoutingCache(self.dir, self.manifest)

    def _commit(self) -> None:
        self.manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_json(self.dir / MANIFEST_NAME, sealed_manifest(self.manifest))


def discard_cache(cache_dir: str | os.PathLike) -> None:
    """Remove a cache by its manifest: the shards it lists, a pending one, then the manifest; never another file.

    A manifest that is damaged or edited names nothing the toolkit can trust, so it is an error
    (delete the folder by hand); a folder without one holds nothing of a cache.
    """
    cache_dir = Path(cache_dir)
    old = read_manifest(cache_dir)
    if old is None:
        return
    names = [s["file"] for s in old.get("shards", [])] + ([old[PENDING]] if old.get(PENDING) else [])
    for name in names:
        remove_file(cache_dir, name)
        remove_file(cache_dir, shard_temp_name(name))
    remove_file(cache_dir, MANIFEST_NAME)


# ---------------------------------------------------------------------------- reader
class RoutingCache:
    """Read access to a routing cache, whole or shard by shard, for the analyzers."""

    def __init__(self, cache_dir: str | os.PathLike, manifest: dict):
        self.dir = Path(cache_dir)
        self.manifest = manifest

    @classmethod
    def open(
        cls, cache_dir: str | os.PathLike, *, allow_incomplete: bool = False, expect: dict | None = None
    ) -> "RoutingCache":
        """Open a cache; an unfinished one is refused unless ``allow_incomplete`` (read what is committed).

        ``expect`` (e.g. ``{"model_name": ..., "revision": ..., "settings": {"storage": "full"}}``)
        refuses a cache that differs in any key given, naming each difference.
        """
        manifest = read_manifest(Path(cache_dir))
        if manifest is None:
            raise CacheError(f"no routing cache at {cache_dir} (no {MANIFEST_NAME})")
        check_manifest_numbers(manifest, Path(cache_dir))
        if expect:
            have = {k: ({kk: manifest.get(k, {}).get(kk) for kk in v} if isinstance(v, dict) else manifest.get(k))
                    for k, v in expect.items()}
            diffs = describe_differences(have, expect, "")
            if diffs:
                raise CacheMismatchError(f"cache at {cache_dir} is not the one asked for: " + "; ".join(diffs))
        if not manifest.get("complete") and not allow_incomplete:
            raise CacheIncompleteError(
                f"cache at {cache_dir} is incomplete ({manifest['rows_done']} of {manifest['num_rows']} rows); "
                "run the collection again to resume it, or open with allow_incomplete=True"
            )
        return cls(cache_dir, manifest)

    # ----------------------------------------------------------------- facts
    @property
    def num_tokens(self) -> int:
        return int(self.manifest["total_tokens"])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def storage(self) -> str:
        return self.manifest["settings"]["storage"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def shard_paths(self) -> list[Path]:
        return [self.dir / s["file"] for s in self.manifest["shards"]]

    def bytes_on_disk(self) -> int:
        return sum(int(s["bytes"]) for s in self.manifest["shards"])

    def bytes_per_token(self) -> float:
        return self.bytes_on_disk() / max(self.num_tokens, 1)

    def __len__(self) -> int:
        return self.num_tokens

    def __iter__(self) -> Iterator[RoutingData]:
        """A cache is a re-iterable stream of shards, so it can be handed to any streaming analysis."""
        return self.iter_shards()

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"RoutingCache({str(self.dir)!r}, model={m['model_name']!r}, revision={m['revision']!r}, "
            f"dataset={m['dataset']!r}, storage={self.storage!r}, tokens={self.num_tokens}, shards={self.num_shards}, "
            f"complete={self.complete})"
        )

    # ----------------------------------------------------------------- read
    def _read_checked(self, i: int, verify: bool) -> bytes:
        s = self.manifest["shards"][i]
        path = self.dir / s["file"]
        try:
            payload = path.read_bytes()
        except FileNotFoundError:
            raise CacheCorruptError(f"shard {s['file']} listed in {self.dir}/{MANIFEST_NAME} is missing; {RECOLLECT}") from None
        if len(payload) != s["bytes"] or (verify and hashlib.sha256(payload).hexdigest() != s["sha256"]):
            raise CacheCorruptError(f"shard {s['file']} of {self.dir} fails its checksum (corrupted on disk); {RECOLLECT}")
        return payload

    def load_shard(self, i: int, *, verify: bool = True, dtype: torch.dtype | None = torch.float32) -> RoutingData:
        """Shard ``i`` as RoutingData; floats converted to ``dtype`` (None keeps the stored precision)."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range: the cache has {self.num_shards} shards")
        payload = self._read_checked(i, verify)
        try:
            tensors = st_load(payload)
        except Exception as e:  # a payload that passed its size check but not the parser
            raise CacheCorruptError(f"shard {self.manifest['shards'][i]['file']} of {self.dir} cannot be parsed "
                                    f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); {RECOLLECT}") from e
        rd = decode_shard(tensors, self.manifest, dtype)
        if rd.num_tokens != int(self.manifest["shards"][i]["num_tokens"]):
            raise CacheCorruptError(f"shard {self.manifest['shards'][i]['file']} of {self.dir} holds {rd.num_tokens} tokens, its "
                                    f"manifest entry says {self.manifest['shards'][i]['num_tokens']}; {RECOLLECT}")
        return rd

    def iter_shards(self, *, verify: bool = True, dtype: torch.dtype | None = torch.float32) -> Iterator[RoutingData]:
        """Stream the cache shard by shard: memory bounded by one shard."""
        for i in range(self.num_shards):
            yield self.load_shard(i, verify=verify, dtype=dtype)

    def load(self, *, verify: bool = True, dtype: torch.dtype | None = torch.float32) -> RoutingData:
        """The whole cache as one RoutingData (mind memory for long runs; prefer ``iter_shards``)."""
        if self.num_shards == 0:
            raise CacheError(f"cache at {self.dir} holds no shards yet")
        return RoutingData.concat(list(self.iter_shards(verify=verify, dtype=dtype)))

    def verify(self) -> None:
        """Check every shard's size and checksum; raise CacheCorruptError naming all bad shards."""
        bad = []
        for i, s in enumerate(self.manifest["shards"]):
            try:
                self._read_checked(i, verify=True)
            except CacheCorruptError:
                bad.append(s["file"])
        if bad:
            raise CacheCorruptError(f"{len(bad)} shard(s) of {self.dir} are missing or corrupted: {', '.join(bad)}; {RECOLLECT}")


class CacheStream:
    """Several caches read one after another as one re-iterable stream of shards.

    Each pass re-reads the shards from disk, so memory stays bounded by one shard however many
    tokens the caches hold; analyses that take ``Iterable[RoutingData]`` accept it directly.
    """

    def __init__(self, caches: Sequence["RoutingCache"]):
        if not caches:
            raise CacheError("a cache stream needs at least one cache")
        self.caches = list(caches)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.caches)

    @property
    def has_logits(self) -> bool:
        return all(c.storage == "full" for c in self.caches)

    def __iter__(self) -> Iterator[RoutingData]:
        for cache in self.caches:
            yield from cache.iter_shards()
