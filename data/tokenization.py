"""Tokenize labelled documents into padded rows that keep, per token, where it came from.

Every token keeps its document id, its position inside that document, its dataset and its
domain, so an analysis can ask "which expert did this token of this domain go to".

- truncate mode (``pack=False``): one row per document, cut to ``max_length`` tokens.
- pack mode (``pack=True``): documents are concatenated, each followed by the tokenizer's EOS
  token when it has one (the EOS belongs to the document it ends), and the stream is cut
  into rows of ``max_length``; a document may continue on the next row, its positions
  continuing too. Only the last row is padded.

Rows are right-padded with the tokenizer's pad id (0 if it has none); padding has
``attention_mask`` 0 and ``-1`` in every label tensor. ``positions`` count tokens within the
document, not within the row (in truncate mode the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch

from data.documents import Document
from data.errors import DataError

LABEL_FIELDS = ("doc_ids", "positions", "domain_ids", "dataset_ids")


@dataclass
class TokenizedDataset:
    """Padded token rows ``[B, T]`` with per-token labels and the documents they came from."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor
    domain_ids: torch.Tensor
    dataset_ids: torch.Tensor
    domain_names: list[str]
    dataset_names: list[str]
    documents: list[Document]
    max_length: int
    packed: bool

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Number of non-padding tokens."""
        return int(self.attention_mask.sum())

    def document(self, doc_id: int) -> Document:
        """The document whose tokens carry ``doc_id``."""
        for d in self.documents:
            if d.doc_id == doc_id:
                return d
        raise KeyError(f"no document with doc_id {doc_id} in this dataset")

    def token_labels(self) -> dict[str, torch.Tensor]:
        """The non-padding tokens, row-major, as flat ``[N]`` tensors (the RoutingData order)."""
        mask = self.attention_mask.bool()
        out = {"token_ids": self.input_ids[mask]}
        for name in LABEL_FIELDS:
            out[name] = getattr(self, name)[mask]
        return out

    def rows(self, rows: slice) -> "TokenizedDataset":
        """The rows picked by ``rows``, with the documents they hold and the full name tables."""
        ids = set(self.doc_ids[rows].unique().tolist()) - {-1}
        return replace(
            self,
            **{name: getattr(self, name)[rows] for name in ("input_ids", "attention_mask") + LABEL_FIELDS},
            documents=[d for d in self.documents if d.doc_id in ids],
        )

    def head_tokens(self, max_tokens: int) -> "TokenizedDataset":
        """The first rows holding at most ``max_tokens`` non-padding tokens (at least one row)."""
        per_row = self.attention_mask.sum(dim=1)
        return self.rows(slice(0, max(1, int((per_row.cumsum(0) <= max_tokens).sum()))))

    def batches(self, batch_size: int) -> Iterator["TokenizedDataset"]:
        """Consecutive row batches, in order; each keeps the full name tables and its own documents."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
        for start in range(0, len(self), batch_size):
            yield self.rows(slice(start, start + batch_size))

    @staticmethod
    def concat(parts: Sequence["TokenizedDataset"]) -> "TokenizedDataset":
        """Rows of several tokenized datasets with the same name tables, right-padded to one width."""
        if not parts:
            raise DataError("nothing to concatenate")
        first = parts[0]
        if any(p.domain_names != first.domain_names or p.dataset_names != first.dataset_names for p in parts):
            raise DataError("cannot concatenate tokenized datasets with different domain or dataset name tables")
        width = max(p.input_ids.shape[1] for p in parts)

        def stack(name: str) -> torch.Tensor:  # new padding is masked out, so its token id does not matter
            fill = 0 if name in ("input_ids", "attention_mask") else -1
            return torch.cat([torch.nn.functional.pad(getattr(p, name), (0, width - p.input_ids.shape[1]), value=fill) for p in parts])

        return replace(first, **{n: stack(n) for n in ("input_ids", "attention_mask") + LABEL_FIELDS},
                       documents=[d for p in parts for d in p.documents], max_length=max(p.max_length for p in parts))


