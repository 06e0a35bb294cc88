"""Every file the toolkit writes goes through here: atomic writes and strict-JSON values.

A reader (a resumed run, a browser, another process) must only ever see a file's old or new
content, never half of it, so writes go to a uniquely named temporary file in the same folder,
are flushed to disk and renamed into place. The file gets the permissions any new file gets under
the process's umask (``0666 & ~umask``), as ``open`` would give it: a temporary file's own 0600 would
make a shared results folder unreadable to collaborators. A failed write (a full disk) removes its
temporary file and names the file it was writing. JSON output is strict (no NaN): non-finite floats
become ``null``, and arrays, tensors, dataclasses and tables become plain values in one place.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    """The prefix of the temporary files :func:`atomic_write_bytes` makes for ``path``."""
    return f".{Path(path).name}."


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (changing it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_temp(path: Path, temp: str | None) -> tuple[int, str]:
    """A new temporary file beside ``path`` (a unique name, or the caller's ``temp`` name), with the umask's permissions."""
    if temp is not None:
        tmp = str(path.parent / temp)
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
    fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def _write_all(fh: Any, data: bytes, path: Path) -> None:
    """Write ``data`` for ``path`` to its open temporary file (one place, so a test can make the disk full here)."""
    fh.write(data)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True, temp: str | None = None) -> Path:
    """Write ``data`` so that ``path`` holds either its old or its new content, never a mix.

    The temporary file has a unique name, so two processes writing the same path never
    clobber each other's half-written file; ``temp`` names it instead, for a writer that holds
    the folder alone and records that name first (a routing cache, so a stopped write is its
    own to clear). ``durable`` fsyncs the file and its folder, so the content survives a power
    loss once this returns (the cache's commit point needs it). On failure the temporary file
    is removed and an ``OSError`` names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp(path, temp)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_all(fh, data, path)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)  # the temporary file this call made: the one removal outside core.owned_files
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


@contextmanager
def atomic_files_for(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Temporary files for a writer outside the toolkit that is handed file names (a renderer), one beside each path.

    Each is made here with a unique name (never a file that was already there) and the umask's
    permissions; when the block ends they are renamed onto ``paths``, and if it fails they are
    removed: only this call's own files, so nothing found by a name is ever deleted.
    """
    paths = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _open_temp(path, None)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)  # this call's own temporary files (those already renamed are gone)
        raise


def probe_writable(folder: str | os.PathLike) -> None:
    """Raise the ``OSError`` a write into ``folder`` would meet (read-only, no permission), before any work needs it."""
    folder = Path(folder)
    fd, tmp = _open_temp(folder / "write-probe", None)
    os.close(fd)
    Path(tmp).unlink()


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


def _plain_list(a: np.ndarray) -> Any:
    """A bool, integer or float array as nested lists of Python values, non-finite floats as None: what converting
    each element of ``a.tolist()`` gives, without a Python call per element (arrays of millions of numbers)."""
    if a.dtype.kind != "f":
        return a.tolist()
    bad = ~np.isfinite(a)
    if not bad.any():
        return a.tolist()
    values = a.astype(object)
    values[bad] = None
    return values.tolist()


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
            if o.dtype.kind in "biu" or (o.dtype.kind == "f" and digits is None):
                return _plain_list(o)
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
            if not offload and digits is None:  # a row of plain numbers (a wide model's tables have thousands)
                kinds = set(map(type, o))
                if kinds <= {int, str}:
                    return list(o)
                if kinds <= {int, float}:
                    return [v if type(v) is int or math.isfinite(v) else None for v in o]
            return [conv(v, (*p, str(i)) if offload else p) for i, v in enumerate(o)]
        if not strict:
            return str(o)
        raise TypeError(f"cannot convert {type(o).__name__} to JSON")

    return conv(obj)
