"""The cache's on-disk format: what a shard holds, how a manifest describes it, and its errors.

Layout of a cache directory::

    manifest.json                 what was collected, how, and the list of committed shards
    shard-00000.safetensors       one group of whole batches (rows), token-major tensors
    shard-00001.safetensors ...

The manifest carries its own SHA-256 (``sha256``, over the rest of it with keys sorted), checked
whenever it is read, and names only files of its own folder: it is the record of which files are
the cache's (``core.owned_files``), so a manifest edited by hand is refused, never followed.
``pending_shard`` names the shard being written before its bytes reach the disk, so a writer
stopped mid-write leaves nothing it cannot later identify as its own.

Storage modes (``settings.storage``):

* ``"full"``    router logits ``[n, L, E]`` + selected experts ``[n, L, k]`` + their weights.
* ``"compact"`` selected experts and weights only (no logits): about ``E / (2k)`` times
  smaller for long runs; analyses that need probabilities over all experts cannot use it.

Float tensors are stored in ``settings.dtype`` (float16 by default, bfloat16/float32 allowed);
expert indices as int16 when ``E < 32768``; per-token ids as int32 when they fit, else int64;
optional hidden states (``hidden.<layer>`` ``[n, H]``) in the float dtype.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from core.routing_data import TOKEN_FIELDS, RoutingData
from core.safe_io import to_jsonable

FORMAT_VERSION = 2  # 2: one-byte expert ids (E <= 255) and the smallest integer type for token metadata
MANIFEST_NAME = "manifest.json"
MANIFEST_DIGEST = "sha256"  # the manifest's checksum of itself
PENDING = "pending_shard"  # the shard file a writer is about to write (its record before the bytes exist)
STORAGE_MODES = ("full", "compact")
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Keys of the manifest that say *what* was collected; a resume must match all of them.
IDENTITY_KEYS = (
    "format_version",
    "model_name",
    "revision",
    "model_identity",
    "dataset",
    "settings",
    "moe_layers",
    "num_experts",
    "top_k",
    "domain_names",
    "dataset_names",
    "num_rows",
    "data_fingerprint",
)
_META_FIELDS = ("token_ids", "doc_ids", "positions", "domain_ids", "dataset_ids")


class CacheError(RuntimeError):
    """A routing cache cannot be used as asked."""


class CacheMismatchError(CacheError):
    """The cache on disk was collected with a different model, revision, data or settings."""


class CacheCorruptError(CacheError):
    """A shard is missing, truncated or fails its checksum."""


class CacheIncompleteError(CacheError):
    """The collection run that writes this cache has not finished."""


# ---------------------------------------------------------------------------- small helpers
def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def shard_temp_name(file: str) -> str:
    """The temporary file a writer writes ``file`` through: named by the record, so a stopped write is known as its own."""
    return f".{file}.tmp"


def manifest_digest(manifest: dict) -> str:
    """The SHA-256 a manifest carries of itself (every field but the checksum, keys sorted)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(to_jsonable(body), sort_keys=True, allow_nan=False).encode()).hexdigest()


def sealed_manifest(manifest: dict) -> dict:
    """The manifest as written to disk: with its checksum."""
    return {**manifest, MANIFEST_DIGEST: manifest_digest(manifest)}


