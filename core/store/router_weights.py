"""Each checkpoint's router weights on disk, with a checksum: written once by the sweep, verified when read back."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.safe_io import atomic_write_bytes
from core.store.cache_format import CacheCorruptError


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_router_weights(path: str | os.PathLike, weights: Mapping[int, torch.Tensor]) -> None:
    """Each MoE layer's ``[E, H]`` router matrix, atomically, keyed by model layer index, with its SHA-256."""
    tensors = {str(k): v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_write_bytes(path, st_save(tensors, metadata={"sha256": _tensor_digest(tensors)}))


def load_router_weights(path: str | os.PathLike) -> dict[int, torch.Tensor]:
    """Router weights written by :func:`save_router_weights`; flipped or missing bytes are refused, like shards."""
    try:
        payload = Path(path).read_bytes()  # read once: the tensors and the header's digest come from these bytes
        tensors = st_load(payload)
        header = json.loads(payload[8:8 + int.from_bytes(payload[:8], "little")])
        stored = (header.get("__metadata__") or {}).get("sha256")
    except Exception as e:  # a truncated or foreign file
        raise CacheCorruptError(f"router weights {path} cannot be read ({e}); delete the file to collect it again") from e
    if stored != _tensor_digest(tensors):
        raise CacheCorruptError(f"router weights {path} fail their checksum (corrupted on disk, or written by older code); "
                                "delete the file to collect it again")
    return {int(k): v for k, v in tensors.items()}


def stored_router_weights(path: Path) -> dict[int, torch.Tensor] | None:
    """Router weights kept beside the caches, or None when missing or damaged (then they are read again from the model)."""
    try:
        return load_router_weights(path)
    except (CacheCorruptError, FileNotFoundError):
        return None
