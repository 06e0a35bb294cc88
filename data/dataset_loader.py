"""One way to get labelled text: named datasets from the Hub when online, bundled copies offline.

A name with a copy shipped in ``data/corpora`` (WikiText-2, GSM8K, HumanEval: the real data) is
read from it first, online or not, with no Hub round trip; ``prefer_hub=True`` loads such names
from their real source with ``datasets.load_dataset`` when online. Hub-only names are loaded from
the Hub online; offline a Hub-only name (``fineweb``, ``tinystories``, MMLU-Pro) is then an error that
names the bundled corpus to use instead, never a silent swap. Names that exist only bundled
(``python_source``, ``alice``, ``shakespeare``) are read from the bundle either way.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping

from data.documents import Document, renumber_documents, text_digest
from data.errors import (
    DataError,
    DatasetSizeWarning,
    HubLoadError,
    OfflineUnavailableError,
    UnknownDatasetError,
    UnknownSplitError,
)
from data.parsing import Parsed, Row
from data.registry import DatasetSpec, default_registry

logger = logging.getLogger(__name__)

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off for this process (``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False
    return bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class LoadReport:
    """What the last ``load`` did: where the text came from and what was skipped."""

    name: str
    split: str
    source: str
    requested: int | None
    available: int | None  # None when a stream was not read to its end
    returned: int
    skipped_empty: int
    excluded: int = 0  # documents left out because their text digest was in ``exclude``


def _check_request(spec: DatasetSpec, name: str, split: str, num_samples: int | None) -> None:
    """Refuse a split the dataset does not have, or a ``num_samples`` that is not a non-negative int."""
    if split not in spec.splits:
        raise UnknownSplitError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0
    ):
        raise DataError(f"num_samples must be a non-negative int or None, got {num_samples!r}")


class DatasetLoader:
    """Loads named datasets as labelled ``Document`` lists.

    ``offline=None`` follows ``HF_HUB_OFFLINE``; ``registry`` replaces the named datasets
    (used to point a name at a local file); ``cache_dir`` is passed to ``datasets``.
    A name with a bundled copy (WikiText-2, GSM8K, HumanEval: the real datasets, every split the
    toolkit offers) is read from the bundle first, with no Hub round trip, online or not;
    ``prefer_hub=True`` reads such names from the Hub when online.
    """

    def __init__(
        self,
        offline: bool | None = None,
        registry: Mapping[str, DatasetSpec] | None = None,
        cache_dir: str | None = None,
        prefer_hub: bool = False,
    ) -> None:
        self._offline = offline
        self.prefer_hub = prefer_hub
        self.registry: dict[str, DatasetSpec] = dict(registry) if registry is not None else default_registry()
        self.cache_dir = cache_dir
        self.last_report: LoadReport | None = None
        self._bundled_cache: dict[tuple[str, str], tuple[list[tuple[int, str, dict]], int | None, int, int]] = {}

    # ----------------------------------------------------------------- names
    @property
    def offline(self) -> bool:
        return hub_offline() if self._offline is None else self._offline

    def names(self) -> list[str]:
        """Every known dataset name."""
        return list(self.registry)

    def available_names(self) -> list[str]:
        """The names that can be loaded now (all of them online; the bundled ones offline)."""
        return [n for n, s in self.registry.items() if s.bundled is not None or (not self.offline and s.hub)]

    def spec(self, name: str) -> DatasetSpec:
        """The spec of ``name``; an unknown name raises an error listing the known ones."""
        if name not in self.registry:
            raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(self.registry)}")
        return self.registry[name]

    def register(self, spec: DatasetSpec) -> None:
        """Add or replace a named dataset."""
        self.registry[spec.name] = spec
        self._bundled_cache = {k: v for k, v in self._bundled_cache.items() if k[0] != spec.name}

    # ------------------------------------------------------------------ load
    def load(
        self,
        name: str,
        split: str | None = None,
        num_samples: int | None = None,
        seed: int | None = 0,
        exclude: Collection[str] | None = None,
    ) -> list[Document]:
        """Documents of ``name``/``split``: all of them, or ``num_samples`` drawn with ``seed``.

        A sample keeps corpus order (indices drawn with ``random.Random(seed)``, then sorted);
        ``seed=None`` takes the first ``num_samples``. Streamed datasets are shuffled with the
        seed in a buffer and need ``num_samples``. Empty documents are skipped and counted in
        ``last_report``. Asking for more than there are warns and returns them all.
        ``exclude`` holds text digests (``data.documents.text_digest``) of documents to leave
        out before sampling (a model's training documents); ``meta["index"]`` keeps each
        document's position in the whole split.
        """
        spec = self.spec(name)
        split = spec.default_split if split is None else split
        exclude = frozenset(exclude) if exclude else None
        _check_request(spec, name, split, num_samples)
        use_hub = self._use_hub(spec, name)
        streaming = use_hub and spec.hub.streaming
        if streaming and num_samples is None:
            raise DataError(f"dataset {name!r} is streamed from the Hub; pass num_samples")
        if use_hub:
            source = f"hub:{spec.hub.path}"
            parsed = spec.parse(self._hub_rows(spec, split, seed))
            picked, available, skipped, excluded = self._collect(parsed, num_samples, seed, streaming, exclude)
        else:
            source = "bundled"
            picked, available, skipped, excluded = self._pick_bundled(spec, split, num_samples, seed, exclude)
        if num_samples is not None and len(picked) < num_samples:
            warnings.warn(
                f"{name} ({split}) has only {len(picked)} documents"
                + (f" once {excluded} excluded ones are left out" if excluded else "")
                + f"; returning all {len(picked)} instead of {num_samples}",
                DatasetSizeWarning,
                stacklevel=2,
            )
        if skipped:
            logger.info("%s (%s): skipped %d empty documents", name, split, skipped)
        if excluded:
            logger.info("%s (%s): left out %d excluded documents", name, split, excluded)
        self.last_report = LoadReport(name, split, source, num_samples, available, len(picked), skipped, excluded)
        return [
            Document(text, spec.name, spec.domain, i, {"split": split, "source": source, "index": index, **meta})
            for i, (index, text, meta) in enumerate(picked)
        ]

    def _use_hub(self, spec: DatasetSpec, name: str) -> bool:
        """Whether ``name`` is read from the Hub; a Hub-only name offline is refused, naming the bundled alternative."""
        use_hub = spec.hub is not None and (spec.bundled is None or (self.prefer_hub and not self.offline))
        if use_hub and self.offline:
            alt = f"; use the bundled {spec.offline_alternative!r} instead" if spec.offline_alternative else ""
            raise OfflineUnavailableError(
                f"dataset {name!r} is only on the Hugging Face Hub ({spec.hub.path}) and the loader is offline{alt}"
                f" (bundled datasets: {', '.join(n for n, s in self.registry.items() if s.bundled)})"
            )
        return use_hub

    def _pick_bundled(
        self, spec: DatasetSpec, split: str, num_samples: int | None, seed: int | None, exclude: frozenset[str] | None
    ) -> tuple[list[tuple[int, str, dict]], int | None, int, int]:
        """(picked, available, skipped, excluded) from the bundled copy: excluded documents left out, then the sample."""
        everything, available, skipped, _ = self._bundled(spec, split)
        kept = everything if not exclude else [d for d in everything if text_digest(d[1]) not in exclude]
        excluded = len(everything) - len(kept)
        picked = self._sample(kept, num_samples, seed)
        return picked, available, skipped, excluded

    def _bundled(self, spec: DatasetSpec, split: str) -> tuple[list[tuple[int, str, dict]], int | None, int, int]:
        """All non-empty documents of a bundled corpus, parsed once per loader and kept in memory."""
        key = (spec.name, split)
        if key not in self._bundled_cache:
            assert spec.bundled is not None
            self._bundled_cache[key] = self._collect(spec.parse(spec.bundled(split)), None, None, False, None)
        return self._bundled_cache[key]

    def _hub_rows(self, spec: DatasetSpec, split: str, seed: int | None) -> Iterable[Row]:
        """Rows from ``datasets.load_dataset`` (streamed and buffer-shuffled where the spec says)."""
        import datasets

        src = spec.hub
        assert src is not None
        kwargs: dict[str, Any] = {"path": src.path, "split": src.hub_split(split), "streaming": src.streaming}
        if src.config is not None:
            kwargs["name"] = src.config
        if src.data_files is not None:
            kwargs["data_files"] = src.data_files
        if self.cache_dir is not None:
            kwargs["cache_dir"] = self.cache_dir
        try:
            ds = datasets.load_dataset(**kwargs)
        except Exception as exc:  # network, auth and bad-id errors all surface here
            alt = spec.offline_alternative or (spec.name if spec.bundled else None)
            hint = f"; pass offline=True to use the bundled {alt!r}" if alt else ""
            raise HubLoadError(
                f"could not load {spec.name!r} from the Hugging Face Hub ({src.path}): {type(exc).__name__}: {exc}{hint}"
            ) from exc
        if src.streaming and seed is not None:
            ds = ds.shuffle(seed=seed, buffer_size=src.shuffle_buffer)
        return ds

    @staticmethod
    def _collect(
        parsed: Parsed, num_samples: int | None, seed: int | None, streaming: bool, exclude: Collection[str] | None
    ) -> tuple[list[tuple[int, str, dict]], int | None, int, int]:
        """Skip empty and excluded texts; take a stream's first n, or sample n of a finite corpus.

        Returns ``(docs, available, skipped_empty, excluded)``; a document's index counts every
        non-empty document before it, excluded ones included.
        """
        docs: list[tuple[int, str, dict]] = []
        skipped = excluded = index = 0
        for text, meta in parsed:
            if not text.strip():
                skipped += 1
                continue
            index += 1
            if exclude and text_digest(text) in exclude:
                excluded += 1
                continue
            docs.append((index - 1, text, meta))
            if streaming and num_samples is not None and len(docs) >= num_samples:
                return docs, None, skipped, excluded
        return DatasetLoader._sample(docs, num_samples, seed), index, skipped, excluded

    @staticmethod
    def _sample(docs: list, num_samples: int | None, seed: int | None) -> list:
        """All of ``docs``, their first n (``seed=None``), or n drawn with ``seed`` in corpus order."""
        if num_samples is None or num_samples >= len(docs):
            return docs
        if seed is None:
            return docs[:num_samples]
        idx = sorted(random.Random(seed).sample(range(len(docs)), num_samples))
        return [docs[i] for i in idx]

    def load_datasets(
        self,
        names: list[str],
        num_samples_per_dataset: int | None = None,
        seed: int | None = 0,
        splits: Mapping[str, str] | None = None,
        exclude: Collection[str] | None = None,
    ) -> list[Document]:
        """Several datasets in one list, with doc ids ``0..n-1`` unique across all of them.

        ``exclude``: text digests of documents to leave out of every dataset before sampling.
        """
        if isinstance(names, str) or not names:
            raise DataError("names must be a non-empty list of dataset names")
        if len(set(names)) != len(names):
            raise DataError(f"dataset names repeat in {names}")
        splits = dict(splits or {})
        for key in splits:
            if key not in names:
                raise DataError(f"splits names {key!r}, which is not among the datasets {names}")
        docs: list[Document] = []
        for name in names:
            docs.extend(self.load(name, splits.get(name), num_samples_per_dataset, seed, exclude))
        return renumber_documents(docs)

    # ------------------------------------------- (texts, metadata) shortcuts
    def load_texts(
        self, name: str, num_samples: int | None = 100, split: str | None = None, seed: int | None = 0
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """``(texts, metadata)`` of a dataset; metadata has dataset, domain, doc_id, source, split."""
        docs = self.load(name, split, num_samples, seed)
        return [d.text for d in docs], [d.metadata() for d in docs]

    def load_math_qa_data(
        self, num_samples: int | None = 100, split: str | None = None, seed: int | None = 0, dataset: str = "gsm8k"
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Math word problems with worked answers (GSM8K by default)."""
        return self.load_texts(dataset, num_samples, split, seed)

    def load_code_data(
        self, num_samples: int | None = 100, split: str | None = None, seed: int | None = 0, dataset: str = "humaneval"
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Python code (HumanEval by default; ``dataset="python_source"`` for stdlib code)."""
        return self.load_texts(dataset, num_samples, split, seed)

    def load_general_text(
        self, num_samples: int | None = 100, split: str | None = None, seed: int | None = 0, dataset: str = "wikitext2"
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """General prose (WikiText-2 by default, available offline)."""
        return self.load_texts(dataset, num_samples, split, seed)

    def load_fineweb_data(self, num_samples: int = 100, seed: int | None = 0) -> tuple[list[str], list[dict[str, Any]]]:
        """A streamed FineWeb sample (needs the Hub; offline it names ``wikitext2`` instead)."""
        return self.load_texts("fineweb", num_samples, None, seed)

    def load_story_data(
        self, num_samples: int | None = 100, split: str | None = None, seed: int | None = 0, dataset: str = "alice"
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Narrative text (Alice by default; ``shakespeare`` bundled, ``tinystories`` online)."""
        return self.load_texts(dataset, num_samples, split, seed)
