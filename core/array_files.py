"""metrics.json keeps scalars and small per-layer values; its big arrays go to one ``arrays.safetensors`` beside it.

At OLMoE's shape (16 layers x 64 experts) the cross-layer correlation matrices alone are 1024 x 1024
each, and as JSON lists they made metrics.json 200 MB and 25 s to write. Here every array with two
or more dimensions, or one dimension longer than :data:`INLINE_MAX`, is written to the array file
under its JSON path joined with ``/`` (``correlation_topk/corr``), and metrics.json holds a small
reference in its place; the sections a person quotes (options, headline, findings, warnings) stay
whole in the JSON. The rule is the same at every model size, so a reader's code does not
depend on the shape. :func:`load_metrics` gives back the whole dict with numpy arrays in place of
the references; :func:`load_array` reads one array without the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from core.safe_io import atomic_write_bytes, to_jsonable

ARRAY_FILE = "arrays.safetensors"
METRICS_FILE = "metrics.json"
INDEX_KEY = "arrays"  # metrics.json's top-level entry saying where the arrays are
INLINE_MAX = 256  # a 1-D array up to this long stays in the JSON (per-layer values read well there)
INLINE_SECTIONS = ("options", "headline", "findings", "warnings")  # what a person quotes stays whole in the JSON
REF_FIELDS = frozenset({"array_file", "key", "shape", "dtype"})
SUPPORTED = frozenset({"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                       "float16", "float32", "float64"})  # what safetensors stores; anything else stays in the JSON
HOW_TO_LOAD = (f"Arrays with 2 or more dimensions or longer than {INLINE_MAX} (outside {', '.join(INLINE_SECTIONS)}) "
               f"are in {ARRAY_FILE} beside this file; "
               "core.array_files.load_metrics(<this file or its folder>) returns this dict with them in place.")


class ArrayFileError(ValueError):
    """The array file is missing, unreadable, from another write, or lacks an array metrics.json refers to."""


class ArrayCollector:
    """The ``sink`` of :func:`core.safe_io.to_jsonable`: takes the arrays the rule sends to the file, returns their references."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self._hash = hashlib.blake2b(digest_size=16)

    def __call__(self, path: tuple[str, ...], array: np.ndarray) -> dict | None:
        if array.ndim == 0 or (array.ndim == 1 and array.size <= INLINE_MAX) or array.dtype.name not in SUPPORTED:
            return None
        key = base = "/".join(path)
        n = 1
        while key in self.arrays:  # two paths that join to the same text (a name with "/" in it)
            n += 1
            key = f"{base}#{n}"
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))  # safetensors copies raw memory
        self.arrays[key] = array
        for part in (key, array.dtype.name, repr(array.shape)):
            self._hash.update(part.encode() + b"\0")
        self._hash.update(memoryview(array.reshape(-1)).cast("B") if array.size else b"")
        return {"array_file": ARRAY_FILE, "key": key, "shape": list(array.shape), "dtype": array.dtype.name}

    @property
    def digest(self) -> str:
        """Names this set of arrays: metrics.json and the array file carry it, so a mismatched pair is found."""
        return self._hash.hexdigest()

    def file_bytes(self) -> bytes:
        from safetensors.numpy import save

        return save(self.arrays, metadata={"digest": self.digest})


def write_metrics(path: str | os.PathLike, metrics: Any, *, durable: bool = False) -> Path:
    """Write ``metrics`` as metrics.json (``path``: the file or its folder) and its big arrays as ``arrays.safetensors``.

    Both are encoded first and then written atomically, the array file first: a failure while
    encoding leaves both old files as they were, and the digest in each says which belong together.
    The JSON equals :func:`core.safe_io.atomic_write_json`'s but for the references and :data:`INDEX_KEY`.
    """
    path = _metrics_path(path)
    sink = ArrayCollector()
    if not isinstance(metrics, dict) or INDEX_KEY in metrics:
        raise ValueError(f"metrics must be a dict without a {INDEX_KEY!r} entry")
    body = {k: to_jsonable(v) if k in INLINE_SECTIONS else to_jsonable(v, sink=sink, path=(str(k),))
            for k, v in metrics.items()}
    index = {"file": ARRAY_FILE, "count": len(sink.arrays), "digest": sink.digest, "how_to_load": HOW_TO_LOAD}
    text = json.dumps({INDEX_KEY: index, **body}, indent=1, allow_nan=False) + "\n"
    data = sink.file_bytes()
    atomic_write_bytes(path.parent / ARRAY_FILE, data, durable=durable)
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def load_metrics(path: str | os.PathLike) -> dict:
    """metrics.json (``path``: the file or its run folder) with every array reference replaced by its numpy array.

    Raises :class:`ArrayFileError` (one line naming the file and key) where an array cannot be had.
    """
    path = _metrics_path(path)
    body = json.loads(path.read_text())
    index = body.pop(INDEX_KEY, None) if isinstance(body, dict) else None
    refs = list(_references(body))
    if not refs:
        return body
    file = path.parent / refs[0][2]["array_file"]
    with _open(file) as f:
        if isinstance(index, dict) and index.get("digest") != (f.metadata() or {}).get("digest"):
            raise ArrayFileError(f"{file} does not belong to {path} (their digests differ: one of the two is from "
                                 "another write, or a write stopped between them); run the analysis again")
        keys = set(f.keys())
        for parent, name, ref in refs:
            parent[name] = _read(f, file, keys, ref)
    return body


def load_array(run_dir: str | os.PathLike, key: str) -> np.ndarray:
    """One array of a run (``run_dir``: its folder or its metrics.json) by key, without reading the others."""
    file = _metrics_path(run_dir).parent / ARRAY_FILE
    with _open(file) as f:
        return _read(f, file, set(f.keys()), {"key": key})


def is_reference(value: Any) -> bool:
    """Whether a metrics.json value stands for an array in the array file."""
    return isinstance(value, dict) and value.keys() == REF_FIELDS


def _metrics_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / METRICS_FILE if path.is_dir() or not path.suffix else path


def _references(obj: Any) -> Iterator[tuple[Any, Any, dict]]:
    """``(container, key or index, reference)`` of every reference in a loaded metrics.json."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for name, value in items:
        if is_reference(value):
            yield obj, name, value
        else:
            yield from _references(value)


@contextmanager
def _open(file: Path) -> Iterator[Any]:
    """``safe_open`` of the array file, a missing or corrupt file being one :class:`ArrayFileError` line."""
    from safetensors import safe_open

    if not file.is_file():
        raise ArrayFileError(f"{file}: no such array file (metrics.json refers to arrays in it)")
    try:
        handle = safe_open(str(file), framework="np")
    except Exception as e:  # safetensors' own error type is not importable on every version
        raise ArrayFileError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None
    with handle as f:
        yield f


def _read(f: Any, file: Path, keys: set[str], ref: dict) -> np.ndarray:
    key = ref["key"]
    if key not in keys:
        raise ArrayFileError(f"{file}: no array {key!r} in it (the file is from another run, or was replaced)")
    try:
        array = f.get_tensor(key)
    except Exception as e:
        raise ArrayFileError(f"{file}: array {key!r} cannot be read ({_first_line(e)})") from None
    if "shape" in ref and (list(array.shape) != list(ref["shape"]) or array.dtype.name != ref["dtype"]):
        raise ArrayFileError(f"{file}: array {key!r} is {array.dtype.name} {list(array.shape)}, "
                             f"metrics.json expects {ref['dtype']} {ref['shape']}")
    return array


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
