"""Held-out data (issue 12): the main run never analyses a document the embedded model was trained on,
and every training run records which documents it read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core.study_moe.config import DEFAULT_CONFIG, TrainConfig
from core.study_moe.corpus import corpus_documents, held_out_count
from core.study_moe.training_data import (
    RECORD_NAME,
    TrainingDataError,
    build_record,
    describe_indices,
    index_ranges,
    read_record,
    training_data_note,
    training_digests,
    write_record,
)
from data import DataError, DatasetLoader, text_digest
from core.pipeline.targets import ModelTarget, load_tokenized, training_exclusion
from core.pipeline.options import make_options
from tests.shared_runs import micro_models_copy

MICRO = Path(__file__).resolve().parents[1] / "configs" / "train_micro.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    from core.study_moe.tokenizer import train_bpe_tokenizer

    sample = [d.text for d in DatasetLoader(offline=True).load("wikitext2", "validation", num_samples=40)]
    return train_bpe_tokenizer(sample, vocab_size=400)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default's corpus and record, without training it (the data choice is all that matters here)."""
    cfg = TrainConfig.from_yaml(DEFAULT_CONFIG)
    corpus = corpus_documents(cfg)
    run_dir = tmp_path_factory.mktemp("models") / cfg.run_name
    write_record(run_dir, build_record(cfg, corpus, {"train": 1000, "val": 100, "test": 100}))
    (run_dir / "run_info.json").write_text("{}")
    return cfg, corpus, run_dir


def embedded_target(run_dir: Path) -> ModelTarget:
    return ModelTarget(name=f"embedded/{run_dir.name}", source=str(run_dir), revision=None, checkpoints=[],
                       embedded=True, run_dir=run_dir)


# ------------------------------------------------------------------ the data layer
def test_loader_leaves_out_excluded_documents_before_sampling():
    loader = DatasetLoader(offline=True)
    everything = loader.load("humaneval")
    exclude = {text_digest(d.text) for d in everything[:100]}
    kept = loader.load("humaneval", exclude=exclude)
    assert [d.meta["index"] for d in kept] == list(range(100, 164))  # indices stay positions in the split
    assert loader.last_report.excluded == 100 and loader.last_report.available == 164
    sample = loader.load("humaneval", num_samples=10, seed=3, exclude=exclude)
    assert sample == loader.load("humaneval", num_samples=10, seed=3, exclude=exclude), "deterministic"
    assert all(d.meta["index"] >= 100 for d in sample)
    both = loader.load_datasets(["humaneval", "gsm8k"], num_samples_per_dataset=80, exclude=exclude)
    assert not {text_digest(d.text) for d in both} & exclude


def test_held_out_count_reads_name_or_name_and_split():
    rule = {"wikitext2:test": 5, "humaneval": 3}
    assert held_out_count(rule, "wikitext2", "test", "test") == 5
    assert held_out_count(rule, "wikitext2", "validation", "test") == 0
    assert held_out_count(rule, "humaneval", "test", "test") == 3
    assert held_out_count(None, "humaneval", "test", "test") == 0
    with pytest.raises(ValueError, match="held_out"):
        TrainConfig.from_dict({"held_out": {"wikitext2:test": -1}})


def test_index_ranges_and_their_description():
    assert index_ranges([5, 0, 1, 2, 2]) == [[0, 2], [5, 5]]
    assert describe_indices([[0, 690]]) == "docs 0–690"
    assert describe_indices([[0, 796]], available=797) == "all 797 docs"
    assert describe_indices([[0, 1], [3, 3], [5, 6], [9, 9]], available=20) == "6 of 20 docs"


# ------------------------------------------------------------------ the embedded default
def test_the_main_run_analyses_only_documents_the_default_model_never_read(default_run, tokenizer):
    cfg, corpus, run_dir = default_run
    opts = make_options()  # the main run's defaults: wikitext2, gsm8k, humaneval, shakespeare on the embedded model
    exclusion = training_exclusion(embedded_target(run_dir))
    analysed = load_tokenized(opts, tokenizer, exclude=exclusion)
    training_texts = {d.text for part in (corpus.train, corpus.val, corpus.test) for d in part}
    for name, tok in analysed.items():
        texts = {d.text for d in tok.documents}
        assert texts, f"{name}: nothing held out"
        assert not texts & training_texts, f"{name}: analysed documents the model was trained on"
    # enough held-out text for the default sizes, chosen the same way every time
    counts = {n: len(t.documents) for n, t in analysed.items()}
    assert counts == {"wikitext2": 200, "gsm8k": 200, "humaneval": 64, "shakespeare": 200}
    # prose, math, code and literature keep their domain labels
    assert {n: {d.domain for d in t.documents} for n, t in analysed.items()} == {
        "wikitext2": {"general"}, "gsm8k": {"math"}, "humaneval": {"code"}, "shakespeare": {"stories"}}
    again = load_tokenized(opts, tokenizer, exclude=exclusion)
    assert all([d.text for d in again[n].documents] == [d.text for d in analysed[n].documents] for n in analysed)
    assert {d.meta["index"] for d in analysed["humaneval"].documents} == set(range(100, 164))
    assert {d.meta["index"] for d in analysed["shakespeare"].documents} == set(range(725, 925))
    note = training_data_note(run_dir, analysed)
    assert "\n" not in note and "held-out documents only" in note
    assert "humaneval test docs 0–99" in note and "humaneval test docs 100–163" in note


