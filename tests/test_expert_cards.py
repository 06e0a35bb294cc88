"""Expert cards: a planted digit expert and keyword expert list exactly their tokens and contexts; bounded; escaped."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from core.analysis.expert_cards import ExpertCardsAccumulator, expert_cards
from core.analysis.sparse_counts import SparseCounts
from core.analysis.streaming import merge_all, state_nbytes
from tests.fakes import routing
from viz.expert_cards import expert_cards_html, expert_cards_payload, script_json

E, K, L = 8, 2, 3
DIGIT_EXPERT, KEYWORD_EXPERT, LAYER = 3, 5, 1
MATH = ["Add", " 1", "2", " and", " 3", "7", " to", " get", " 4", "9", ".", "\n"]
CODE = ["def", " f", "(", "x", "):", "\n", "    ", "return", " x", "\n", "if", " y", " in", " z", ":"]
DIGITS = {w for w in MATH if w.strip().isdigit()}
KEYWORDS = {w for w in CODE if w.strip() in ("def", "return", "if", "in")}
VOCAB = sorted(set(MATH) | set(CODE) | {"<script>alert(1)</script>"})


def planted(docs: int = 40, seed: int = 0):
    """Math and code documents; at layer 1 expert 3 takes exactly the digits, expert 5 exactly the Python keywords.

    The planted slot weighs 0.9, every other slot 0.5 or less, and no other token reaches experts 3 and 5 at layer 1.
    """
    rng = np.random.default_rng(seed)
    words, doc, dom = [], [], []
    for d in range(docs):
        text = MATH if d % 2 == 0 else CODE
        words += text
        doc += [d] * len(text)
        dom += [d % 2] * len(text)
    n = len(words)
    others = [e for e in range(E) if e not in (DIGIT_EXPERT, KEYWORD_EXPERT)]
    idx = np.stack([rng.permutation(others)[:K] for _ in range(n * L)]).reshape(n, L, K)
    w = rng.uniform(0.1, 0.5, (n, L, K))
    digit = np.array([x in DIGITS for x in words])
    keyword = np.array([x in KEYWORDS for x in words])
    idx[digit, LAYER, 0], idx[keyword, LAYER, 0] = DIGIT_EXPERT, KEYWORD_EXPERT
    w[digit | keyword, LAYER, 0] = 0.9
    pos = np.concatenate([np.arange(len(MATH if d % 2 == 0 else CODE)) for d in range(docs)])
    ids = np.array([VOCAB.index(x) for x in words])
    return routing(idx, E, weights=w, doc_ids=np.array(doc), positions=pos, domain_ids=np.array(dom), token_ids=ids,
                   dataset_ids=np.zeros(n, int), dataset_names=["planted"], domain_names=["math", "code"]), digit, keyword


RD, DIGIT, KEYWORD = planted()
CARDS = expert_cards(RD, min_count=5)


def _top(cards, expert: int) -> list[str]:
    ids = cards.top_tokens[LAYER, expert]
    return [VOCAB[t] for t in ids[ids >= 0]]


def test_the_planted_experts_list_exactly_their_tokens_by_lift():
    assert set(_top(CARDS, DIGIT_EXPERT)) == DIGITS and set(_top(CARDS, KEYWORD_EXPERT)) == KEYWORDS
    share = DIGIT.mean()  # P(expert 3 selected at layer 1): every digit, nothing else
    m = CARDS.top_tokens[LAYER, DIGIT_EXPERT] >= 0
    assert np.allclose(CARDS.top_lift[LAYER, DIGIT_EXPERT][m], 1 / share)  # count / (occurrences x share)
    assert np.array_equal(CARDS.top_count[LAYER, DIGIT_EXPERT][m], CARDS.top_occurrences[LAYER, DIGIT_EXPERT][m])
    low, high = CARDS.top_lift_low[LAYER, DIGIT_EXPERT][m], CARDS.top_lift_high[LAYER, DIGIT_EXPERT][m]
    assert np.all(low <= 1 / share + 1e-9) and np.all(high >= 1 / share - 1e-9) and np.all(high < 2 / share)
    # an expert that takes tokens at random ranks them near lift 1, never at the planted experts' lift
    assert np.nanmax(CARDS.top_lift[LAYER, 0]) < 0.5 / share


def test_the_planted_experts_show_their_contexts_centred_on_their_tokens():
    for expert, words, domain in ((DIGIT_EXPERT, DIGITS, 0), (KEYWORD_EXPERT, KEYWORDS, 1)):
        ctx = CARDS.ctx_tokens[LAYER, expert]
        w = CARDS.ctx_weight[LAYER, expert]
        assert np.allclose(w, 0.9) and {VOCAB[t] for t in ctx[:, CARDS.window]} <= words
        assert (CARDS.ctx_meta[LAYER, expert, :, 1] == domain).all()  # math documents for digits, code for keywords
        text = MATH if domain == 0 else CODE
        for row, (doc, pos) in zip(ctx, CARDS.ctx_meta[LAYER, expert][:, 2:]):
            shown = [VOCAB[t] for t in row if t >= 0]  # the window, cut at the document's ends
            lo = max(0, pos - CARDS.window)
            assert shown == text[lo:pos + CARDS.window + 1]
    # ties in weight go to the earliest documents, whatever the chunking
    assert list(CARDS.ctx_meta[LAYER, DIGIT_EXPERT, :, 2]) == [0, 0, 0, 0, 0]


def test_shares_per_domain_have_intervals_over_documents():
    share = CARDS.share_domain[:, LAYER, DIGIT_EXPERT]  # of the routed slots: K per token
    math = DIGIT[RD.domain_ids.numpy() == 0].mean() / K
    assert share[0] == pytest.approx(math) and share[1] == 0
    assert CARDS.share_domain_low[0, LAYER, DIGIT_EXPERT] <= math <= CARDS.share_domain_high[0, LAYER, DIGIT_EXPERT]
    assert np.allclose(CARDS.share.sum(-1), 1) and CARDS.datasets == ["planted"]


def test_chunks_and_shares_give_the_same_cards():
    n = RD.num_tokens
    acc = ExpertCardsAccumulator(min_count=5)
    for lo in range(0, n, 17):  # chunks cutting documents anywhere: contexts cross them
        acc.update(RD.select(slice(lo, min(n, lo + 17))))
    cut = 20 * len(MATH) + 20 * len(CODE)  # two shares split between documents
    a, b = ExpertCardsAccumulator(min_count=5), ExpertCardsAccumulator(min_count=5)
    a.update(RD.select(slice(0, cut)))
    b.update(RD.select(slice(cut, n)))
    for got in (acc.result(), merge_all([{"x": a}, {"x": b}])["x"].result()):
        for f in ("top_tokens", "top_lift", "ctx_tokens", "ctx_meta", "ctx_weight", "share_domain", "share_low"):
            assert np.array_equal(getattr(got, f), getattr(CARDS, f), equal_nan=True), f


def test_sparse_counts_stay_bounded_and_say_what_they_dropped():
    sc = SparseCounts(max_entries=12, group=2)  # pruned to 6 keys: groups {0,1} {2,3} {4,5}
    sc.add(np.repeat(np.arange(30), np.r_[np.full(5, 50), np.ones(25, int)]))  # keys 0..4 heavy, 5..29 once
    sc.compact()
    assert len(sc.keys) == 6 and sc.lookup(np.arange(5)).tolist() == [50] * 5 and sc.dropped_below == 2
    rng = np.random.default_rng(0)
    sizes = []
    for copies in (2, 8):
        acc = ExpertCardsAccumulator(max_entries=5000)
        for c in range(copies):
            n = 2000
            acc.update(routing(rng.integers(0, E, (n, L, K)), E, token_ids=rng.integers(0, 5000, n),
                               doc_ids=np.arange(n) // 50 + c * 100, positions=np.arange(n) % 50))
        assert len(acc.pairs.keys) <= 5000 and acc.pairs.pending_size <= 5000
        assert len(acc.occurrences.compact().keys) <= 5000 * 32  # one per (token id, document block) at most
        sizes.append(state_nbytes(acc) - state_nbytes(acc.occurrences))
        assert acc.result().counts_dropped_below > 0
    assert sizes[1] < sizes[0] * 1.5  # 4x the tokens, not 4x the memory


def test_the_payload_is_compact_escaped_and_cut_to_fit():
    payload = expert_cards_payload(CARDS, lambda t: VOCAB[t])
    c = LAYER * E + DIGIT_EXPERT
    toks = payload["tok"][c]
    assert {payload["vocab"][str(t)] for t in toks[::7]} == {w.replace(" ", "␣") for w in DIGITS}
    assert payload["share"]["groups"] == [["all", ""], ["dataset", "planted"], ["domain", "math"], ["domain", "code"]]
    blob = script_json(dict(payload, vocab={"0": "<script>alert(1)</script>&"}))
    assert "<" not in blob and ">" not in blob and "&" not in blob
    small = expert_cards_payload(CARDS, lambda t: VOCAB[t], max_bytes=len(script_json(payload)) // 2)
    assert small["cut"] and len(script_json(small)) <= len(script_json(payload)) // 2
    html, files = expert_cards_html(payload)
    assert files == {}  # small: embedded in the page
    assert "<script>alert(1)" not in html
    data = json.loads(re.search(r"class='ec-data'>(.*?)</script>", html, re.S).group(1))
    assert data["tok"] == payload["tok"]
    html, files = expert_cards_html(payload, embed_bytes=100)  # too big for the page: a script file beside it
    assert "class='ec-data'" not in html and "<script src='data/expert_cards.js'>" in html
    assert json.loads(files["expert_cards.js"].split(" = ", 1)[1].rstrip(";\n")) == json.loads(script_json(payload))


def test_tokens_that_reached_no_expert_give_empty_cards_not_an_error():
    rd = routing(np.full((6, L, K), -1), E, token_ids=np.arange(6), doc_ids=np.zeros(6, int), positions=np.arange(6))
    cards = expert_cards(rd)
    assert (cards.top_tokens == -1).all() and np.isinf(cards.ctx_weight).all() and np.isnan(cards.share).all()
