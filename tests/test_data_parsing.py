"""The splitting rules that turn rows into documents, on small inputs with known answers."""

import pytest

from data.parsing import (
    chunk_paragraphs,
    parse_alice,
    parse_gsm8k,
    parse_humaneval,
    parse_mmlu_pro,
    parse_python_source,
    parse_shakespeare,
    parse_text_rows,
    parse_wikitext,
)


def test_chunk_paragraphs_greedy_with_merged_tail():
    # 6 + 6 chars joined by "|" reach 10 -> one chunk; "ccccc" (5) is >= 10 // 4 -> its own chunk
    assert chunk_paragraphs(["aaaaaa", "bbbbbb", "ccccc"], min_chars=10, sep="|") == ["aaaaaa|bbbbbb", "ccccc"]
    # a tail shorter than a quarter joins the previous chunk
    assert chunk_paragraphs(["aaaaaaaaaaaa", "b"], min_chars=10, sep="|") == ["aaaaaaaaaaaa|b"]
    # a short group on its own is still one chunk
    assert chunk_paragraphs(["x"], min_chars=10) == ["x"]
    assert chunk_paragraphs([], min_chars=10) == []
    with pytest.raises(ValueError, match="min_chars"):
        chunk_paragraphs(["x"], min_chars=0)


def test_wikitext_articles_and_headings():
    long = "word " * 250  # 1250 chars: one chunk per paragraph
    lines = ["\ufeff ", " = First = ", "", f" {long} ", " = = Section = = ", " short one ", " = Second = ", " tiny "]
    docs = list(parse_wikitext({"text": line} for line in lines))
    assert [m["title"] for _, m in docs] == ["First", "Second"]
    assert docs[0][0] == long.strip() + "\nshort one"  # "short one" is a tail shorter than 250 chars
    assert docs[1] == ("tiny", {"title": "Second", "chunk": 0})


def test_alice_chapters():
    text = "CHAPTER I. One\n\npara a\n\npara b\n\nCHAPTER II. Two\n\npara c\n"
    docs = list(parse_alice([{"text": text}]))
    assert docs == [
        ("para a\n\npara b", {"chapter": "CHAPTER I. One", "chunk": 0}),
        ("para c", {"chapter": "CHAPTER II. Two", "chunk": 0}),
    ]


def test_shakespeare_speeches():
    speech = "A:\n" + "x" * 600
    docs = list(parse_shakespeare([{"text": f"{speech}\n\n{speech}\n\n{speech}\n"}]))
    assert [t for t, _ in docs] == [f"{speech}\n\n{speech}", speech]


def test_python_source_definitions():
    source = "import os\n\n@decorator\ndef f(x):\n    return x\n\nX = 1\n\nclass C:\n    pass\n"
    docs = list(parse_python_source([{"module": "m.py", "source": source}]))
    assert docs == [
        ("@decorator\ndef f(x):\n    return x\n", {"module": "m.py", "name": "f", "kind": "function", "lineno": 3}),
        ("class C:\n    pass\n", {"module": "m.py", "name": "C", "kind": "class", "lineno": 9}),
    ]


def test_gsm8k_and_humaneval_rows():
    ((text, meta),) = parse_gsm8k([{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    assert text == "Question: 1+1?\nAnswer: 1+1=2\n#### 2" and meta["final_answer"] == "2"
    assert list(parse_gsm8k([{"question": " ", "answer": ""}]))[0][0] == ""
    row = {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n", "entry_point": "f"}
    assert list(parse_humaneval([row])) == [("def f():\n    return 1\n", {"task_id": "T/0", "entry_point": "f"})]


def test_text_rows_and_mmlu_filter():
    rows = [{"text": "hello", "id": "a", "url": "u"}, {"text": None, "id": "b"}]
    assert list(parse_text_rows("id")(rows)) == [("hello", {"id": "a"}), ("", {"id": "b"})]
    mmlu = [
        {
            "question": "Q1",
            "options": ["x", "y"],
            "answer": "B",
            "answer_index": 1,
            "category": "law",
            "question_id": 1,
        },
        {"question": "Q2", "options": ["z"], "answer": "A", "answer_index": 0, "category": "math", "question_id": 2},
    ]
    ((text, meta),) = parse_mmlu_pro("law")(mmlu)
    assert text == "Q1\nA. x\nB. y"
    assert meta == {"question_id": 1, "category": "law", "answer": "B", "answer_index": 1}
