"""Rules that turn a dataset's rows into documents, shared by the bundled and the Hub path.

Each parser takes an iterable of rows (dicts, as ``datasets`` yields them and as the bundled
readers produce them) and yields ``(text, meta)`` pairs. The same parser runs whether the
rows came from the Hub or from the bundled copy, so a name gives the same documents either
way. Parsers yield empty texts too; the loader skips and counts them.

Splitting rules for long corpora (documents of roughly paragraph-to-page size):

- WikiText: articles start at level-1 headings (`` = Title = ``); heading lines are dropped;
  the paragraphs of one article are joined (newline) greedily until a chunk reaches
  ``PROSE_MIN_CHARS`` characters; a last chunk shorter than a quarter of that is merged
  into the previous chunk of the same article.
- Alice: the same chunking within each chapter (chapter heading dropped, kept in meta),
  paragraphs are blank-line separated and joined with a blank line.
- Shakespeare: the same chunking over the speeches (blank-line separated) of the whole text.
- Python source: one document per top-level function or class (decorators included).
"""

from __future__ import annotations

import ast
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

Row = Mapping[str, Any]
Parsed = Iterator[tuple[str, dict[str, Any]]]
Parser = Callable[[Iterable[Row]], Parsed]

PROSE_MIN_CHARS = 1000

_WIKI_TITLE = re.compile(r"^ ?= ([^=].*) = ?$")
_WIKI_HEADING = re.compile(r"^ ?=.*= ?$")
_CHAPTER = re.compile(r"^CHAPTER [IVXLC]+\..*$", re.MULTILINE)
_BLANK = re.compile(r"\n[ \t]*\n")


def chunk_paragraphs(paragraphs: list[str], min_chars: int = PROSE_MIN_CHARS, sep: str = "\n") -> list[str]:
    """Join consecutive paragraphs greedily into chunks of at least ``min_chars`` characters.

    A trailing remainder shorter than ``min_chars // 4`` joins the previous chunk, so no
    document is a stray fragment; a group shorter than that on its own is still one chunk.
    """
    if min_chars < 1:
        raise ValueError(f"min_chars must be positive, got {min_chars}")
    chunks: list[str] = []
    buf: list[str] = []
    for p in paragraphs:
        buf.append(p)
        text = sep.join(buf)
        if len(text) >= min_chars:
            chunks.append(text)
            buf = []
    if buf:
        rest = sep.join(buf)
        if chunks and len(rest) < min_chars // 4:
            chunks[-1] = chunks[-1] + sep + rest
        else:
            chunks.append(rest)
    return chunks


def parse_wikitext(rows: Iterable[Row]) -> Parsed:
    """WikiText lines (one row per line, field ``text``) -> chunks of article paragraphs."""
    title = ""
    paragraphs: list[str] = []

    def flush() -> Parsed:
        for i, chunk in enumerate(chunk_paragraphs(paragraphs, sep="\n")):
            yield chunk, {"title": title, "chunk": i}

    for row in rows:
        line = row["text"].replace("\ufeff", "").strip()
        if not line:
            continue
        m = _WIKI_TITLE.match(line)
        if m:
            yield from flush()
            title, paragraphs = m.group(1).strip(), []
        elif not _WIKI_HEADING.match(line):
            paragraphs.append(line)
    yield from flush()


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n").rstrip() for p in _BLANK.split(text) if p.strip()]


def parse_alice(rows: Iterable[Row]) -> Parsed:
    """The book's text (one row, field ``text``) -> chunks of paragraphs within each chapter."""
    for row in rows:
        text = row["text"].replace("\r\n", "\n")
        heads = list(_CHAPTER.finditer(text))
        for k, head in enumerate(heads):
            end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
            body = text[head.end() : end]
            for i, chunk in enumerate(chunk_paragraphs(_paragraphs(body), sep="\n\n")):
                yield chunk, {"chapter": head.group(0).strip(), "chunk": i}


def parse_shakespeare(rows: Iterable[Row]) -> Parsed:
    """The plays' text (one row, field ``text``) -> chunks of consecutive speeches."""
    for row in rows:
        speeches = _paragraphs(row["text"].replace("\r\n", "\n"))
        for i, chunk in enumerate(chunk_paragraphs(speeches, sep="\n\n")):
            yield chunk, {"chunk": i}


def parse_python_source(rows: Iterable[Row]) -> Parsed:
    """Module sources (fields ``module``, ``source``) -> one document per top-level def/class."""
    for row in rows:
        source = row["source"]
        lines = source.splitlines(keepends=True)
        tree = ast.parse(source)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            text = "".join(lines[first - 1 : node.end_lineno]).rstrip() + "\n"
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            yield text, {"module": row["module"], "name": node.name, "kind": kind, "lineno": first}


def parse_gsm8k(rows: Iterable[Row]) -> Parsed:
    """GSM8K rows -> "Question: ...\\nAnswer: ..." with the final answer (after ####) in meta."""
    for row in rows:
        question, answer = row["question"].strip(), row["answer"].strip()
        final = answer.rsplit("####", 1)[-1].strip() if "####" in answer else ""
        text = f"Question: {question}\nAnswer: {answer}" if question or answer else ""
        yield text, {"question": question, "answer": answer, "final_answer": final}


def parse_humaneval(rows: Iterable[Row]) -> Parsed:
    """HumanEval rows -> the prompt (signature and docstring) followed by the canonical solution."""
    for row in rows:
        text = row["prompt"] + row["canonical_solution"]
        yield text, {"task_id": row["task_id"], "entry_point": row["entry_point"]}


def parse_text_rows(*meta_fields: str) -> Parser:
    """Rows with a ``text`` field (FineWeb, TinyStories) -> that text, keeping ``meta_fields``."""

    def parse(rows: Iterable[Row]) -> Parsed:
        for row in rows:
            yield row.get("text") or "", {k: row[k] for k in meta_fields if k in row}

    return parse


def parse_mmlu_pro(category: str) -> Parser:
    """MMLU-Pro rows of one ``category`` -> question and lettered options; the answer in meta."""

    def parse(rows: Iterable[Row]) -> Parsed:
        for row in rows:
            if row["category"] != category:
                continue
            options = "\n".join(f"{chr(ord('A') + i)}. {opt}" for i, opt in enumerate(row["options"]))
            text = f"{row['question'].strip()}\n{options}" if row["question"].strip() else ""
            yield (
                text,
                {
                    "question_id": row.get("question_id"),
                    "category": category,
                    "answer": row.get("answer"),
                    "answer_index": row.get("answer_index"),
                },
            )

    return parse