def _as_hf_tokenizer(tokenizer: Any) -> Any:
    """Accept a transformers tokenizer, or wrap a bare ``tokenizers.Tokenizer``."""
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        Tokenizer = None
    if Tokenizer is not None and isinstance(tokenizer, Tokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    raise DataError(
        f"tokenizer must be a transformers tokenizer or a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
    )


def _name_table(values: list[str], given: Sequence[str] | None, kind: str) -> list[str]:
    if given is None:
        return list(dict.fromkeys(values))
    table = list(given)
    missing = sorted(set(values) - set(table))
    if missing:
        raise DataError(f"{kind} {missing} are not in the given {kind} table {table}")
    return table


def _checked_documents(documents: Sequence[Document], max_length: int) -> list[Document]:
    """The documents as a list, refused with one line if they cannot be tokenized together."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length must be a positive int, got {max_length!r}")
    docs = list(documents)
    if not docs:
        raise DataError("no documents to tokenize")
    if not all(isinstance(d, Document) for d in docs):
        raise DataError("tokenize_documents takes Document objects (see data.Document)")
    seen: dict[int, Document] = {}
    for d in docs:
        if d.doc_id in seen:
            raise DataError(
                f"duplicate doc_id {d.doc_id} ({seen[d.doc_id].dataset} and {d.dataset}); "
                "renumber with data.renumber_documents() or load with DatasetLoader.load_datasets()"
            )
        seen[d.doc_id] = d
    return docs


def _token_rows(
    tok: Any, texts: list[str], max_length: int, pack: bool, add_special_tokens: bool
) -> list[list[tuple[int, int, int]]]:
    """Rows of ``(token, document index, position)``: one per document, or packed to ``max_length``."""
    if pack:
        encoded = tok(texts, add_special_tokens=add_special_tokens, truncation=False, verbose=False)["input_ids"]
        eos = tok.eos_token_id
        encoded = [list(ids) + ([eos] if eos is not None and (not ids or ids[-1] != eos) else []) for ids in encoded]
        stream = [(t, i, p) for i, ids in enumerate(encoded) for p, t in enumerate(ids)]
        rows = [stream[s : s + max_length] for s in range(0, len(stream), max_length)]
    else:
        encoded = tok(
            texts, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length, verbose=False
        )["input_ids"]
        rows = [[(t, i, p) for p, t in enumerate(list(ids)[:max_length])] for i, ids in enumerate(encoded)]
    rows = [r for r in rows if r]  # a document with no tokens has no row
    if not rows:
        raise DataError("the tokenizer produced no tokens for these documents")
    return rows


def tokenize_documents(
    documents: Sequence[Document],
    tokenizer: Any,
    max_length: int,
    pack: bool = False,
    add_special_tokens: bool = True,
    domain_names: Sequence[str] | None = None,
    dataset_names: Sequence[str] | None = None,
) -> TokenizedDataset:
    """Tokenize ``documents`` into a ``TokenizedDataset`` (see the module docstring for modes).

    ``domain_names``/``dataset_names`` fix the id tables (e.g. to share them across runs);
    by default they list the labels in order of first appearance. Doc ids must be unique.
    """
    docs = _checked_documents(documents, max_length)
    tok = _as_hf_tokenizer(tokenizer)
    domains = _name_table([d.domain for d in docs], domain_names, "domains")
    datasets = _name_table([d.dataset for d in docs], dataset_names, "datasets")

    rows = _token_rows(tok, [d.text for d in docs], max_length, pack, add_special_tokens)

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    b, t = len(rows), max(len(r) for r in rows)
    out = {name: torch.full((b, t), -1, dtype=torch.long) for name in LABEL_FIELDS}
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    doc_id_of = torch.tensor([d.doc_id for d in docs], dtype=torch.long)
    domain_of = torch.tensor([domains.index(d.domain) for d in docs], dtype=torch.long)
    dataset_of = torch.tensor([datasets.index(d.dataset) for d in docs], dtype=torch.long)
    for r, row in enumerate(rows):
        toks, idx, pos = (torch.tensor(col, dtype=torch.long) for col in zip(*row, strict=True))
        n = len(row)
        input_ids[r, :n] = toks
        attention_mask[r, :n] = 1
        out["doc_ids"][r, :n] = doc_id_of[idx]
        out["positions"][r, :n] = pos
        out["domain_ids"][r, :n] = domain_of[idx]
        out["dataset_ids"][r, :n] = dataset_of[idx]
    return TokenizedDataset(
        input_ids=input_ids,
        attention_mask=attention_mask,
        domain_names=domains,
        dataset_names=datasets,
        documents=docs,
        max_length=max_length,
        packed=pack,
        **out,
    )
