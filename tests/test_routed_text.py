"""Text coloured by routing: the documents kept (which, in what order, bounded), and the page's escaped data."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest

from core.analysis.routed_text import RoutedTextAccumulator, routed_text
from core.analysis.streaming import merge_all, state_nbytes
from tests.fakes import routing
from viz.report import Report
from viz.routed_text import PALETTE, expert_colour, routed_text_html, routed_text_payload

E, K, L = 8, 2, 3


def _docs(lengths: list[int], domains: list[int], seed: int = 0, vocab: int = 50):
    """Documents of the given lengths and domains, one after another; top-1 expert at every layer = doc id mod E."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    idx = np.zeros((n, L, K), int)
    idx[..., 0] = (doc % E)[:, None]
    idx[..., 1] = ((doc + 1) % E)[:, None]
    w = np.zeros((n, L, K))
    w[..., 0], w[..., 1] = 0.7, 0.3
    pos = np.concatenate([np.arange(m) for m in lengths])
    return routing(idx, E, weights=w, doc_ids=doc, positions=pos, domain_ids=np.asarray(domains)[doc],
                   token_ids=rng.integers(0, vocab, n), dataset_ids=np.zeros(n, int), domain_names=["math", "code"],
                   dataset_names=["ds"])


LENGTHS, DOMAINS = [5, 30, 7, 9, 4, 12, 8], [0, 0, 1, 0, 1, 1, 0]


def test_keeps_the_first_documents_of_each_domain_in_stream_order_cut_at_max_tokens():
    rd = _docs(LENGTHS, DOMAINS)
    text = routed_text(rd.iter_chunks(6), docs_per_domain=2, max_tokens=10)
    assert text.doc_id.tolist() == [0, 1, 2, 4]  # math: docs 0, 1; code: docs 2, 4 (domain order, then stream order)
    assert text.doc_domain == ["math", "math", "code", "code"]
    assert np.diff(text.doc_start).tolist() == [5, 10, 7, 4]  # doc 1 cut at 10 tokens
    ids = rd.token_ids.numpy()
    assert text.token_ids[text.document(1)].tolist() == ids[5:15].tolist()
    assert text.positions[text.document(1)].tolist() == list(range(10))
    assert (text.experts[text.document(2)][..., 0] == 2).all() and np.allclose(text.weights[..., 0], 0.7)


def test_shares_merged_equal_one_pass():
    rd = _docs(LENGTHS, DOMAINS)
    one = routed_text(rd.iter_chunks(4), 2, 10)
    cut = sum(LENGTHS[:3])
    a, b = RoutedTextAccumulator(2, 10), RoutedTextAccumulator(2, 10)
    for c in rd.select(slice(0, cut)).iter_chunks(5):
        a.update(c)
    for c in rd.select(slice(cut, None)).iter_chunks(3):
        b.update(c)
    merged = merge_all([{"x": a}, {"x": b}])["x"].result()
    assert merged.doc_id.tolist() == one.doc_id.tolist()
    for name in ("doc_start", "token_ids", "positions", "experts", "weights"):
        assert np.array_equal(getattr(merged, name), getattr(one, name)), name


def test_memory_is_bounded_whatever_the_size_of_the_data():
    small, big = RoutedTextAccumulator(2, 10), RoutedTextAccumulator(2, 10)
    for c in _docs(LENGTHS, DOMAINS).iter_chunks(8):
        small.update(c)
    for c in _docs([40] * 300, [i % 2 for i in range(300)], seed=1).iter_chunks(500):
        big.update(c)
    assert big.num_tokens > 100 * small.num_tokens
    assert big.result().token_ids.size == 40 and len(big.kept) == 4
    assert state_nbytes(big) <= 2 * state_nbytes(small) + 4096


def test_refuses_routing_without_document_ids():
    rd = _docs([4], [0])
    rd.doc_ids = None
    with pytest.raises(ValueError, match="doc_ids"):
        routed_text(rd)


VOCAB = ["x", " = ", "<script>alert(1)</script>", "\n", "7", "def", " the", "&amp;"]


def _page(tmp_path, text, decode):
    payload = routed_text_payload(text, decode)
    report = Report("t", plotlyjs="file")
    report.add_html("Text", routed_text_html(payload, "routed-text"), "routed_text", data=payload)
    return payload, report.write(tmp_path).read_text()


