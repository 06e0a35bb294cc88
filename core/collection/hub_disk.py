"""The HF cache footprint of Hub checkpoints: what a sweep will download, and freeing what it downloaded.

An OLMoE revision is about 14 GB, so a sweep over 8 checkpoints would leave 112 GB in the
Hugging Face cache. A sweep instead frees each revision it downloaded once that checkpoint's
routing is collected (``huggingface_hub``'s cache management), so at most about one revision
is on disk at a time. Revisions that were in the cache before the sweep are the user's and are
never deleted. Which revisions the sweep downloaded is written beside the sweep index
(:class:`HubCheckpointFiles`), so a sweep stopped mid-checkpoint and resumed still frees them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

from core.owned_files import remove_file
from core.safe_io import atomic_write_json

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_SMALL_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".py", ".jinja")  # configs, tokenizers, remote code
_HUB_NAME = re.compile(r"[A-Za-z0-9_][\w.-]*(/[\w.-]+)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
LEDGER_FILE = "hub_downloads.json"


# ---------------------------------------------------------------------------- sizes and names
def human_bytes(n: float) -> str:
    """``13958643712`` -> ``"14.0 GB"`` (decimal units, as the Hub shows sizes)."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def is_hub_repo(name: str | os.PathLike | None) -> bool:
    """Whether ``name`` is a Hub model id (``owner/name``) rather than a local folder: only those are freed."""
    if name is None or not isinstance(name, (str, os.PathLike)):
        return False
    text = str(name)
    return bool(_HUB_NAME.fullmatch(text)) and not Path(text).expanduser().exists()


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF hub cache in use: ``cache_dir``, else ``huggingface_hub.constants.HF_HUB_CACHE`` read now (not at import)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def revision_download_size(repo_id: str, revision: str | None) -> int | None:
    """Bytes ``from_pretrained`` downloads for one revision: its weights plus config and tokenizer files.

    Weights are the ``*.safetensors`` files (``*.bin`` only where there are none), as transformers
    picks them. None when the Hub cannot be reached (offline mode, no network): a plan then says
    the size is unknown instead of guessing; this never raises for that.
    """
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=15)
    except Exception:  # OfflineModeIsEnabled, connection errors, a revision the Hub does not have
        return None
    files = [(s.rfilename, s.size) for s in (info.siblings or [])]
    if any(size is None for _, size in files):
        return None
    weights = [size for name, size in files if name.endswith(".safetensors")]
    if not weights:
        weights = [size for name, size in files if name.endswith(".bin")]
    small = [size for name, size in files if name.endswith(_SMALL_SUFFIXES) and "/" not in name]
    return int(sum(weights) + sum(small))


