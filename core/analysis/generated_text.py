"""Continuations the model writes from a few sample prompts, with the routing recorded while it wrote them.

The coloured text (:mod:`core.analysis.routed_text`) shows how a model routes text it is handed;
this shows how it routes the text it writes. Each prompt is the start of a kept document (the
first ``prompt_tokens`` tokens); the model continues it greedily for ``new_tokens`` tokens (its
end-of-text token held back until then) through
``wrapper.generate_routing`` (key-value cache on, the routing of every decoding step recorded), and
the result has the fields of :class:`~core.analysis.routed_text.RoutedText` plus where each
document's prompt ends, so the same view draws it with the generated tokens marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.analysis.routed_text import RoutedText


@dataclass
class GeneratedText(RoutedText):
    """Prompt + continuation per document; tokens ``doc_start[d] + prompt_length[d]`` on of document ``d`` are generated."""

    prompt_length: np.ndarray  # [D] how many of each document's tokens are its prompt
    new_tokens: int  # tokens generated after each prompt (greedy)


def prompts_of(text: RoutedText, per_domain: int, prompt_tokens: int) -> list[int]:
    """The documents of ``text`` to continue: the first ``per_domain`` of each domain with at least 2 tokens."""
    chosen, seen = [], {}
    for d in range(text.num_documents):
        dom = text.doc_domain[d]
        if seen.get(dom, 0) < per_domain and text.doc_start[d + 1] - text.doc_start[d] >= 2:
            chosen.append(d)
            seen[dom] = seen.get(dom, 0) + 1
    return chosen


def _rows(gen: Any, b: int) -> tuple[np.ndarray, ...]:
    """Token ids, positions, experts and weights of sequence ``b`` of one ``generate_routing`` result (no padding)."""
    r, width = gen.routing, gen.sequences.shape[1]
    rows = slice(b * width, (b + 1) * width)  # every prompt of a group has one length: no padding rows to leave out
    return (r.token_ids[rows].numpy().astype(np.int64), np.arange(width, dtype=np.int64),
            r.topk_idx[rows].numpy().astype(np.int64), r.topk_weight[rows].float().numpy().astype(np.float32))


def generated_text(wrapper: Any, text: RoutedText, per_domain: int = 2, prompt_tokens: int = 16,
                   new_tokens: int = 24) -> GeneratedText:
    """Continue the first ``prompt_tokens`` tokens of ``per_domain`` documents of each domain of ``text`` greedily.

    ``wrapper``: a local ``MoEModelWrapper`` (generation is traced with hooks, not remotely). Prompts
    of one length go through ``generate()`` together; the routing is the decoding steps' own.
    """
    if prompt_tokens < 1 or new_tokens < 1:
        raise ValueError(f"a continuation needs a prompt and new tokens, not {prompt_tokens} and {new_tokens}")
    docs = prompts_of(text, per_domain, prompt_tokens)
    prompts = {d: text.token_ids[text.document(d)][:prompt_tokens] for d in docs}
    done: dict[int, tuple[np.ndarray, ...]] = {}
    for length in sorted({len(p) for p in prompts.values()}):
        group = [d for d in docs if len(prompts[d]) == length]
        ids = torch.as_tensor(np.stack([prompts[d] for d in group]), dtype=torch.long)
        gen = wrapper.generate_routing(ids, torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False)  # every continuation as long: no row of a batch ends early
        for b, d in enumerate(group):
            done[d] = _rows(gen, b)
    parts = [done[d] for d in docs]
    L, k = len(text.moe_layers), text.top_k
    cols = [np.concatenate([p[i] for p in parts]) if parts else np.zeros((0,) + shape, dt)
            for i, (shape, dt) in enumerate((((), np.int64), ((), np.int64), ((L, k), np.int64), ((L, k), np.float32)))]
    return GeneratedText(list(text.moe_layers), text.num_experts, k, per_domain, prompt_tokens + new_tokens,
                         [text.doc_domain[d] for d in docs], [text.doc_dataset[d] for d in docs],
                         np.asarray([int(text.doc_id[d]) for d in docs], np.int64),
                         np.cumsum([0] + [len(p[0]) for p in parts]).astype(np.int64), *cols,
                         prompt_length=np.asarray([len(prompts[d]) for d in docs], np.int64), new_tokens=new_tokens)
