"""What every analysis returns: a dataclass whose ``to_dict()`` is strict JSON, for metrics and the viz layer."""

from __future__ import annotations

from dataclasses import fields

from core.safe_io import ArraySink, to_jsonable


class ResultMixin:
    """Gives a result dataclass ``to_dict()``: every field, JSON-ready (arrays as lists, NaN as null).

    A field named in the class's ``_not_serialized`` (bulky in-memory extras, e.g. bases) is left out.
    """

    _not_serialized: tuple[str, ...] = ()

    def to_dict(self, *, sink: ArraySink | None = None, path: tuple[str, ...] = ()) -> dict:
        """``sink``/``path``: see :func:`core.safe_io.to_jsonable` (big arrays to a file beside the JSON)."""
        return {f.name: to_jsonable(getattr(self, f.name), sink=sink, path=(*path, f.name))
                for f in fields(self) if f.name not in self._not_serialized}  # type: ignore[arg-type]