def is_own_file(name: Any) -> bool:
    """Whether a manifest entry names a file of the cache's own folder (a plain name, no path)."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") \
        and not name.startswith(".")


def read_manifest(cache_dir: Path) -> dict | None:
    """The manifest of ``cache_dir`` (without its checksum), or None when there is none; a damaged or edited one is an error.

    Manifests written before manifests carried a checksum are read as they are; their entries are
    still refused unless each names a file of the folder.
    """
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheCorruptError(f"manifest {path} is not valid JSON ({e}); delete the folder {cache_dir} and collect "
                                "again") from None
    if not isinstance(manifest, dict):
        raise CacheCorruptError(f"manifest {path} is not a JSON object; delete the folder {cache_dir} and collect again")
    stored = manifest.pop(MANIFEST_DIGEST, None)
    if stored is not None and stored != manifest_digest(manifest):
        raise CacheCorruptError(f"manifest {path} fails its checksum (edited or damaged since it was written); delete the "
                                f"folder {cache_dir} and collect again")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CacheError(f"cache at {cache_dir} has format version {version!r}; this toolkit reads up to {FORMAT_VERSION}")
    shards = manifest.get("shards", [])
    names = [s.get("file") if isinstance(s, dict) else s for s in shards] if isinstance(shards, list) else [shards]
    bad = [n for n in names + ([manifest[PENDING]] if manifest.get(PENDING) is not None else []) if not is_own_file(n)]
    if bad:
        raise CacheCorruptError(f"manifest {path} names {str(bad[0])[:80]!r}, which is not a file of its folder (edited by "
                                f"hand?); refused: delete the folder {cache_dir} and collect again")
    return manifest


def check_manifest_numbers(manifest: dict, cache_dir: Path) -> None:
    """A manifest's own totals must add up from its shard entries; an edited or damaged one is refused.

    The shards are checksummed, the manifest is not: so the totals the report quotes are checked
    against the per-shard entries here, and each entry against its shard when it is read.
    """
    try:
        shards = manifest["shards"]
        rows = sum(int(s["num_rows"]) for s in shards)
        tokens = sum(int(s["num_tokens"]) for s in shards)
        starts = [int(s["first_row"]) for s in shards]
        bad = []
        if int(manifest["total_tokens"]) != tokens:
            bad.append(f"total_tokens {manifest['total_tokens']} but its shards hold {tokens}")
        if int(manifest["rows_done"]) != rows:
            bad.append(f"rows_done {manifest['rows_done']} but its shards hold {rows} rows")
        if starts != [0, *itertools.accumulate(int(s["num_rows"]) for s in shards)][: len(shards)]:
            bad.append("its shards do not follow each other row by row")
        if manifest.get("complete") and rows != int(manifest["num_rows"]):
            bad.append(f"marked complete with {rows} of {manifest['num_rows']} rows")
    except (KeyError, TypeError, ValueError) as e:
        bad = [f"a field is missing or malformed ({e})"]
    if bad:
        raise CacheCorruptError(f"manifest of {cache_dir} does not add up: {'; '.join(bad)}; collect it again with "
                                "--recollect (force=True from Python)")


def describe_differences(have: Any, want: Any, prefix: str) -> list[str]:
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for key in sorted(set(have) | set(want), key=str):
            out += describe_differences(have.get(key), want.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if have != want:
        if prefix == "data_fingerprint":
            return ["data_fingerprint: the tokenized data (ids, mask or labels) differs from the cached run's"]
        return [f"{prefix}: cache has {have!r}, you asked for {want!r}"]
    return []


def identity_differences(manifest: dict, header: dict) -> list[str]:
    """Human-readable list of identity keys where an existing manifest and a new request differ."""
    out: list[str] = []
    for key in IDENTITY_KEYS:
        out += describe_differences(manifest.get(key), header.get(key), key)
    return out


NO_EXPERT_U8 = 255  # a slot that selected nothing, in one-byte expert ids


def _int_tensor(t: torch.Tensor) -> torch.Tensor:
    """Token metadata in the smallest signed integer type that holds it (positions fit int16, labels int8)."""
    t = t.detach().cpu()
    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    for dtype, bits in ((torch.int8, 8), (torch.int16, 16), (torch.int32, 32)):
        if -(2 ** (bits - 1)) <= lo and hi < 2 ** (bits - 1):
            return t.to(dtype).contiguous()
    return t.to(torch.int64).contiguous()


def _encode_idx(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids in one byte where E <= 255 (255 marks no selection), else int16 or int32."""
    idx = idx.detach().cpu()
    if num_experts <= NO_EXPERT_U8:
        return torch.where(idx < 0, NO_EXPERT_U8, idx).to(torch.uint8).contiguous()
    return idx.to(torch.int16 if num_experts < 2**15 else torch.int32).contiguous()


