"""Which documents a training run of the toolkit's own MoE read, kept in its folder.

A study of routing must not analyse the text the model was trained on and call it held out.
``train`` writes ``training_data.json`` into the run folder: every corpus entry (dataset,
split, documents in the split), which documents went to the run's train, validation and test
splits and which were held out for analysis (by index in the split), the token counts, and the
text digest (``data.documents.text_digest``) of every document read. The main run leaves those
documents out of what it analyses (:func:`training_digests`), and :func:`training_data_note`
says in one line what the model saw. A run folder from older code has no record: the note
then says the training data is unknown rather than guess.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from core.safe_io import atomic_write_json
from data.errors import DataError

RECORD_NAME = "training_data.json"
RECORD_FORMAT = 1
SPLITS = (("train", "train"), ("val", "validation"), ("test", "test"))


class TrainingDataError(DataError):
    """A ``training_data.json`` that cannot be read or is of an unknown format (the main run says so in one line)."""


# --------------------------------------------------------------------------- index ranges
def index_ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted indices as inclusive ``[first, last]`` runs: ``[0, 1, 2, 5]`` -> ``[[0, 2], [5, 5]]``."""
    runs: list[list[int]] = []
    for i in sorted(set(int(i) for i in indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def describe_indices(runs: list[list[int]], available: int | None = None) -> str:
    """``"docs 0–690"``, ``"all 797 docs"`` or ``"1500 of 7473 docs"`` (scattered indices)."""
    count = sum(b - a + 1 for a, b in runs)
    if available is not None and count == available:
        return f"all {count} docs"
    if 0 < len(runs) <= 3:
        return "docs " + ", ".join(f"{a}–{b}" if b > a else f"{a}" for a, b in runs)
    return f"{count} of {available} docs" if available is not None else f"{count} docs"


# --------------------------------------------------------------------------- writing
def build_record(cfg: Any, corpus: Any, tokens: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The record of one run: ``cfg`` a ``TrainConfig``, ``corpus`` a ``corpus.Corpus``, ``tokens`` per split."""
    from data.documents import text_digest

    parts = {"train": corpus.train, "val": corpus.val, "test": corpus.test}
    sources = []
    for src in corpus.sources:
        entry = {"dataset": src["dataset"], "split": src["split"], "available": src["available"]}
        for part, docs in parts.items():
            entry[part] = index_ranges(d.meta["index"] for d in docs
                                       if d.dataset == src["dataset"] and d.meta.get("split") == src["split"])
        entry["documents"] = sum(b - a + 1 for part in parts for a, b in entry[part])
        entry["held_out"] = index_ranges(src["held_out"])
        sources.append(entry)
    return {
        "format": RECORD_FORMAT,
        "about": "documents this model's training run read (its train, validation and test splits), "
                 "by index in each dataset split; 'digests' identify them by text (data.documents.text_digest)",
        "run_name": cfg.run_name,
        "seed": cfg.seed,
        "corpus": list(cfg.corpus),
        "max_docs_per_dataset": cfg.max_docs_per_dataset,
        "held_out_rule": dict(cfg.held_out),
        "sources": sources,
        "tokens": dict(tokens or {}),
        "steps": cfg.steps,
        "tokens_processed": cfg.steps * cfg.batch_size * cfg.seq_len,
        "digests": sorted({text_digest(d.text) for docs in parts.values() for d in docs}),
    }


def write_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """``training_data.json`` in ``run_dir``, written atomically."""
    return atomic_write_json(Path(run_dir) / RECORD_NAME, record)


# --------------------------------------------------------------------------- reading
def read_record(model_dir: str | Path | None) -> dict[str, Any] | None:
    """The record of ``model_dir``, or None when it has none (not a toolkit run, or older code)."""
    if model_dir is None:
        return None
    path = Path(model_dir) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingDataError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise TrainingDataError(f"{path} is not a training-data record of format {RECORD_FORMAT}")
    return record


def training_digests(model_dir: str | Path | None) -> frozenset[str] | None:
    """Text digests of every document the run read (None: no record, so nothing is known)."""
    record = read_record(model_dir)
    return None if record is None else frozenset(record["digests"])


def _trained_on(record: dict[str, Any]) -> str:
    parts = []
    for src in record["sources"]:
        runs = index_ranges(i for part, _ in SPLITS for a, b in src[part] for i in range(a, b + 1))
        parts.append(f"{src['dataset']} {src['split']} {describe_indices(runs, src['available'])}")
    tokens = record.get("tokens") or {}
    size = "".join(f"{tokens[k]:,} {label} tokens, " for k, label in SPLITS if k in tokens)
    return (f"trained on {', '.join(parts)} ({size}{record['tokens_processed']:,} tokens processed "
            f"in {record['steps']} steps)")


def _analysed(record: dict[str, Any], analysed: Mapping[str, Any]) -> str:
    from data.documents import text_digest

    seen = set(record["digests"])
    parts, overlap = [], 0
    for name, data in analysed.items():
        docs = list(getattr(data, "documents", data))
        overlap += sum(text_digest(d.text) in seen for d in docs)
        by_split: dict[str, list[int]] = {}
        for d in docs:
            by_split.setdefault(str(d.meta.get("split", "?")), []).append(int(d.meta.get("index", d.doc_id)))
        parts += [f"{name} {split} {describe_indices(index_ranges(ix))}" for split, ix in by_split.items()]
    if overlap:
        return f"this run analyses {', '.join(parts)}, of which {overlap} documents were in the training corpus"
    return f"this run analyses held-out documents only: {', '.join(parts)}"


def training_data_note(model_dir: str | Path | None, analysed: Mapping[str, Any] | None = None) -> str | None:
    """One line on the data the model in ``model_dir`` was trained on, and what a run analyses.

    ``analysed`` maps a dataset name to its documents (a ``TokenizedDataset`` or a list of
    ``Document``); without it the note names what training held out. None when ``model_dir`` is
    not a training run of the toolkit (a Hub model: nothing is known); "unknown" for a run
    written before runs recorded their data.
    """
    if model_dir is None or not (Path(model_dir) / "run_info.json").is_file():
        return None
    try:
        record = read_record(model_dir)
    except TrainingDataError as exc:
        return f"training data unknown: {exc}"
    if record is None:
        return ("training data unknown: this model was trained by older code that did not record its documents "
                "(no training_data.json), so the analysed documents may include training documents")
    if analysed is not None:
        return f"{_trained_on(record)}; {_analysed(record, analysed)}"
    held = [f"{s['dataset']} {s['split']} {describe_indices(s['held_out'])}" for s in record["sources"] if s["held_out"]]
    tail = f"held out for analysis: {', '.join(held)}" if held else "nothing of its corpus splits held out"
    return f"{_trained_on(record)}; {tail}; documents of other splits were not read"
