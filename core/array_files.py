"""metrics.json keeps scalars and small per-layer values; its big arrays go to one ``arrays.safetensors`` beside it.

At OLMoE's shape (16 layers x 64 experts) the cross-layer correlation matrices alone are 1024 x 1024
each, and as JSON lists they made metrics.json 200 MB and 25 s to write. Here every array with two
or more dimensions, or one dimension longer than :data:`INLINE_MAX`, is written to the array file
under its JSON path joined with ``/`` (``correlation_topk/corr``), and metrics.json holds a small
reference in its place; the sections a person quotes (options, headline, findings, warnings) stay
whole in the JSON. The rule is the same at every model size, so a reader's code does not
depend on the shape. :func:`load_metrics` gives back the whole dict with numpy arrays in place of
the references; :func:`load_array` reads one array without the rest.

Neither file can be altered without it being noticed: metrics.json carries the SHA-256 of its own
content (``arrays.json_sha256``, over the JSON with that field left out, keys sorted), and the
array file carries each array's SHA-256 in its metadata; both are checked on every load, the arrays
re-hashed as they are read. A file edited, damaged or cut short is one :class:`ArrayFileError` line.
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
JSON_DIGEST = "json_sha256"  # the index's entry holding metrics.json's own checksum
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
        self.sha256: dict[str, str] = {}  # each array's own checksum, re-hashed when it is read
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
        self.sha256[key] = array_sha256(array)
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

        return save(self.arrays, metadata={"digest": self.digest, "sha256": json.dumps(self.sha256, sort_keys=True)})


def array_sha256(array: np.ndarray) -> str:
    """An array's checksum: its little-endian bytes (as the array file stores them), dtype and shape."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    h = hashlib.sha256(f"{array.dtype.name}{list(array.shape)}".encode() + b"\0")
    h.update(memoryview(array.reshape(-1)).cast("B") if array.size else b"")
    return h.hexdigest()


def _json_sha256(document: dict) -> str:
    """The checksum metrics.json carries of itself: its content with the checksum left out, keys sorted."""
    index = {k: v for k, v in document[INDEX_KEY].items() if k != JSON_DIGEST}
    text = json.dumps({**document, INDEX_KEY: index}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


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
    document = json.loads(json.dumps({INDEX_KEY: index, **body}, allow_nan=False))  # as a reader will parse it
    index[JSON_DIGEST] = _json_sha256(document)
    text = json.dumps({INDEX_KEY: index, **body}, indent=1, allow_nan=False) + "\n"
    data = sink.file_bytes()
    atomic_write_bytes(path.parent / ARRAY_FILE, data, durable=durable)
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def load_metrics(path: str | os.PathLike) -> dict:
    """metrics.json (``path``: the file or its run folder) with every array reference replaced by its numpy array.

    Raises :class:`ArrayFileError` (one line naming the file) where the JSON is cut short, edited or
    damaged, or an array cannot be had or fails its checksum.
    """
    path = _metrics_path(path)
    body = _read_json(path)
    index = body.pop(INDEX_KEY, None)
    refs = list(_references(body))
    if not refs:
        return body
    file = path.parent / refs[0][2]["array_file"]
    with _open(file) as f:
        meta = f.metadata() or {}
        if isinstance(index, dict) and index.get("digest") != meta.get("digest"):
            raise ArrayFileError(f"{file} does not belong to {path} (their digests differ: one of the two is from "
                                 "another write, or a write stopped between them); run the analysis again")
        keys, sums = set(f.keys()), _array_sums(file, meta)
        legacy = hashlib.blake2b(digest_size=16)  # files written before each array had its checksum
        for parent, name, ref in refs:
            parent[name] = array = _read(f, file, keys, ref, sums)
            if sums is None:
                for part in (ref["key"], array.dtype.name, repr(array.shape)):
                    legacy.update(part.encode() + b"\0")
                legacy.update(memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B") if array.size else b"")
        if sums is None and legacy.hexdigest() != meta.get("digest"):
            raise ArrayFileError(f"{file}: the arrays fail their checksum (edited or damaged since they were written); "
                                 "run the analysis again")
    return body


def load_array(run_dir: str | os.PathLike, key: str) -> np.ndarray:
    """One array of a run (``run_dir``: its folder or its metrics.json) by key, without reading the others; checked."""
    file = _metrics_path(run_dir).parent / ARRAY_FILE
    with _open(file) as f:
        return _read(f, file, set(f.keys()), {"key": key}, _array_sums(file, f.metadata() or {}))


def _read_json(path: Path) -> dict:
    """metrics.json parsed and checked against its own checksum; one line if it is missing, cut short or edited."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArrayFileError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ArrayFileError(f"{path} is not text (damaged); run the analysis again") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArrayFileError(f"{path} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}): cut short or edited; "
                             "run the analysis again") from None
    if not isinstance(body, dict):
        raise ArrayFileError(f"{path} holds no metrics (a JSON {type(body).__name__}, not an object)")
    index = body.get(INDEX_KEY)
    stored = index.get(JSON_DIGEST) if isinstance(index, dict) else None
    if stored is None:  # every metrics.json this toolkit writes carries it: one without it cannot be vouched for
        raise ArrayFileError(f"{path} has no checksum of its own (written before the toolkit kept one, or edited by hand); "
                             "run the analysis again")
    if stored != _json_sha256(body):
        raise ArrayFileError(f"{path} fails its checksum (edited or damaged since it was written); run the analysis again")
    if isinstance(index, dict):
        index.pop(JSON_DIGEST, None)
    return body


def _array_sums(file: Path, meta: dict) -> dict[str, str] | None:
    """Each array's checksum from the array file's metadata; None for a file written before they were kept."""
    if "sha256" not in meta:
        return None
    try:
        sums = json.loads(meta["sha256"])
    except ValueError:
        sums = None
    if not isinstance(sums, dict):
        raise ArrayFileError(f"{file}: its checksums are damaged; run the analysis again")
    return sums


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


def _read(f: Any, file: Path, keys: set[str], ref: dict, sums: dict[str, str] | None) -> np.ndarray:
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
    if sums is not None and sums.get(key) != array_sha256(array):
        raise ArrayFileError(f"{file}: array {key!r} fails its checksum (edited or damaged since it was written); "
                             "run the analysis again")
    return array


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