def _decode_idx(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:
        out = t.long()
        return out.masked_fill(out == NO_EXPERT_U8, -1)
    return t.long()


# ---------------------------------------------------------------------------- encode/decode
def bytes_per_token(settings: dict, layers: int, experts: int, top_k: int, hidden_size: int = 0) -> int:
    """What one token costs in a shard, as :func:`encode_shard` stores it (ids at their widest): for free-space checks."""
    f = torch.empty(0, dtype=FLOAT_DTYPES[settings["dtype"]]).element_size()
    idx = 1 if experts <= 255 else 2 if experts < 32768 else 8
    logits = layers * experts * f if settings["storage"] == "full" else 0
    return logits + layers * top_k * (idx + f) + len(_META_FIELDS) * 8 + len(settings.get("hidden_layers", [])) * hidden_size * f


def check_free_space(cache_root: str | os.PathLike, need: int, margin: float = 1.1) -> None:
    """Refuse caches that cannot fit the disk they go to (their estimate plus 10%)."""
    if need <= 0:
        return
    root = Path(cache_root)
    probe = next((p for p in (root, *root.parents) if p.exists()), root)
    free = shutil.disk_usage(probe).free
    if need * margin > free:
        raise CacheError(f"the routing caches still to collect need about {need / 1e9:.2f} GB, and {probe} has "
                         f"{free / 1e9:.2f} GB free; free space, give another --results-dir, or collect fewer tokens "
                         "(--max-tokens)")


def encode_shard(data: RoutingData, settings: dict) -> dict[str, torch.Tensor]:
    """Turn a RoutingData into the named tensors of one shard, in the cache's storage form."""
    storage, fdtype = settings["storage"], FLOAT_DTYPES[settings["dtype"]]
    if data.topk_idx is None or data.topk_weight is None:
        raise CacheError("routing to cache has no selected experts (topk_idx/topk_weight); the wrapper must fill them")
    out: dict[str, torch.Tensor] = {}
    if storage == "full":
        if data.router_logits is None:
            raise CacheError("storage='full' needs router logits, but this routing has none; use storage='compact'")
        out["router_logits"] = data.router_logits.detach().cpu().to(fdtype).contiguous()
    out["topk_idx"] = _encode_idx(data.topk_idx, data.num_experts)
    out["topk_weight"] = data.topk_weight.detach().cpu().to(fdtype).contiguous()
    for name in _META_FIELDS:
        t = getattr(data, name)
        if t is not None:
            out[name] = _int_tensor(t)
    for layer in settings.get("hidden_layers", []):
        if layer not in data.hidden:
            raise CacheError(f"hidden state of layer {layer} was asked for but the traced routing lacks it")
        out[f"hidden.{layer}"] = data.hidden[layer].detach().cpu().to(fdtype).contiguous()
    n = data.num_tokens
    for name, t in out.items():
        if t.shape[0] != n:
            raise CacheError(f"field {name} has {t.shape[0]} tokens but the routing has {n}; the parts do not line up")
    return out


def decode_shard(tensors: dict[str, torch.Tensor], manifest: dict, dtype: torch.dtype | None) -> RoutingData:
    """Rebuild a RoutingData from a shard's tensors: indices as long, floats as ``dtype``."""
    kw: dict[str, Any] = {}
    for name in TOKEN_FIELDS:
        t = tensors.get(name)
        if t is None:
            continue
        if t.is_floating_point():
            kw[name] = t if dtype is None else t.to(dtype)
        else:
            kw[name] = _decode_idx(t) if name == "topk_idx" else t.long()
    hidden = {}
    for key, t in tensors.items():
        if key.startswith("hidden."):
            hidden[int(key.split(".", 1)[1])] = t if dtype is None else t.to(dtype)
    return RoutingData(
        moe_layers=list(manifest["moe_layers"]),
        num_experts=int(manifest["num_experts"]),
        top_k=int(manifest["top_k"]),
        domain_names=list(manifest.get("domain_names", [])),
        dataset_names=list(manifest.get("dataset_names", [])),
        score_fn=manifest.get("score_fn") or "softmax",
        hidden=hidden,
        **kw,
    )


def check_storage(storage: str, dtype: str = "float16") -> None:
    """Refuse a storage mode or float dtype the cache cannot write (the one place this is checked)."""
    if storage not in STORAGE_MODES:
        raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(FLOAT_DTYPES)}, got {dtype!r}")


def validate_header(header: dict) -> None:
    """Refuse settings the cache cannot store, before any work is done."""
    settings = header.get("settings", {})
    check_storage(settings.get("storage"), settings.get("dtype"))
    missing = [k for k in IDENTITY_KEYS if k not in header and k != "format_version"]
    if missing:
        raise ValueError(f"cache header lacks {missing}")
