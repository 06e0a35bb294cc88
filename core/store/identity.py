"""What makes two routing caches the same routing: one identity, computed in one place.

A cache is reused only when everything that changes what it holds is the same: the model (its
name and revision, and for weights on this machine a digest of the config and the weight files;
for an in-memory model a digest of its state dict), the dtype it runs in and the device type
(bf16 on a GPU does not route like fp32 on a CPU), the data and the collection settings. The
sweep computes a checkpoint's identity before loading it (to skip finished caches) and the
collector from the loaded wrapper (to refuse a resume into another model's cache): both go
through :func:`model_identity` (an in-memory model through :func:`in_memory_identity`), so the
two agree.

The store never touches a model: digesting an in-memory model's weights and reading a loaded
wrapper are the collection's (``core.collection.loaded_identity``), which hands the results here.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

VOLATILE_CONFIG_KEYS = ("transformers_version",)  # and every key starting with "_" (paths, commit hashes)
SETTLED_SECONDS = 2  # weight files modified longer ago are remembered by their stat (file times can be 1-2 s coarse)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_digest(config: dict) -> str:
    """A config's digest without the keys that change with where or by which version it was saved."""
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}
    return _sha(kept)[:16]


def weights_digest(folder: str | os.PathLike, whole_file_limit: int = 256 << 20) -> str:
    """A short digest of a local model's weight files (whole files up to 256 MB, else their size, head and tail).

    Read once per process while the files stay as they were (the same names, sizes, modification times and
    inodes): the run, the sweep and the collector each ask for it. Files modified in the last
    ``SETTLED_SECONDS`` are read every time, as a rewrite that soon can keep the same modification time.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {folder}")
    now = time.time_ns()
    stats = [f.stat() for f in files]
    signature = tuple((f.name, st.st_size, st.st_mtime_ns, st.st_ino) for f, st in zip(files, stats))
    if now - max(st.st_mtime_ns for st in stats) < SETTLED_SECONDS * 1_000_000_000:
        return _hash_weight_files(str(folder.resolve()), signature, whole_file_limit)
    return _settled_weights_digest(str(folder.resolve()), signature, whole_file_limit)


@functools.lru_cache(maxsize=64)
def _settled_weights_digest(folder: str, signature: tuple, whole_file_limit: int) -> str:
    """:func:`_hash_weight_files` remembered by the files' signature, so one process reads a model's weights once."""
    return _hash_weight_files(folder, signature, whole_file_limit)


def _hash_weight_files(folder: str, signature: tuple, whole_file_limit: int) -> str:
    """The digest itself, of the files named in ``signature`` (name, size, ...): read here and nowhere else."""
    h = hashlib.sha256()
    for name, size, *_ in signature:
        h.update(f"{name}:{size}".encode())
        with open(Path(folder) / name, "rb") as fh:
            if size <= whole_file_limit:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                part = min(16 << 20, whole_file_limit)
                h.update(fh.read(part))
                fh.seek(max(size - part, part))
                h.update(fh.read())
    return h.hexdigest()[:12]


def _dtype_name(dtype: Any) -> str:
    if dtype in (None, "auto"):
        return "as saved"
    name = str(dtype).replace("torch.", "")
    return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(name, name)


def runtime_identity(dtype: Any = None, device: str = "cpu") -> dict[str, Any]:
    """How a model runs, as far as routing is concerned: the dtype asked for and the device type (not its index)."""
    return {"dtype": _dtype_name(dtype), "device_type": torch.device(str(device)).type}


def model_identity(source: str | os.PathLike, revision: str | None = None, dtype: Any = None,
                   device: str = "cpu") -> dict[str, Any]:
    """The identity of a model as it will run: where its weights come from, and the dtype and device type.

    ``source`` is a folder of weights on this machine or a Hub name; a model built in memory
    has :func:`in_memory_identity` instead.
    """
    out = runtime_identity(dtype, device)
    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        config_file = folder / "config.json"
        config = config_digest(json.loads(config_file.read_text())) if config_file.is_file() else None
        out.update(kind="local", weights=weights_digest(folder), config=config)
        return out
    out.update(kind="hub", name=str(source), revision=revision or "main")
    return out


def in_memory_identity(model_class: str, weights: str, config: dict | None, dtype: Any = None,
                       device: str = "cpu") -> dict[str, Any]:
    """The identity of a model built in memory: its class name, the digest of its weights, its config (a dict, or None)."""
    out = runtime_identity(dtype, device)
    out.update(kind="in-memory", model_class=model_class, weights=weights,
               config=config_digest(config) if config is not None else None)
    return out


def checkpoint_identity(model_source: str, checkpoint: Any, dtype: Any = None, device: str = "cpu") -> dict[str, Any]:
    """The identity of a model at one checkpoint, before loading it: its folder, or its Hub name and revision."""
    if getattr(checkpoint, "path", None):
        return model_identity(checkpoint.path, None, dtype, device)
    return model_identity(model_source, getattr(checkpoint, "revision", None), dtype, device)


def identity_key(model: dict[str, Any], data_fingerprint: str, settings: dict[str, Any], dataset: str) -> str:
    """A short name for one cache's full identity: the folder it lives in."""
    from core.store.cache_format import FORMAT_VERSION  # another cache format is another cache

    return _sha({"model": model, "data": data_fingerprint, "settings": settings, "dataset": dataset,
                 "format": FORMAT_VERSION})[:12]
