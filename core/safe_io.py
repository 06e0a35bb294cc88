"""Every file the toolkit writes goes through here: atomic writes and strict-JSON values.

A reader (a resumed run, a browser, another process) must only ever see a file's old or new
content, never half of it, so writes go to a uniquely named temporary file in the same folder,
are flushed to disk and renamed into place. JSON output is strict (no NaN): non-finite floats
become ``null``, and arrays, tensors, dataclasses and tables become plain values in one place.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
from dataclasses import fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

TMP_SUFFIX = ".tmp"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name_prefix(path: Path) -> str:
    """The prefix of the temporary files :func:`atomic_write_bytes` makes for ``path`` (for clean-up)."""
    return f".{Path(path).name}."


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` so that ``path`` holds either its old or its new content, never a mix.

    The temporary file has a unique name, so two processes writing the same path never
    clobber each other's half-written file. ``durable`` fsyncs the file and its folder, so
    the content survives a power loss once this returns (the cache's commit point needs it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, durable: bool = True, indent: int | None = 1) -> Path:
    """``obj`` as strict JSON (see :func:`to_jsonable`), written atomically."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


ArraySink = Callable[[tuple[str, ...], np.ndarray], Any]
"""Takes ``(path, array)`` and returns what JSON holds in the array's place, or None to keep it inline."""


@lru_cache(maxsize=None)
def _takes_sink(cls: type) -> bool:
    """Whether ``cls.to_dict`` accepts ``sink`` and ``path`` (result dataclasses do, pandas tables do not)."""
    try:
        return "sink" in inspect.signature(cls.to_dict).parameters
    except (TypeError, ValueError):
        return False


def to_jsonable(obj: Any, *, digits: int | None = None, strict: bool = True, sink: ArraySink | None = None,
                path: tuple[str, ...] = ()) -> Any:
    """Recursively turn arrays, tensors, numpy scalars, dataclasses and tables into JSON values.

    Non-finite floats become ``None``. ``digits`` rounds floats (for logs a person reads).
    Objects with no JSON form raise ``TypeError``, or become ``str(obj)`` with ``strict=False``.
    ``sink`` (``core.array_files``) is offered every array with its path of keys below ``path``; what
    it returns stands in the array's place, so big arrays can go to a binary file beside the JSON.
    """
    offload = sink is not None

    def conv(o: Any, p: tuple[str, ...] = path) -> Any:
        if o is None or isinstance(o, (bool, str)):
            return o
        if isinstance(o, np.bool_):
            return bool(o)
        if isinstance(o, (int, np.integer)):
            return int(o)
        if isinstance(o, (float, np.floating)):
            f = float(o)
            if not math.isfinite(f):
                return None
            return round(f, digits) if digits is not None else f
        if isinstance(o, np.ndarray):
            if offload and (ref := sink(p, o)) is not None:
                return ref
            return conv(o.tolist(), p)
        if type(o).__module__.startswith("torch") and hasattr(o, "detach"):  # a tensor, without importing torch
            return conv(o.detach().cpu().numpy(), p)
        if isinstance(o, Path):
            return str(o)
        if callable(getattr(o, "to_dict", None)) and (is_dataclass(o) or hasattr(o, "columns") or hasattr(o, "index")):
            if offload and _takes_sink(type(o)):
                return conv(o.to_dict(sink=sink, path=p), p)
            return conv(o.to_dict(), p)  # result dataclasses, pandas tables and series
        if is_dataclass(o) and not isinstance(o, type):
            return {f.name: conv(getattr(o, f.name), (*p, f.name) if offload else p) for f in fields(o)}
        if isinstance(o, dict):
            return {str(k): conv(v, (*p, str(k)) if offload else p) for k, v in o.items()}
        if isinstance(o, (list, tuple, set)):
            return [conv(v, (*p, str(i)) if offload else p) for i, v in enumerate(o)]
        if not strict:
            return str(o)
        raise TypeError(f"cannot convert {type(o).__name__} to JSON")

    return conv(obj)