def test_without_exclusion_the_old_overlap_is_there(default_run, tokenizer):
    """The check above has teeth: the unfiltered selection overlaps the training corpus."""
    _, corpus, _ = default_run
    analysed = load_tokenized(make_options(), tokenizer)
    training_texts = {d.text for part in (corpus.train, corpus.val, corpus.test) for d in part}
    assert {d.text for d in analysed["humaneval"].documents} & training_texts
    note = training_data_note(default_run[2], analysed)
    assert "of which" in note and "were in the training corpus" in note


def test_record_lists_every_document_the_default_run_read(default_run):
    _, corpus, run_dir = default_run
    record = read_record(run_dir)
    n_docs = len(corpus.train) + len(corpus.val) + len(corpus.test)
    assert len(record["digests"]) == n_docs == sum(s["documents"] for s in record["sources"])
    by_name = {(s["dataset"], s["split"]): s for s in record["sources"]}
    assert by_name[("wikitext2", "test")]["held_out"] == [[691, 890]]
    assert by_name[("humaneval", "test")]["held_out"] == [[100, 163]]
    assert by_name[("shakespeare", "train")]["held_out"] == [[725, 924]]
    assert by_name[("gsm8k", "train")]["held_out"] == []
    assert training_digests(run_dir) == frozenset(text_digest(d.text) for d in corpus.train + corpus.val + corpus.test)


def test_a_dataset_wholly_in_training_is_a_clear_error(default_run, tokenizer):
    opts = make_options(datasets=["alice"])
    with pytest.raises(DataError, match="alice"):
        load_tokenized(opts, tokenizer, exclude=training_exclusion(embedded_target(default_run[2])))


# ------------------------------------------------------------------ a real (micro) training run
def test_training_writes_the_record_and_old_runs_are_unknown(tmp_path):
    from core.study_moe.training import ensure_default_model

    raw = yaml.safe_load(MICRO.read_text())
    raw.update(steps=3, warmup_steps=1, eval_every=3, num_checkpoints=2, run_name="held-out-micro")
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = ensure_default_model(tmp_path / "models", config=config, progress=False)
    record = json.loads((run_dir / RECORD_NAME).read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    assert record["tokens"] == info["corpus_tokens"] and record["tokens_processed"] == 3 * 8 * 32
    note = training_data_note(run_dir)
    assert note.startswith("trained on wikitext2 test") and "\n" not in note
    assert "held out for analysis: wikitext2 test docs 691–890" in note

    (run_dir / RECORD_NAME).unlink()  # a run folder written by older code
    assert training_data_note(run_dir).startswith("training data unknown")
    assert training_digests(run_dir) is None
    assert ensure_default_model(tmp_path / "models", config=config, progress=False) == run_dir
    assert (run_dir / RECORD_NAME).is_file(), "an unrecorded embedded model is retrained"


def test_note_is_none_for_a_model_the_toolkit_did_not_train(tmp_path):
    assert training_data_note(None) is None
    assert training_data_note(tmp_path) is None  # e.g. a Hub model saved locally
    (tmp_path / "run_info.json").write_text("{}")
    (tmp_path / RECORD_NAME).write_text("{not json")
    assert training_data_note(tmp_path).startswith("training data unknown")
    with pytest.raises(TrainingDataError):
        training_digests(tmp_path)


class _StopAfterDataSelection(Exception):
    pass


def test_the_main_run_itself_analyses_held_out_documents(tmp_path, tmp_path_factory, monkeypatch):
    """The run's own data-selection step (micro embedded model): it passes the model's training documents as the exclusion."""
    import core.pipeline.targets as collection
    from core.pipeline.run import BasicRoutingAnalysis

    seen = {}
    real = collection.load_tokenized

    def spy(opts, tokenizer, loader=None, exclude=None):
        seen["exclude"], seen["tokenized"] = exclude, real(opts, tokenizer, loader, exclude)
        raise _StopAfterDataSelection

    monkeypatch.setattr(collection, "load_tokenized", spy)
    micro_models_copy(tmp_path_factory, tmp_path / "models")  # the embedded micro model, trained once per session
    with pytest.raises(_StopAfterDataSelection):
        BasicRoutingAnalysis(micro=True, models_dir=str(tmp_path / "models"), results_dir=str(tmp_path / "results"),
                             progress=False).run()
    run_dir = tmp_path / "models" / "study-moe-micro"
    assert seen["exclude"] == training_digests(run_dir) and seen["exclude"]
    corpus = corpus_documents(TrainConfig.from_yaml(MICRO))
    training_texts = {d.text for part in (corpus.train, corpus.val, corpus.test) for d in part}
    assert {text_digest(t) for t in training_texts} == seen["exclude"], "the record lists exactly the corpus"
    for name, tok in seen["tokenized"].items():
        assert tok.documents and not {d.text for d in tok.documents} & training_texts, name
    assert "held-out documents only" in training_data_note(run_dir, seen["tokenized"])