def test_the_page_holds_the_tokens_escaped_and_each_tokens_experts_and_weights(tmp_path):
    n = len(VOCAB)
    idx = np.stack([np.stack([np.arange(n) % E, (np.arange(n) + 3) % E], -1)] * L, 1)
    w = np.broadcast_to(np.array([0.25, 0.75]), (n, L, K)).copy()  # the heavier slot recorded second: the page puts it first
    rd = routing(idx, E, weights=w, doc_ids=np.zeros(n, int), positions=np.arange(n), domain_ids=np.zeros(n, int),
                 token_ids=np.arange(n), domain_names=["web"])
    payload, page = _page(tmp_path, routed_text(rd), lambda t: VOCAB[t])
    assert "<script>alert(1)" not in page and "&amp;amp;" not in page
    blob = re.search(r"<script type='application/json' class='rt-data'>(.*?)</script>", page, re.S).group(1)
    assert "<" not in blob and "&" not in blob
    doc = json.loads(blob)["docs"][0]
    assert doc == payload["docs"][0]
    assert doc["tokens"] == ["x", "␣=␣", "<script>alert(1)</script>", "\\n", "7", "def", "␣the", "&amp;"]
    assert doc["br"] == [3]  # a line break after the newline token
    t = 2  # the script token: layer 1, its k slots heaviest first, weights in thousandths
    assert doc["e"][(t * L + 1) * K:(t * L + 2) * K] == [5, 2] and doc["w"][(t * L + 1) * K:(t * L + 2) * K] == [750, 250]
    assert html.escape("web") in page and "routed-text" in page


def test_a_planted_digit_expert_and_keyword_expert_colour_exactly_their_tokens():
    """Issue 30's acceptance: expert 3 takes exactly the digits, expert 5 exactly the Python keywords, at layer 1."""
    words = ["def", " f", "(", "x", "):", "\n", "    ", "return", " x", " +", " ", "1", "2", "\n", "if", " 3", "7", " in", " y"]
    vocab = sorted(set(words))
    ids = np.array([vocab.index(w) for w in words])
    n = len(ids)
    digit = np.array([w.strip().isdigit() for w in words])
    keyword = np.array([w.strip() in ("def", "return", "if", "in") for w in words])
    rng = np.random.default_rng(0)
    top = rng.choice([0, 1, 2, 4, 6, 7], size=(n, L))
    top[digit, 1], top[keyword, 1] = 3, 5
    idx = np.stack([top, (top + 1) % E], -1)
    w = np.broadcast_to(np.array([0.6, 0.4]), (n, L, K)).copy()
    rd = routing(idx, E, weights=w, doc_ids=np.zeros(n, int), positions=np.arange(n), domain_ids=np.zeros(n, int),
                 token_ids=ids, domain_names=["code"])
    doc = routed_text_payload(routed_text(rd), lambda t: vocab[t])["docs"][0]
    first = np.array(doc["e"]).reshape(n, L, K)[:, 1, 0]
    assert np.array_equal(first == 3, digit) and np.array_equal(first == 5, keyword)
    shown = [expert_colour(int(e)) for e in first]
    assert {c for c, d in zip(shown, digit) if d} == {PALETTE[3]}
    assert [doc["tokens"][i] for i in np.nonzero(first == 3)[0]] == ["1", "2", "␣3", "7"]


def test_documents_are_cut_evenly_to_keep_the_page_small():
    text = routed_text(_docs([50, 50], [0, 1]), 2, 200)
    whole = routed_text_payload(text, None)
    assert not whole["cut"] and [len(d["tokens"]) for d in whole["docs"]] == [50, 50]
    size = len(json.dumps(whole, separators=(",", ":")))
    payload = routed_text_payload(text, None, max_bytes=size // 2)
    n = len(payload["docs"][0]["tokens"])
    assert payload["cut"] and 15 <= n < 25 and [len(d["tokens"]) for d in payload["docs"]] == [n, n]
    assert len(payload["docs"][0]["e"]) == n * L * K and len(json.dumps(payload, separators=(",", ":"))) <= size // 2


def test_the_registered_spec_adds_the_section_with_tokens_decoded(tmp_path):
    """The run's report: the spec's hook draws the section with the run's tokenizer (``decode``), escaped."""
    from core.pipeline.outputs import build_report
    from core.pipeline.record import RunRecord

    n = len(VOCAB)
    rd = routing(np.stack([np.stack([np.arange(n) % E, (np.arange(n) + 1) % E], -1)] * L, 1), E,
                 doc_ids=np.zeros(n, int), positions=np.arange(n), domain_ids=np.zeros(n, int), token_ids=np.arange(n),
                 domain_names=["web"])
    record = RunRecord(options={}, model={"name": "planted"}, datasets=("d",), tokens={"d": n}, checkpoints=(),
                       results={"routed_text": routed_text(rd)})
    report, _ = build_report(record, decode=lambda t: VOCAB[t])
    page = report.write(tmp_path).read_text()
    assert "<h2>Text coloured by routing</h2>" in page and "id='routed-text'" in page
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in page and "<script>alert(1)" not in page
    saved = json.loads((tmp_path / "data" / "routed_text.json").read_text())
    assert saved["docs"][0]["tokens"][2] == VOCAB[2] and saved["docs"][0]["e"][:2] == [0, 1]
