"""Open a Hub name or a local folder as a transformers model and tokenizer, failing in one readable line."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Placement:
    """How accelerate spreads a model over devices: a ``device_map`` ("auto", "balanced", "sequential" or
    ``{module: device}``), a ``max_memory`` per device (``{0: "70GiB", "cpu": "200GiB"}``), and the
    folder for weights offloaded to disk."""

    device_map: str | dict[str, Any] = "auto"
    max_memory: dict[Any, str] | None = None
    offload_folder: str | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory:
            out["max_memory"] = dict(self.max_memory)
        if self.offload_folder:
            out["offload_folder"] = self.offload_folder
        return out


def parse_max_memory(text: str | dict | None) -> dict[Any, str] | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}`` (GPU indices as ints)."""
    if text is None or isinstance(text, dict):
        return text
    out: dict[Any, str] = {}
    for part in str(text).split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key.strip() or not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", value.strip(), re.I):
            raise ValueError(f"max_memory must look like 0=70GiB,1=70GiB,cpu=200GiB, not {text!r}")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed the model over several devices (or offloaded it): then it must not be moved."""
    return bool(getattr(model, "hf_device_map", None))


def input_device(model: nn.Module) -> torch.device:
    """Where a forward's inputs go: the input embedding's execution device (accelerate's hook), else the first real weight's."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    hook = getattr(emb, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    weight = getattr(emb, "weight", None)  # the usual answer, without walking every parameter (once per traced batch)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def has_accelerate_hooks(module: nn.Module) -> bool:
    """Whether accelerate's dispatch hooked the module or a submodule (its weights may be offloaded)."""
    return any(hasattr(m, "_hf_hook") for m in module.modules())


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """The module with its weights readable, also where accelerate offloaded them (to the CPU or disk).

    Offloaded weights sit on the meta device between forwards; inside this context each offloaded
    submodule holds its real weights. Read (and copy) them inside; elsewhere nothing changes.
    """
    if not has_accelerate_hooks(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if hasattr(m, "_hf_hook"):
                stack.enter_context(align_module_device(m))
        yield module


@contextlib.contextmanager
def lean_loading() -> Iterator[None]:
    """Load weights into the model one tensor at a time, at the target dtype, with no second copy in memory.

    transformers 5 memory-maps each safetensors file and reads tensors ahead on four threads:
    the mapped file's pages count as resident (and stay mapped while any weight is a view of
    them), and the tensors read ahead wait in memory. OLMoE's shape at 4 layers in bf16 (3.6 GB of
    weights) then peaked at 7.4 GB, 6.9 GB still resident after loading. Read with ``pread`` and
    converted one tensor at a time, it peaks at 1.14 times the weights above the interpreter.
    """
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if original is None:  # another transformers: load its own way rather than fail
        yield
        return

    def safe_open(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("backend") == "mmap":
            kwargs["backend"] = "pread"
        return original(*args, **kwargs)

    saved = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    modeling_utils.safe_open = safe_open
    try:
        with big_blocks_freed_to_system():  # each tensor read and cast is freed back to the system, not kept in the heap
            yield
    finally:
        modeling_utils.safe_open = original
        if saved is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = saved


@contextlib.contextmanager
def big_blocks_freed_to_system() -> Iterator[None]:
    """Meanwhile every block of 1 MB and more is its own mapping, given back to the system when freed (glibc).

    glibc otherwise raises its threshold to the largest block freed so far (up to 32 MB), and
    tensors of a few MB then fragment the heap: writing 16 layers of 15 MB kept 7 MB per layer.
    """
    _mmap_threshold(1 << 20)
    try:
        yield
    finally:
        _mmap_threshold(32 << 20)  # where glibc's own adaptive threshold ends up (its maximum on 64-bit)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """The C library, opened once: ``find_library`` runs ``ldconfig`` each time (3 ms; ablation trims once a pass)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _mmap_threshold(nbytes: int) -> bool:
    """glibc: allocations of ``nbytes`` and more get their own mapping, returned to the system when freed."""
    try:
        return bool(_libc().mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def resident_weight_bytes(model: Any) -> int:
    """Bytes a model's parameters hold in memory: none on the meta device (a model on NDIF), 0 for no model."""
    if not isinstance(model, nn.Module):
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


# Where freeing memory at once pays: a full garbage collection after a checkpoint (0.1-0.3 s once torch and
# transformers are imported) and a trim after every loss forward (ablation and pruning run hundreds) matter when the
# model and its activations are big; for a small model a trim cost more than its forward's page faults (1.5 ms of 4)
BIG_MODEL_BYTES = 64 << 20


def is_big_model(model: Any) -> bool:
    """Whether ``model``'s resident weights reach :data:`BIG_MODEL_BYTES` (None, or a model on NDIF: no)."""
    return resident_weight_bytes(model) >= BIG_MODEL_BYTES


def release_freed_memory() -> bool:
    """Hand memory the allocator keeps after loading back to the system (glibc only; elsewhere a no-op).

    Loading OLMoE's shape in bf16 and casting to float32 left 5.5 GB of freed buffers in glibc's
    heap (13.5 GB resident for a 7.5 GB model at 4 layers, 8.0 GB after the trim).
    """
    try:
        return bool(_libc().malloc_trim(0))
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


def load_hf(name: str, revision: str | None, dtype: Any, device: str, trust_remote_code: bool,
            placement: Placement | None = None) -> tuple[nn.Module, Any]:
    """Load model and tokenizer ourselves so a failure becomes one readable line.

    ``placement`` spreads a model too big for one device over several (accelerate's dispatch
    through transformers); the model is then never moved as a whole.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if placement is not None:
        kwargs.update(placement.kwargs())
    if str(device).startswith("cpu"):
        kwargs["experts_implementation"] = "eager"  # grouped_mm is unreliable on CPU float32
    where = f"revision '{revision}' of " if revision else ""
    lean = str(device).startswith("cpu") and placement is None
    try:
        try:
            with lean_loading() if lean else contextlib.nullcontext():
                model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (ValueError, TypeError) as e:
            if "experts_implementation" not in str(e):
                raise
            kwargs.pop("experts_implementation")
            with lean_loading() if lean else contextlib.nullcontext():
                model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met something other than tensors: never unpickled
        raise ModelLoadError(f"refused to open {where}model '{name}': its pickled weights (*.bin) hold objects other than "
                             "tensors, and unpickling them could run any code; use a safetensors copy from a source you trust") from None
    except (OSError, ValueError) as e:
        local = Path(name).expanduser()
        if local.exists():
            hint = (" (the toolkit's own model type: import core.study_moe.model first, as the main run does)"
                    if "study_moe" in str(e) else "")
            raise ModelLoadError(f"could not open {where}model '{name}' from disk: {str(e).splitlines()[0]}{hint}") from None
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
    model = model.eval() if is_dispatched(model) else model.to(device).eval()
    release_freed_memory()
    return model, tokenizer
