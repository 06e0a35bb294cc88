"""Open a Hub name or a local folder as a transformers model and tokenizer, failing in one readable line."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn


class ModelLoadError(RuntimeError):
    """The model could not be opened (unreachable Hub, missing directory, bad name)."""


@contextlib.contextmanager
def quiet_nnterp() -> Iterator[None]:
    """nnterp logs a long traceback when its fake-tensor scan falls back to a real trace; hide it."""
    log = logging.getLogger("nnterp")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def drop_scan_hooks(model: nn.Module) -> int:
    """Remove the hooks nnsight's fake-tensor scan leaves behind when the scan fails part-way.

    nnterp scans every model once at load; when the scan raises (it does for transformers 5's
    grouped experts on CPU and falls back), nnsight never removes the hooks it registered on
    every module, and each later forward stores every module's input and output on its envoy:
    a whole forward's activations held in memory, and a cost on every call. Returns how many were removed.
    """
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__qualname__", "").startswith("ScanningTracer."):
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
                removed += 1
    return removed


def release_freed_memory() -> bool:
    """Hand memory the allocator keeps after loading back to the system (glibc only; elsewhere a no-op).

    Loading OLMoE's shape in bf16 and casting to float32 left 5.5 GB of freed buffers in glibc's
    heap (13.5 GB resident for a 7.5 GB model at 4 layers, 8.0 GB after the trim).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16, bfloat16 or auto") from None


def load_hf(name: str, revision: str | None, dtype: Any, device: str, trust_remote_code: bool) -> tuple[nn.Module, Any]:
    """Load model and tokenizer ourselves so a failure becomes one readable line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if str(device).startswith("cpu"):
        kwargs["experts_implementation"] = "eager"  # grouped_mm is unreliable on CPU float32
    where = f"revision '{revision}' of " if revision else ""
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (ValueError, TypeError) as e:
            if "experts_implementation" not in str(e):
                raise
            kwargs.pop("experts_implementation")
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        local = Path(name).expanduser()
        if local.exists():
            raise ModelLoadError(f"could not open {where}model '{name}' from disk: {str(e).splitlines()[0]}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "the Hub is set offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else str(e).splitlines()[0]
        raise ModelLoadError(
            f"could not fetch {where}model '{name}' from the Hugging Face Hub: {why}. "
            "Check the name and your network, or pass a local directory."
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    model = model.to(device).eval()
    release_freed_memory()
    return model, tokenizer
