"""Rows in, routing out: the two helpers the collector and the split cache share.

A cache written by one process (``core.collection.collector``) and one written as parts by
several (``core.store.split_cache``) must cut the same rows into the same shards and hold the
same routing, so both read the input rows with :func:`token_rows` and join traced batches into a
shard with :func:`concat_batches`. They live here, in the store, so that neither of the two
imports the other.
"""

from __future__ import annotations

from typing import Any

import torch

from core.routing_data import RoutingData


def token_rows(tokenized: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(input_ids, attention_mask)`` of tokenized rows, checked.

    ``tokenized`` is anything with ``input_ids`` as a ``[rows, length]`` tensor and optionally an
    ``attention_mask`` of the same shape (``data.TokenizedDataset``, ``TokenRows``); without a
    mask every position counts as a token. Raises ``TypeError``/``ValueError`` in one line otherwise.
    """
    ids = getattr(tokenized, "input_ids", None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise TypeError(
            f"collect() needs tokenized data with input_ids as a [rows, length] tensor, got {type(tokenized).__name__}"
        )
    mask = getattr(tokenized, "attention_mask", None)
    if mask is None:
        mask = torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
    return ids, mask


def concat_batches(parts: list[RoutingData]) -> RoutingData:
    """One shard's routing from its traced batches, in order.

    Zero-token placeholders (batches whose rows were all padding) are left out when any batch
    holds tokens; when none does, the first placeholder stands for them all. ``parts`` must not
    be empty.
    """
    real = [p for p in parts if p.num_tokens > 0]
    if not real:
        return parts[0]
    return real[0] if len(real) == 1 else RoutingData.concat(real)
