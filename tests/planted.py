"""Planted routing with a known truth, for the tests of nulls and intervals."""

from __future__ import annotations

import numpy as np

from tests.fakes import routing


def planted(num_docs: int = 60, doc_len: int = 40, num_experts: int = 8, top_k: int = 2, num_layers: int = 2,
            stickiness: float = 0.0, domain_pref: float = 3.0, seed: int = 0, vocab: int = 0, token_pref: float = 0.0):
    """Documents of two domains; tokens pick top-k experts i.i.d. from their domain's preference.

    ``stickiness``: chance that a token copies the previous token's experts (same document).
    ``vocab`` > 0 draws token ids; ``token_pref`` > 0 makes each token id prefer one expert.
    """
    rng = np.random.default_rng(seed)
    prefs = []
    for d in range(2):
        w = np.ones(num_experts)
        w[d * (num_experts // 2) : (d + 1) * (num_experts // 2)] = domain_pref
        prefs.append(w / w.sum())
    idx, docs, pos, dom, tok = [], [], [], [], []
    fav = rng.integers(0, num_experts, size=max(vocab, 1))
    for doc in range(num_docs):
        d = doc % 2
        prev = None
        for p in range(doc_len):
            t = int(rng.integers(0, vocab)) if vocab else 0
            if prev is not None and rng.random() < stickiness:
                row = prev
            else:
                row = []
                for _ in range(num_layers):
                    w = prefs[d].copy()
                    if token_pref:
                        w[fav[t]] += token_pref
                    row.append(rng.choice(num_experts, size=top_k, replace=False, p=w / w.sum()))
                row = np.stack(row)
            idx.append(row)
            prev = row
            docs.append(doc), pos.append(p), dom.append(d), tok.append(t)
    return routing(np.stack(idx), num_experts, doc_ids=docs, positions=pos, domain_ids=dom, token_ids=tok,
                   dataset_ids=np.zeros(len(docs), int), domain_names=["a", "b"], dataset_names=["planted"])
