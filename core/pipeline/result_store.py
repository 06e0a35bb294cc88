"""Stored results of the analyses that declare reuse (the one pass's, forward passes, weights), so a rerun does not redo them.

A result is filed under a digest of its full identity (the spec's ``reuse_key``: model, tokens,
settings, upstream inputs, code version) in ``<cache root>/analysis_results/<analysis>/<key>/``:
``result.json`` (the tagged JSON of ``core.pipeline.result_codec``, the identity, the SHA-256 of the
array file and of itself) and ``arrays.safetensors``. A stored result is used only when both
checksums hold and its identity is the one asked for; anything else (damaged, edited, foreign,
another format) is recomputed, with one line on stderr. Each entry is a sealed folder of
``core.owned_files``: a new result replaces an old entry only when all of it is the toolkit's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from core.owned_files import OwnershipError, built_in_scratch, marked_json, WRITTEN_BY
from core.pipeline.result_codec import CodecError, decode, encode
from core.safe_io import atomic_write_bytes

STORE_FOLDER = "analysis_results"
RESULT_FILE, ARRAY_FILE = "result.json", "arrays.safetensors"
STORE_FORMAT = 1  # another layout of the stored files is another store


class StoredResultError(ValueError):
    """A stored result fails a check; the message says which."""


def reuse_digest(identity: dict[str, Any]) -> str:
    """The folder name of a result: a digest of its whole identity (the identity itself is stored beside it)."""
    text = json.dumps({"identity": identity, "format": STORE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _self_sha256(body: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in body.items() if k != "sha256"}, sort_keys=True,
                                     allow_nan=False).encode()).hexdigest()


def _canonical(identity: dict[str, Any]) -> Any:
    """The identity as a JSON reader will see it (tuples as lists), so stored and asked-for compare equal."""
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


class ResultStore:
    """The stored results under one cache root; :meth:`load` verifies, :meth:`save` writes a sealed entry."""

    def __init__(self, cache_root: str | os.PathLike) -> None:
        self.root = Path(cache_root) / STORE_FOLDER

    def entry(self, analysis: str, identity: dict[str, Any]) -> Path:
        return self.root / analysis / reuse_digest(identity)

    def load(self, analysis: str, identity: dict[str, Any], missing: Any = None) -> Any:
        """The stored result of this identity, or ``missing`` (none stored, or one that fails a check: said in one line).

        Pass a sentinel as ``missing`` where a stored result may itself be None."""
        folder = self.entry(analysis, identity)
        if not (folder / RESULT_FILE).exists() and not (folder / ARRAY_FILE).exists():
            return missing
        try:
            return self._read(folder, analysis, identity)
        except (StoredResultError, CodecError, OSError) as e:
            print(f"warning: stored {analysis} result {folder} is not used ({_first_line(e)}); recomputing",
                  file=sys.stderr)
            return missing

    def _read(self, folder: Path, analysis: str, identity: dict[str, Any]) -> Any:
        """The result in ``folder`` after every check: its marks, both checksums, its identity."""
        try:
            body = json.loads((folder / RESULT_FILE).read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise StoredResultError(f"{RESULT_FILE} is not JSON: {e}") from None
        if not isinstance(body, dict) or body.get("written_by") != WRITTEN_BY or body.get("format") != STORE_FORMAT:
            raise StoredResultError(f"{RESULT_FILE} was not written by this toolkit's result store")
        if body.get("sha256") != _self_sha256(body):
            raise StoredResultError(f"{RESULT_FILE} fails its checksum (damaged or edited)")
        if body.get("analysis") != analysis or body.get("identity") != _canonical(identity):
            raise StoredResultError("it is the result of other inputs")
        data = (folder / ARRAY_FILE).read_bytes()
        if hashlib.sha256(data).hexdigest() != body.get("arrays_sha256"):
            raise StoredResultError(f"{ARRAY_FILE} fails its checksum (damaged, edited or from another write)")
        from safetensors.numpy import load as load_arrays

        try:
            arrays = load_arrays(data)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own errors for a bad file
            raise StoredResultError(f"{ARRAY_FILE} cannot be read: {e}") from None
        return decode(body["value"], arrays)

    def save(self, analysis: str, identity: dict[str, Any], value: Any) -> Path | None:
        """Store ``value`` as the result of ``identity``; a result that cannot be stored is said in one line (the run goes on)."""
        dest = self.entry(analysis, identity)
        built = dest.parent / f".{dest.name}.building-{os.getpid()}"
        try:
            arrays: dict[str, np.ndarray] = {}
            doc = encode(value, arrays)
            data = _array_bytes(arrays)
            body = marked_json({"format": STORE_FORMAT, "analysis": analysis, "identity": _canonical(identity),
                                "arrays_sha256": hashlib.sha256(data).hexdigest(), "value": doc})
            body["sha256"] = _self_sha256(body)
            text = json.dumps(body, indent=1, allow_nan=False) + "\n"
            with built_in_scratch(dest, hint="remove it to store this result again", scratch=built):
                atomic_write_bytes(built / ARRAY_FILE, data)
                atomic_write_bytes(built / RESULT_FILE, text.encode("utf-8"))
            return dest
        except (CodecError, OwnershipError, OSError, ValueError) as e:
            print(f"warning: the {analysis} result is not stored for reuse ({_first_line(e)})", file=sys.stderr)
            return None


def _array_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(arrays)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
