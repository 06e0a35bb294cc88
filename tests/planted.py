"""Planted routing with a known truth, for the tests of nulls and intervals."""

from __future__ import annotations

import numpy as np

from tests.fakes import routing


def planted(num_docs: int = 60, doc_len: int = 40, num_experts: int = 8, top_k: int = 2, num_layers: int = 2,
            stickiness: float = 0.0, domain_pref: float = 3.0, seed: int = 0, vocab: int = 0, token_pref: float = 0.0):
    """Documents of two domains; tokens pick top-k experts i.i.d. from their domain's preference.

    ``stickiness``: chance that a token copies the previous token's experts (same document).
    ``vocab`` > 0 draws token ids; ``token_pref`` > 0 makes each token id prefer one expert.
    Each token's k experts are drawn without replacement in proportion to the weights (as
    ``rng.choice(..., replace=False, p=w)`` draws them) by the Gumbel top-k trick, all at once.
    """
    rng = np.random.default_rng(seed)
    n = num_docs * doc_len
    docs, pos = np.repeat(np.arange(num_docs), doc_len), np.tile(np.arange(doc_len), num_docs)
    dom = docs % 2
    fav = rng.integers(0, num_experts, size=max(vocab, 1))
    tok = rng.integers(0, vocab, size=n) if vocab else np.zeros(n, int)
    w = np.ones((2, num_experts))
    for d in range(2):
        w[d, d * (num_experts // 2): (d + 1) * (num_experts // 2)] = domain_pref
    w = np.repeat(w[dom][:, None, :], num_layers, 1)  # [n, L, E]
    if token_pref:
        w[np.arange(n), :, fav[tok]] += token_pref
    keys = np.log(w / w.sum(-1, keepdims=True)) + rng.gumbel(size=w.shape)
    idx = np.argsort(-keys, axis=-1, kind="stable")[..., :top_k]
    copies = (rng.random(n) < stickiness) & (pos > 0)  # a sticky token takes the row of the last token that was not
    source = np.maximum.accumulate(np.where(copies, 0, np.arange(n)))
    return routing(idx[source], num_experts, doc_ids=docs, positions=pos, domain_ids=dom, token_ids=tok,
                   dataset_ids=np.zeros(n, int), domain_names=["a", "b"], dataset_names=["planted"])
