"""The online path: ``datasets.load_dataset`` pointed at local files runs the same loader code."""

import json
from dataclasses import replace

import pytest

from data import (
    DataError,
    DatasetLoader,
    DatasetSizeWarning,
    HubLoadError,
    default_registry,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def local_loader(tmp_path, name, data_files, **hub_changes):
    """A loader whose ``name`` reads ``data_files`` through ``datasets.load_dataset("json", ...)``."""
    registry = default_registry()
    spec = registry[name]
    registry[name] = replace(
        spec, hub=replace(spec.hub, path="json", config=None, data_files=data_files, **hub_changes)
    )
    return DatasetLoader(offline=False, registry=registry, cache_dir=str(tmp_path / "cache"), prefer_hub=True)


def test_gsm8k_online_matches_bundled(tmp_path):
    offline = DatasetLoader(offline=True)
    bundled_rows = list(offline.registry["gsm8k"].bundled("test"))[:20]
    loader = local_loader(tmp_path, "gsm8k", {"test": write_jsonl(tmp_path / "gsm8k.jsonl", bundled_rows)})
    online = loader.load("gsm8k", "test")
    assert loader.last_report.source == "hub:json"
    expected = offline.load("gsm8k", "test", num_samples=20, seed=None)
    assert [d.text for d in online] == [d.text for d in expected]
    assert {d.domain for d in online} == {"math"}


def test_wikitext_online_lines_give_same_documents(tmp_path):
    offline = DatasetLoader(offline=True)
    lines = list(offline.registry["wikitext2"].bundled("validation"))[:200]
    loader = local_loader(tmp_path, "wikitext2", {"validation": write_jsonl(tmp_path / "wiki.jsonl", lines)})
    online = loader.load("wikitext2", "validation")
    parsed = list(offline.registry["wikitext2"].parse(lines))
    assert [d.text for d in online] == [t for t, _ in parsed]
    assert online[0].meta["title"] == "Homarus gammarus"


def test_mmlu_pro_subject_filter_and_empty_count(tmp_path):
    rows = [
        {
            "question_id": i,
            "question": f"Q{i}" if i != 2 else "  ",
            "options": ["yes", "no"],
            "answer": "A",
            "answer_index": 0,
            "category": "law" if i % 2 == 0 else "physics",
            "src": "s",
        }
        for i in range(10)
    ]
    loader = local_loader(tmp_path, "mmlu_pro_law", {"test": write_jsonl(tmp_path / "mmlu.jsonl", rows)})
    docs = loader.load("mmlu_pro_law")
    assert [d.meta["question_id"] for d in docs] == [0, 4, 6, 8]
    assert docs[0].text == "Q0\nA. yes\nB. no" and docs[0].domain == "law"
    assert loader.last_report.skipped_empty == 1 and loader.last_report.available == 4


def test_fineweb_streamed_sample(tmp_path):
    rows = [{"text": "" if i % 5 == 0 else f"web page {i}", "id": str(i), "url": f"http://x/{i}"} for i in range(30)]
    files = {"train": write_jsonl(tmp_path / "web.jsonl", rows)}
    loader = local_loader(tmp_path, "fineweb", files, shuffle_buffer=8)
    a = loader.load("fineweb", num_samples=6, seed=1)
    b = loader.load("fineweb", num_samples=6, seed=1)
    assert [d.text for d in a] == [d.text for d in b] and len(a) == 6
    assert all(d.text.startswith("web page") and d.domain == "general" for d in a)
    assert loader.last_report.available is None  # the stream was not read to its end
    first = loader.load("fineweb", num_samples=3, seed=None)
    assert [d.meta["id"] for d in first] == ["1", "2", "3"]  # "0" is empty, skipped
    assert loader.last_report.skipped_empty == 1
    with pytest.warns(DatasetSizeWarning, match="has only 24 documents; returning all 24 instead of 100"):
        everything = loader.load("fineweb", num_samples=100, seed=None)
    assert len(everything) == 24 and loader.last_report.skipped_empty == 6
    texts, meta = loader.load_fineweb_data(num_samples=2)
    assert len(texts) == 2 and meta[0]["dataset"] == "fineweb" and meta[0]["source"] == "hub:json"
    with pytest.raises(DataError, match="streamed from the Hub; pass num_samples"):
        loader.load("fineweb")


def test_hub_failure_is_a_clear_error(tmp_path):
    loader = local_loader(tmp_path, "gsm8k", {"test": str(tmp_path / "missing.jsonl")})
    with pytest.raises(HubLoadError, match="could not load 'gsm8k' from the Hugging Face Hub.*offline=True"):
        loader.load("gsm8k")


def test_bundled_only_names_load_online():
    loader = DatasetLoader(offline=False)
    assert len(loader.load("alice", num_samples=3)) == 3
    assert loader.last_report.source == "bundled"
    assert "fineweb" in loader.available_names()


def test_bundled_gsm8k_and_humaneval_are_read_first_without_a_hub_round_trip(monkeypatch):
    """Reproduction: with the Hub unreachable and HF_HUB_OFFLINE unset, load_math_qa_data waited ~30 s, then failed."""
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_hub(*a, **k):
        raise AssertionError("the Hub was asked for a dataset that is bundled")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    loader = DatasetLoader()
    texts, meta = loader.load_math_qa_data(num_samples=5)
    assert len(texts) == 5 and loader.last_report.source == "bundled" and meta[0]["domain"] == "math"
    code, _ = loader.load_code_data(num_samples=3)
    assert len(code) == 3 and loader.last_report.source == "bundled"
