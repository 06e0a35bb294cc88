"""A result dataclass as exact JSON plus its arrays, and back: how a reusable analysis result is stored (no pickle).

Every value is tagged so that it comes back as the same type with the same bits: arrays (and numpy
scalars, as 0-d arrays) go to a dict of arrays the caller writes as safetensors; floats stay JSON
numbers (Python writes them so they read back exactly) and NaN/inf are named; tuples, lists and
dicts (with their key types, e.g. a layer's int) are kept apart. A dataclass is restored field by
field without running its ``__init__``, so a derived field holds what was stored, not a recomputation;
only dataclasses of ``core.analysis`` are restored, so a foreign file cannot name another class.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

import numpy as np

ALLOWED_MODULES = ("core.analysis.",)  # whose dataclasses a stored result may name
STORABLE_DTYPES = frozenset({"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                             "float16", "float32", "float64"})  # what safetensors holds


class CodecError(ValueError):
    """A value has no exact stored form, or a stored document is not one this codec wrote."""


def _array_ref(a: np.ndarray, arrays: dict[str, np.ndarray]) -> str:
    if a.dtype.name not in STORABLE_DTYPES:
        raise CodecError(f"an array of dtype {a.dtype} has no exact stored form")
    key = f"a{len(arrays)}"
    arrays[key] = np.array(a, order="C", copy=True)  # ascontiguousarray would make a 0-d array 1-d
    return key


def encode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``obj`` as tagged JSON; its arrays are added to ``arrays`` (the safetensors content) under the keys it names."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.generic):  # first: np.float64 is also a float, and would come back a plain one
        return {"scalar": _array_ref(np.asarray(obj), arrays)}
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, np.ndarray):
        return {"array": _array_ref(obj, arrays)}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [encode(v, arrays) for v in obj]}
    if isinstance(obj, dict):
        return {"dict": [[encode(k, arrays), encode(v, arrays)] for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode(getattr(obj, f.name), arrays) for f in dataclasses.fields(obj)}}
    raise CodecError(f"a {type(obj).__name__} has no exact stored form")


def _dataclass(name: str) -> type:
    """The dataclass a stored result names, only from :data:`ALLOWED_MODULES`."""
    module, _, qualname = str(name).partition(":")
    if not module.startswith(ALLOWED_MODULES) or not qualname:
        raise CodecError(f"a stored result names {name!r}, not a result class of core.analysis")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise CodecError(f"a stored result names {name!r}, which is not a dataclass")
    return cls


def _restore_dataclass(doc: dict, arrays: dict[str, np.ndarray]) -> Any:
    cls = _dataclass(doc["dataclass"])
    stored = doc["fields"]
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(stored, dict) or sorted(stored) != sorted(names):
        raise CodecError(f"a stored {cls.__name__} has other fields than the class")
    obj = cls.__new__(cls)
    for name in names:
        object.__setattr__(obj, name, decode(stored[name], arrays))  # frozen dataclasses too
    return obj


def decode(doc: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The value :func:`encode` wrote, with ``arrays`` read back from the safetensors file."""
    if doc is None or isinstance(doc, (bool, str, int, float)):
        return doc
    if not isinstance(doc, dict) or len(doc) not in (1, 2):
        raise CodecError("a stored result holds a value this codec did not write")
    try:
        if "float" in doc:
            return float(doc["float"])
        if "array" in doc:
            return arrays[doc["array"]]
        if "scalar" in doc:
            return arrays[doc["scalar"]][()]
        if "list" in doc or "tuple" in doc:
            items = [decode(v, arrays) for v in doc.get("list", doc.get("tuple"))]
            return items if "list" in doc else tuple(items)
        if "dict" in doc:
            return {decode(k, arrays): decode(v, arrays) for k, v in doc["dict"]}
        if "dataclass" in doc:
            return _restore_dataclass(doc, arrays)
    except (KeyError, TypeError, ValueError, AttributeError, ImportError) as e:
        raise CodecError(f"a stored result is malformed ({type(e).__name__}: {e})") from None
    raise CodecError("a stored result holds a value this codec did not write")
