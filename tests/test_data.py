"""Offline loaders: documented counts and labels, the seed's calls, and bad input."""

import pytest

from data import (
    BUNDLED_NAMES,
    DATASET_NAMES,
    DOMAINS,
    DataError,
    DatasetLoader,
    DatasetSizeWarning,
    Document,
    OfflineUnavailableError,
    UnknownDatasetError,
    UnknownSplitError,
    hub_offline,
    renumber_documents,
)
from data.bundled import bundled_size_bytes

# name -> {split: document count}, domain  (the counts documented in data/README.md)
EXPECTED = {
    "wikitext2": ({"validation": 797, "test": 891}, "general"),
    "gsm8k": ({"train": 7473, "test": 1319}, "math"),
    "humaneval": ({"test": 164}, "code"),
    "python_source": ({"train": 241}, "code"),
    "alice": ({"train": 126}, "stories"),
    "shakespeare": ({"train": 925}, "stories"),
}


@pytest.fixture(scope="module")
def loader():
    return DatasetLoader(offline=True)


def test_tests_run_offline():
    assert hub_offline()
    assert DatasetLoader().offline


def test_known_names():
    assert set(BUNDLED_NAMES) == set(EXPECTED)
    for name in (
        "fineweb",
        "gsm8k",
        "humaneval",
        "tinystories",
        "mmlu_pro_math",
        "mmlu_pro_computer_science",
        "mmlu_pro_physics",
        "mmlu_pro_law",
        "mmlu_pro_psychology",
    ):
        assert name in DATASET_NAMES


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bundled_counts_and_labels(loader, name):
    counts, domain = EXPECTED[name]
    for split, count in counts.items():
        docs = loader.load(name, split)
        assert len(docs) == count
        assert {d.dataset for d in docs} == {name}
        assert {d.domain for d in docs} == {domain}
        assert domain in DOMAINS
        assert [d.doc_id for d in docs] == list(range(count))
        assert all(d.text.strip() for d in docs)
        assert all(d.meta["split"] == split and d.meta["source"] == "bundled" for d in docs)
        report = loader.last_report
        assert (report.available, report.returned, report.skipped_empty) == (count, count, 0)


def test_gsm8k_is_gsm8k_itself(loader):
    doc = loader.load("gsm8k", "test")[0]
    assert doc.text.startswith("Question: Janet\u2019s ducks lay 16 eggs per day.")
    assert doc.meta["final_answer"] == "18"


def test_humaneval_first_problem(loader):
    doc = loader.load("humaneval")[0]
    assert doc.meta["task_id"] == "HumanEval/0"
    assert doc.text.startswith("from typing import List\n\n\ndef has_close_elements(")


def test_python_source_documents_are_definitions(loader):
    docs = loader.load("python_source")
    first = docs[0]
    assert (first.meta["module"], first.meta["name"], first.meta["kind"]) == ("bisect.py", "insort_right", "function")
    assert all(d.text.lstrip().startswith(("def ", "class ", "async def ", "@")) for d in docs)
    for d in docs:
        compile(d.text, d.meta["name"], "exec")  # every document is a complete definition


def test_alice_chunks_stay_in_chapters(loader):
    docs = loader.load("alice")
    assert docs[0].meta["chapter"] == "CHAPTER I. Down the Rabbit-Hole"
    assert docs[0].text.startswith("Alice was beginning to get very tired")
    assert docs[-1].meta["chapter"] == "CHAPTER XII. Alice's Evidence"
    assert docs[-1].text.rstrip().endswith("THE END")
    assert len({d.meta["chapter"] for d in docs}) == 12


def test_sampling_is_seeded_and_keeps_order(loader):
    a = loader.load("gsm8k", "train", num_samples=10, seed=3)
    b = loader.load("gsm8k", "train", num_samples=10, seed=3)
    c = loader.load("gsm8k", "train", num_samples=10, seed=4)
    assert [d.text for d in a] == [d.text for d in b]
    assert [d.text for d in a] != [d.text for d in c]
    idx = [d.meta["index"] for d in a]
    assert idx == sorted(idx) and len(set(idx)) == 10
    first = loader.load("gsm8k", "train", num_samples=3, seed=None)
    assert [d.meta["index"] for d in first] == [0, 1, 2]


