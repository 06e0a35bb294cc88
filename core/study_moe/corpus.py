"""The bundled multi-domain corpus the toolkit's own MoE is trained on: loaded, split, tokenized.

Every split holds every domain in proportion, and the BPE tokenizer is trained on the training
split only, so validation and test text is never seen by the tokenizer or the model. The last
documents of the splits named in ``TrainConfig.held_out`` are never loaded at all: they are
the main run's held-out analysis data (``core.study_moe.training_data`` records which is which).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field

from core.study_moe.config import TrainConfig
from core.study_moe.tokenizer import train_bpe_tokenizer


@dataclass
class Corpus:
    """One run's documents, split, and per corpus entry where they came from and what was held out."""

    train: list
    val: list
    test: list
    sources: list[dict] = field(default_factory=list)  # dataset, split, available, held_out (indices)


def held_out_count(held_out: dict[str, int] | None, name: str, split: str, default_split: str) -> int:
    """How many trailing documents of ``name:split`` training must not read (a bare name means its default split)."""
    held_out = held_out or {}
    if f"{name}:{split}" in held_out:
        return held_out[f"{name}:{split}"]
    return held_out.get(name, 0) if split == default_split else 0


def load_corpus(
    entries: list[str], max_docs: int | None, seed: int, held_out: dict[str, int] | None = None
) -> tuple[list, list[dict]]:
    """Bundled documents for ``"name"``/``"name:split"`` entries (unique doc ids), and their sources.

    The last ``held_out[name:split]`` documents of a split are left out before sampling.
    """
    from data.dataset_loader import DatasetLoader
    from data.documents import renumber_documents, text_digest
    from data.errors import DatasetSizeWarning

    loader = DatasetLoader(offline=True)
    docs, sources = [], []
    for entry in entries:
        name, _, split = entry.partition(":")
        split = split or loader.spec(name).default_split
        everything = loader.load(name, split)
        n_held = min(held_out_count(held_out, name, split, loader.spec(name).default_split), len(everything))
        reserved = everything[len(everything) - n_held :]
        with warnings.catch_warnings():  # a cap above a small dataset's size simply takes it all
            warnings.simplefilter("ignore", DatasetSizeWarning)
            docs.extend(loader.load(name, split, num_samples=max_docs, seed=seed,
                                    exclude={text_digest(d.text) for d in reserved}))
        sources.append({"dataset": name, "split": split, "available": len(everything),
                        "held_out": [d.meta["index"] for d in reserved]})
    return renumber_documents(docs), sources


def split_documents(docs: list, val_fraction: float, test_fraction: float, seed: int) -> tuple[list, list, list]:
    """Shuffle, then split per domain so every split holds every domain in proportion."""
    rng = random.Random(seed)
    train, val, test = [], [], []
    for domain in sorted({d.domain for d in docs}):
        group = [d for d in docs if d.domain == domain]
        rng.shuffle(group)
        n_val = max(1, round(len(group) * val_fraction))
        n_test = max(1, round(len(group) * test_fraction))
        val += group[:n_val]
        test += group[n_val : n_val + n_test]
        train += group[n_val + n_test :]
    for part in (train, val, test):
        rng.shuffle(part)  # packed rows then mix domains, so the first eval rows cover all
    return train, val, test


def corpus_documents(cfg: TrainConfig) -> Corpus:
    """The run's documents, split into train/val/test (no tokenizer: cheap, and what the record lists)."""
    docs, sources = load_corpus(cfg.corpus, cfg.max_docs_per_dataset, cfg.seed, cfg.held_out)
    train, val, test = split_documents(docs, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return Corpus(train, val, test, sources)


def prepare_data(cfg: TrainConfig):
    """Corpus -> tokenizer -> ``TokenizedDataset`` splits: packed train/test, domain-balanced val.

    Returns ``(tokenizer, splits, corpus)``; ``corpus`` says which documents the run read.
    """
    from data.tokenization import tokenize_documents

    corpus = corpus_documents(cfg)
    train_docs, val_docs, test_docs = corpus.train, corpus.val, corpus.test
    docs = train_docs + val_docs + test_docs
    sample, chars = [], 0
    for d in train_docs:  # already shuffled: the sample covers every domain
        if chars >= cfg.tokenizer_train_chars:
            break
        sample.append(d.text)
        chars += len(d.text)
    tokenizer = train_bpe_tokenizer(sample, vocab_size=cfg.vocab_size)
    domains = sorted({d.domain for d in docs})
    datasets = sorted({d.dataset for d in docs})
    splits = {
        name: tokenize_documents(part, tokenizer, cfg.seq_len, pack=True, domain_names=domains, dataset_names=datasets)
        for name, part in (("train", train_docs), ("test", test_docs))
    }
    # evaluation during training: the same few documents of every domain, one row each
    eval_docs = [d for dom in domains for d in [v for v in val_docs if v.domain == dom][: cfg.eval_docs_per_domain]]
    splits["val"] = tokenize_documents(eval_docs, tokenizer, cfg.seq_len, pack=False, domain_names=domains, dataset_names=datasets)
    return tokenizer, splits, corpus
