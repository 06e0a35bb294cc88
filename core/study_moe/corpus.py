"""The bundled multi-domain corpus the toolkit's own MoE is trained on: loaded, split, tokenized.

Every split holds every domain in proportion, and the BPE tokenizer is trained on the training
split only, so validation and test text is never seen by the tokenizer or the model.
"""

from __future__ import annotations

import random
import warnings

from core.study_moe.config import TrainConfig
from core.study_moe.tokenizer import train_bpe_tokenizer


def load_corpus(entries: list[str], max_docs: int | None, seed: int) -> list:
    """Bundled documents for ``"name"``/``"name:split"`` entries, with unique doc ids."""
    from data.dataset_loader import DatasetLoader
    from data.documents import renumber_documents
    from data.errors import DatasetSizeWarning

    loader = DatasetLoader(offline=True)
    docs = []
    for entry in entries:
        name, _, split = entry.partition(":")
        with warnings.catch_warnings():  # a cap above a small dataset's size simply takes it all
            warnings.simplefilter("ignore", DatasetSizeWarning)
            docs.extend(loader.load(name, split or None, num_samples=max_docs, seed=seed))
    return renumber_documents(docs)


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


def prepare_data(cfg: TrainConfig):
    """Corpus -> tokenizer -> ``TokenizedDataset`` splits: packed train/test, domain-balanced val."""
    from data.tokenization import tokenize_documents

    docs = load_corpus(cfg.corpus, cfg.max_docs_per_dataset, cfg.seed)
    train_docs, val_docs, test_docs = split_documents(docs, cfg.val_fraction, cfg.test_fraction, cfg.seed)
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
    return tokenizer, splits
