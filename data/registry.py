"""Which datasets the toolkit knows: their Hub source, bundled copy, domain and splits.

A ``DatasetSpec`` is plain data, so a test (or a user) can point a name at another source,
e.g. ``datasets.load_dataset("json", data_files=...)``, and run the exact online code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data.bundled import BundledReader, file_reader, read_humaneval
from data.parsing import (
    Parser,
    parse_alice,
    parse_gsm8k,
    parse_humaneval,
    parse_mmlu_pro,
    parse_python_source,
    parse_shakespeare,
    parse_text_rows,
    parse_wikitext,
)


@dataclass(frozen=True)
class HubSource:
    """Arguments for ``datasets.load_dataset``; ``splits`` maps our split name to the Hub's."""

    path: str
    config: str | None = None
    data_files: Any = None
    streaming: bool = False
    splits: dict[str, str] = field(default_factory=dict)
    shuffle_buffer: int = 10_000

    def hub_split(self, split: str) -> str:
        return self.splits.get(split, split)


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset. ``offline_alternative`` is the bundled name an offline error suggests."""

    name: str
    domain: str
    description: str
    splits: tuple[str, ...]
    default_split: str
    parse: Parser
    hub: HubSource | None = None
    bundled: BundledReader | None = None
    offline_alternative: str | None = None


MMLU_PRO_SUBJECTS = {  # our name suffix -> (MMLU-Pro category, domain label)
    "math": ("math", "math"),
    "computer_science": ("computer science", "computer_science"),
    "physics": ("physics", "physics"),
    "law": ("law", "law"),
    "psychology": ("psychology", "psychology"),
}


def _general_specs() -> list[DatasetSpec]:
    """Web and encyclopedia text: the 'general' domain."""
    return [
        DatasetSpec(
            "fineweb",
            "general",
            "a streamed sample of HuggingFaceFW/fineweb (sample-10BT), web text",
            ("train",),
            "train",
            parse_text_rows("id", "url"),
            hub=HubSource("HuggingFaceFW/fineweb", "sample-10BT", streaming=True),
            offline_alternative="wikitext2",
        ),
        DatasetSpec(
            "wikitext2",
            "general",
            "WikiText-2 Wikipedia articles, chunked paragraphs",
            ("validation", "test"),
            "test",
            parse_wikitext,
            hub=HubSource("Salesforce/wikitext", "wikitext-2-v1"),
            bundled=file_reader({"validation": "wikitext2/valid.txt.xz", "test": "wikitext2/test.txt.xz"}, "lines"),
        ),
    ]


def _math_and_code_specs() -> list[DatasetSpec]:
    """Math word problems and code: the domains routing studies contrast with general text."""
    return [
        DatasetSpec(
            "gsm8k",
            "math",
            "GSM8K grade-school math word problems with worked answers",
            ("train", "test"),
            "test",
            parse_gsm8k,
            hub=HubSource("openai/gsm8k", "main"),
            bundled=file_reader({"train": "gsm8k/train.jsonl.xz", "test": "gsm8k/test.jsonl.xz"}, "jsonl"),
        ),
        DatasetSpec(
            "humaneval",
            "code",
            "HumanEval: Python function signatures with docstrings and solutions",
            ("test",),
            "test",
            parse_humaneval,
            hub=HubSource("openai/openai_humaneval"),
            bundled=read_humaneval,
        ),
        DatasetSpec(
            "python_source",
            "code",
            "top-level functions and classes of 20 CPython 3.11 stdlib modules",
            ("train",),
            "train",
            parse_python_source,
            bundled=file_reader({"train": "python_source/stdlib.jsonl.xz"}, "jsonl"),
        ),
    ]


def _story_specs() -> list[DatasetSpec]:
    """Narrative text: the 'stories' domain."""
    return [
        DatasetSpec(
            "tinystories",
            "stories",
            "TinyStories short children's stories (streamed)",
            ("train", "validation"),
            "validation",
            parse_text_rows(),
            hub=HubSource("roneneldan/TinyStories", streaming=True),
            offline_alternative="alice",
        ),
        DatasetSpec(
            "alice",
            "stories",
            "Alice's Adventures in Wonderland, chunked paragraphs per chapter",
            ("train",),
            "train",
            parse_alice,
            bundled=file_reader({"train": "alice/alice.txt.xz"}, "whole"),
        ),
        DatasetSpec(
            "shakespeare",
            "stories",
            "Tiny Shakespeare, chunks of consecutive speeches",
            ("train",),
            "train",
            parse_shakespeare,
            bundled=file_reader({"train": "shakespeare/input.txt.xz"}, "whole"),
        ),
    ]


def _mmlu_pro_specs() -> list[DatasetSpec]:
    """One dataset per MMLU-Pro subject, each its own domain."""
    return [
        DatasetSpec(
            f"mmlu_pro_{suffix}",
            domain,
            f"MMLU-Pro questions of category '{category}' with options",
            ("test", "validation"),
            "test",
            parse_mmlu_pro(category),
            hub=HubSource("TIGER-Lab/MMLU-Pro"),
            offline_alternative="gsm8k" if suffix == "math" else None,
        )
        for suffix, (category, domain) in MMLU_PRO_SUBJECTS.items()
    ]


def default_registry() -> dict[str, DatasetSpec]:
    """The named datasets, keyed by name (a fresh dict each call, safe to modify)."""
    specs = _general_specs() + _math_and_code_specs() + _story_specs() + _mmlu_pro_specs()
    return {s.name: s for s in specs}


DATASET_NAMES: tuple[str, ...] = tuple(default_registry())
BUNDLED_NAMES: tuple[str, ...] = tuple(n for n, s in default_registry().items() if s.bundled is not None)
