"""What the analyses of a run are built from: the options, the model, the caches and the tokens (:class:`RunContext`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from core.analysis.measures import require_score_fn
from core.analysis.vocabulary import MAX_TOKEN_IDS
from core.collection.sweep import Sweep
from data import TokenizedDataset


@dataclass(frozen=True)
class RunContext:
    """One run's inputs as the analyses see them; derived inputs (frequent ids, scored tokens) are built once."""

    options: Any  # core.pipeline.options.RunOptions
    wrapper: Any  # the final checkpoint's MoEModelWrapper
    sweep: Sweep
    tokenized: Mapping[str, TokenizedDataset]
    token_ids: list[int] | None = None  # the ids vocabulary specialization tracks (default: the data's most frequent)
    _heads: dict[int, TokenizedDataset] = field(default_factory=dict, repr=False, compare=False)

    @property
    def micro(self) -> bool:
        return bool(self.options.micro)

    @property
    def resamples(self) -> int:
        return int(self.options.analysis.resamples)

    @property
    def seed(self) -> int:
        return int(self.options.seed)

    @property
    def progress(self) -> bool:
        return bool(self.options.output.progress)

    @property
    def score_fn(self) -> str:
        """How the model's routers score experts, as its wrapper read it: softmax rows are centred, sigmoid ones not (no default)."""
        return require_score_fn(getattr(self.wrapper, "score_fn", None), "a run's weight analyses (its model wrapper gives none)")

    @cached_property
    def frequent_ids(self) -> list[int] | None:
        """The token ids vocabulary specialization tracks: those given, else the data's most frequent."""
        if self.token_ids is not None:
            return list(self.token_ids)
        return frequent_token_ids(self.tokenized) if self.tokenized else None

    def model_tokens(self, max_tokens: int) -> TokenizedDataset:
        """The first ``max_tokens`` of every dataset, concatenated: what ablation and pruning score (built once per size)."""
        if max_tokens not in self._heads:
            self._heads[max_tokens] = TokenizedDataset.concat([tok.head_tokens(max_tokens) for tok in self.tokenized.values()])
        return self._heads[max_tokens]


def frequent_token_ids(tokenized: Mapping[str, TokenizedDataset], n: int = MAX_TOKEN_IDS) -> list[int]:
    """The ``n`` most frequent token ids of the run's data (most frequent first)."""
    counts: np.ndarray = np.zeros(0, np.int64)
    for tok in tokenized.values():
        ids = tok.input_ids[tok.attention_mask.bool()].numpy().astype(np.int64)
        c = np.bincount(ids)
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[: len(c)] += c
    order = np.argsort(-counts, kind="stable")
    return [int(t) for t in order[:n] if counts[t] > 0]