# ---------------------------------------------------------------------------- the local cache
def _cached_repo(repo_id: str, cache_dir: str | os.PathLike | None) -> tuple[object | None, object | None]:
    """``(HFCacheInfo, CachedRepoInfo)`` of a model repo in the cache; Nones when there is no cache or no such repo."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(hub_cache_dir(cache_dir))
    except Exception:  # CacheNotFound (nothing downloaded yet), or the path is a file
        return None, None
    repo = next((r for r in info.repos if r.repo_id == repo_id and r.repo_type == "model"), None)
    return info, repo


def _resolve(repo: object, revision: str | None) -> object | None:
    """The cached revision a branch, tag or commit hash names (None: not cached)."""
    name = revision or "main"
    refs = repo.refs  # {ref name: CachedRevisionInfo}
    if name in refs:
        return refs[name]
    if _COMMIT.fullmatch(name):
        return next((r for r in repo.revisions if r.commit_hash == name), None)
    return None


def cached_revision_size(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None = None) -> int:
    """Bytes of one revision already in the local HF cache (0 when not cached), so a plan downloads only the rest."""
    _, repo = _cached_repo(repo_id, cache_dir)
    rev = _resolve(repo, revision) if repo is not None else None
    return int(rev.size_on_disk) if rev is not None else 0


def cached_commits(repo_id: str, cache_dir: str | os.PathLike | None = None) -> tuple[set[str], dict[str, str]]:
    """The repo's cached commit hashes and its refs (name -> commit): what the user had before a sweep.

    Read from the folder layout itself, not ``scan_cache_dir``: a repo the scan calls corrupted
    (one broken link) must still count as the user's, or its revisions could be freed later.
    """
    root = hub_cache_dir(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshots, refs_dir = root / "snapshots", root / "refs"
    commits = {p.name for p in snapshots.iterdir() if p.is_dir()} if snapshots.is_dir() else set()
    refs = {}
    if refs_dir.is_dir():
        for ref in refs_dir.glob("**/*"):
            if ref.is_file():
                refs[ref.relative_to(refs_dir).as_posix()] = ref.read_text().strip()
    return commits, refs


def free_revision(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None = None) -> int:
    """Delete one revision from the HF cache with huggingface_hub's cache management; returns the bytes freed.

    ``revision`` may be a branch or tag (resolved through the cached repo's refs) or a commit hash.
    Files shared with other cached revisions (an unchanged tokenizer) are kept. 0 when not cached.
    Callers decide whether the revision is theirs to delete (see :class:`HubCheckpointFiles`).
    """
    info, repo = _cached_repo(repo_id, cache_dir)
    rev = _resolve(repo, revision) if repo is not None else None
    if rev is None:
        return 0
    strategy = info.delete_revisions(rev.commit_hash)
    freed = int(strategy.expected_freed_size)
    strategy.execute()
    return freed


def free_disk(cache_dir: str | os.PathLike | None = None) -> tuple[Path, int]:
    """``(folder, free bytes)`` of the disk the HF cache is on (its nearest existing parent if not created yet)."""
    path = hub_cache_dir(cache_dir).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path, shutil.disk_usage(path).free


# ---------------------------------------------------------------------------- the plan
def plan_text(repo_id: str, revisions: Sequence[str | None], keep: bool, *,
              sizes: Mapping[str | None, int | None] | None = None,
              cache_dir: str | os.PathLike | None = None) -> str:
    """What a sweep of ``revisions`` will download and the disk it needs, in a few lines, before it starts.

    ``sizes`` gives download sizes by revision (default: asked of the Hub with
    :func:`revision_download_size`). Unknown sizes are said to be unknown, never guessed.
    """
    revisions = list(dict.fromkeys(revisions))
    n = len(revisions)
    what = f"{n} checkpoint{'s' if n != 1 else ''} of {repo_id}"
    if not revisions:
        return f"{what}: nothing to download"
    sizes = dict(sizes) if sizes is not None else {r: revision_download_size(repo_id, r) for r in revisions}
    cached = {r: cached_revision_size(repo_id, r, cache_dir) for r in revisions}
    have = sum(cached.values())
    if any(sizes.get(r) is None for r in revisions):
        return (f"{what}: download size unknown: the Hub cannot be reached ({human_bytes(have)} already in the HF cache); "
                + ("all are kept (--keep-checkpoints)" if keep else
                   "each revision this sweep downloads is deleted from the HF cache after its collection"))
    need = {r: max(int(sizes[r]) - cached[r], 0) for r in revisions}
    total, peak = sum(need.values()), max(need.values())
    each = sum(sizes[r] for r in revisions) / n
    if total == 0:
        return f"{what}: about {human_bytes(each)} each, all in the HF cache already: nothing to download"
    lines = [f"{what}: about {human_bytes(each)} to download each ({human_bytes(total)} in all, "
             f"{human_bytes(have)} already cached)"]
    disk_need = total if keep else peak
    if keep:
        lines.append(f"disk use: about {human_bytes(total)} more, all kept in the HF cache (--keep-checkpoints)")
    else:
        lines.append(f"peak disk about {human_bytes(peak)} at a time (each is deleted after collection; "
                     f"--keep-checkpoints keeps them: {human_bytes(total)})")
    folder, free = free_disk(cache_dir)
    if disk_need > free:
        lines.append(f"only {human_bytes(free)} free on the disk of {folder}: not enough for {human_bytes(disk_need)}; "
                     "free space or point HF_HUB_CACHE at a larger disk")
    else:
        lines.append(f"{human_bytes(free)} free on the disk of {folder}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- freeing what a sweep downloaded
class HubCheckpointFiles:
    """Frees the Hub revisions a sweep downloads, once each is collected, and never those the user already had.

    What was cached is read when the first checkpoint is about to load. Each revision the sweep
    is about to download is recorded in ``ledger`` (a JSON file beside the sweep index) before
    loading, so a sweep stopped part-way and run again knows those files are its own to free.
    ``keep``: free nothing (``--keep-checkpoints``).
    """

    def __init__(self, repo_id: str, ledger: str | os.PathLike, keep: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.repo_id, self.ledger, self.keep, self.cache_dir = repo_id, Path(ledger), keep, cache_dir
        self._start: tuple[set[str], dict[str, str]] | None = None
        self._inherited: set[str] = set()  # revisions an earlier, stopped run of this sweep downloaded
        self._ours: set[str] = set()

    def _read_ledger(self) -> set[str]:
        try:
            data = json.loads(self.ledger.read_text())
        except (OSError, ValueError):
            return set()
        return set(data.get(self.repo_id, [])) if isinstance(data, dict) else set()

    def _write_ledger(self) -> None:
        try:
            data = json.loads(self.ledger.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data[self.repo_id] = sorted(self._ours)
        if not data[self.repo_id]:
            del data[self.repo_id]
        if data:
            atomic_write_json(self.ledger, data)
        else:
            remove_file(self.ledger.parent, self.ledger.name)  # the sweep's own ledger, at the name it keeps it

    def _ensure_start(self) -> tuple[set[str], dict[str, str]]:
        if self._start is None:
            self._start = cached_commits(self.repo_id, self.cache_dir)
            self._inherited = self._read_ledger()
            self._ours = set(self._inherited)
        return self._start

    def _users(self, name: str) -> bool:
        """Whether this branch, tag or commit was cached before the sweep (kept even if the branch has moved since)."""
        commits, refs = self._ensure_start()
        return refs.get(name) in commits or name in commits

    def before_load(self, revision: str | None) -> None:
        """Call before loading a Hub checkpoint: records it as the sweep's own download unless the user had it."""
        name = revision or "main"
        if self.keep:
            return
        self._ensure_start()
        if name in self._ours or self._users(name):
            return
        self._ours.add(name)
        self._write_ledger()

    def not_from_hub(self, revision: str | None) -> None:
        """The loaded model did not come from the HF cache (an in-memory model): nothing to free for it."""
        name = revision or "main"
        if name in self._ours and name not in self._inherited:
            self._ours.discard(name)
            self._write_ledger()

    def after_collect(self, revision: str | None) -> str | None:
        """Call once a checkpoint is fully collected: frees its revision if the sweep downloaded it; a line to show."""
        name = revision or "main"
        if name not in self._ours:  # the user's, --keep-checkpoints, or not loaded from the HF cache
            return None
        commits, _ = self._ensure_start()
        _, repo = _cached_repo(self.repo_id, self.cache_dir)
        rev = _resolve(repo, name) if repo is not None else None
        freed = 0
        if rev is not None and (rev.commit_hash not in commits or name in self._inherited):
            freed = free_revision(self.repo_id, rev.commit_hash, self.cache_dir)
        self._ours.discard(name)
        self._write_ledger()
        return f"freed {human_bytes(freed)} of {self.repo_id}@{name} from the HF cache" if freed else None

    def finish(self, revisions: Sequence[str | None]) -> list[str]:
        """After a sweep: free what a stopped earlier run downloaded for these (now complete) checkpoints; lines to show.

        A run stopped after collecting a checkpoint but before freeing it left the revision in the
        ledger; the resumed sweep does not load it again, so it is freed here.
        """
        if self.keep or (self._start is None and not self._read_ledger()):  # nothing recorded: no cache scan
            return []
        self._ensure_start()
        lines = [self.after_collect(r) for r in dict.fromkeys(r or "main" for r in revisions) if r in self._ours]
        return [line for line in lines if line]
