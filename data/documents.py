"""The labelled document that every loader returns and the tokenizer consumes.

Every document carries its dataset and domain, so a routed token can always be traced back
to "which domain of text was this".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from data.errors import DataError

# The fixed domain vocabulary. MMLU-Pro subjects other than math keep their own domain;
# MMLU-Pro math shares "math" with GSM8K.
DOMAINS = ("general", "math", "code", "stories", "computer_science", "physics", "law", "psychology")


@dataclass(frozen=True)
class Document:
    """One text with its labels. ``doc_id`` is the id its tokens carry after tokenization."""

    text: str
    dataset: str
    domain: str
    doc_id: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise DataError(f"document text must be a str, got {type(self.text).__name__}")
        if not self.dataset or not self.domain:
            raise DataError("a document needs a non-empty dataset and domain label")
        if not isinstance(self.doc_id, int) or self.doc_id < 0:
            raise DataError(f"doc_id must be a non-negative int, got {self.doc_id!r}")

    def metadata(self) -> dict[str, Any]:
        """Flat metadata dict (labels first, then the dataset-specific fields)."""
        return {"dataset": self.dataset, "domain": self.domain, "doc_id": self.doc_id, **self.meta}


def renumber_documents(docs: Iterable[Document], start: int = 0) -> list[Document]:
    """Give documents consecutive ids ``start, start+1, ...`` so ids are unique across datasets."""
    return [replace(d, doc_id=start + i) for i, d in enumerate(docs)]


def text_digest(text: str) -> str:
    """A document's identity by content (SHA-256 of its UTF-8 text, 16 hex digits).

    Held-out selection compares documents by this, so it survives renumbering, resampling and
    the same text arriving from another source (the Hub or the bundled copy).
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