def test_seed_readme_calls(loader):
    math_texts, math_meta = loader.load_math_qa_data(num_samples=100)
    code_texts, code_meta = loader.load_code_data(num_samples=100)
    assert len(math_texts) == len(math_meta) == 100
    assert len(code_texts) == len(code_meta) == 100
    assert all(isinstance(t, str) and t for t in math_texts + code_texts)
    assert {m["dataset"] for m in math_meta} == {"gsm8k"} and {m["domain"] for m in math_meta} == {"math"}
    assert {m["dataset"] for m in code_meta} == {"humaneval"} and {m["domain"] for m in code_meta} == {"code"}
    for m in math_meta + code_meta:
        assert {"dataset", "domain", "doc_id", "source", "split"} <= set(m)
    general, meta = loader.load_general_text(num_samples=5)
    assert len(general) == 5 and meta[0]["dataset"] == "wikitext2"
    stories, meta = loader.load_story_data(num_samples=5, dataset="shakespeare")
    assert len(stories) == 5 and meta[0]["domain"] == "stories"


def test_load_datasets_gives_unique_ids(loader):
    docs = loader.load_datasets(["gsm8k", "humaneval", "alice"], num_samples_per_dataset=4, seed=1)
    assert [d.doc_id for d in docs] == list(range(12))
    assert [d.dataset for d in docs] == ["gsm8k"] * 4 + ["humaneval"] * 4 + ["alice"] * 4
    split_docs = loader.load_datasets(["gsm8k"], 2, splits={"gsm8k": "train"})
    assert {d.meta["split"] for d in split_docs} == {"train"}
    with pytest.raises(DataError, match="repeat"):
        loader.load_datasets(["gsm8k", "gsm8k"], 2)
    with pytest.raises(DataError, match="non-empty list"):
        loader.load_datasets("gsm8k", 2)


def test_unknown_name_lists_known(loader):
    with pytest.raises(UnknownDatasetError, match="known datasets: .*gsm8k.*humaneval"):
        loader.load("gsm9k")
    assert isinstance(UnknownDatasetError("x"), ValueError)


def test_unknown_split(loader):
    with pytest.raises(UnknownSplitError, match="splits: train, test"):
        loader.load("gsm8k", "validation")


def test_bad_num_samples(loader):
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(DataError, match="num_samples"):
            loader.load("alice", num_samples=bad)
    assert loader.load("alice", num_samples=0) == []


def test_too_many_samples_warns_and_returns_all(loader):
    with pytest.warns(DatasetSizeWarning, match="humaneval \\(test\\) has only 164 documents; returning all 164"):
        docs = loader.load("humaneval", num_samples=1000)
    assert len(docs) == 164


@pytest.mark.parametrize(
    "name,alternative", [("fineweb", "wikitext2"), ("tinystories", "alice"), ("mmlu_pro_math", "gsm8k")]
)
def test_hub_only_names_fail_offline_naming_the_bundled_alternative(loader, name, alternative):
    with pytest.raises(OfflineUnavailableError, match=f"use the bundled '{alternative}' instead"):
        loader.load(name, num_samples=5)


def test_hub_only_name_without_alternative(loader):
    with pytest.raises(OfflineUnavailableError, match="only on the Hugging Face Hub \\(TIGER-Lab/MMLU-Pro\\)"):
        loader.load("mmlu_pro_law", num_samples=5)
    with pytest.raises(OfflineUnavailableError, match="wikitext2"):
        loader.load_fineweb_data(num_samples=5)


def test_available_names_offline(loader):
    assert set(loader.available_names()) == set(BUNDLED_NAMES)


def test_renumber_and_document_validation():
    docs = [Document("a", "x", "general", 7), Document("b", "y", "math", 7)]
    assert [d.doc_id for d in renumber_documents(docs, start=10)] == [10, 11]
    assert docs[1].metadata() == {"dataset": "y", "domain": "math", "doc_id": 7}
    with pytest.raises(DataError, match="doc_id"):
        Document("a", "x", "general", -1)
    with pytest.raises(DataError, match="dataset and domain"):
        Document("a", "", "general", 0)


def test_bundle_is_small():
    assert bundled_size_bytes() < 10 * 1024 * 1024
