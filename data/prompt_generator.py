"""Capability-targeted prompts from templates, reproducible from a seed.

For experiments that need many controlled inputs: arithmetic word problems with varied
numbers (and their computed answers), code completions, factual sentences and story
openings, each labelled with its capability and domain so they tokenize like any dataset.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from data.documents import Document
from data.errors import DataError
from data.prompt_templates import BUILDERS

CAPABILITIES: tuple[str, ...] = tuple(BUILDERS)


@dataclass(frozen=True)
class Prompt:
    """A generated prompt: ``text`` is the prompt, ``completion`` its expected continuation."""

    text: str
    capability: str
    domain: str
    completion: str | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def full_text(self) -> str:
        """The prompt followed by its expected completion (the prompt alone if it has none)."""
        return self.text + (self.completion or "")


class PromptGenerator:
    """Generates labelled prompts; the same ``seed`` always gives the same prompts."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @property
    def capabilities(self) -> tuple[str, ...]:
        return CAPABILITIES

    def generate(self, capability: str, n: int, seed: int | None = None) -> list[Prompt]:
        """``n`` prompts of one capability; each capability has its own random stream."""
        if capability not in BUILDERS:
            raise DataError(f"unknown capability {capability!r}; known capabilities: {', '.join(CAPABILITIES)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"n must be a non-negative int, got {n!r}")
        rng = random.Random(f"{self.seed if seed is None else seed}/{capability}")
        domain, builders = BUILDERS[capability]
        choices = builders if isinstance(builders, tuple) else (builders,)
        prompts = []
        for _ in range(n):
            text, completion, answer, meta = rng.choice(choices)(rng)
            prompts.append(Prompt(text, capability, domain, completion, answer, meta))
        return prompts

    def generate_mixed(
        self, n_per_capability: int, capabilities: Sequence[str] | None = None, seed: int | None = None
    ) -> list[Prompt]:
        """``n_per_capability`` prompts of each capability (all four by default), grouped in order."""
        caps = list(CAPABILITIES if capabilities is None else capabilities)
        return [p for cap in caps for p in self.generate(cap, n_per_capability, seed)]

    def arithmetic_word_problems(self, n: int) -> list[Prompt]:
        """Word problems (add, subtract, multiply, divide, two-step) with computed answers."""
        return self.generate("arithmetic", n)

    def code_completions(self, n: int) -> list[Prompt]:
        """Python function headers with docstrings; the completion is a correct body."""
        return self.generate("code", n)

    def factual_sentences(self, n: int) -> list[Prompt]:
        """Sentence prefixes (capitals, element symbols, general facts) completed by the fact."""
        return self.generate("factual", n)

    def story_openings(self, n: int) -> list[Prompt]:
        """Opening sentences of stories from slot-filled templates."""
        return self.generate("story", n)

    @staticmethod
    def to_documents(prompts: Sequence[Prompt], with_completion: bool = False, start_id: int = 0) -> list[Document]:
        """Prompts as ``Document``s (dataset ``prompts_<capability>``) with ids from ``start_id``."""
        return [
            Document(
                p.full_text if with_completion else p.text,
                f"prompts_{p.capability}",
                p.domain,
                start_id + i,
                {"capability": p.capability, "answer": p.answer, "completion": p.completion, **p.meta},
            )
            for i, p in enumerate(prompts)
        ]
