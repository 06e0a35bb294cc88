"""The collector consumes ``data.tokenize_documents`` output: labels and names reach the cache intact."""

from __future__ import annotations

import pytest
import torch

import data
from core.collection.collector import ActivationCollector
from tests.fakes import FakeWrapper

def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the cat sat on a mat x = 1 + 2 print ( ) def f : return two plus equals four".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


@pytest.mark.parametrize("pack", [False, True])
def test_tokenized_dataset_round_trips_through_the_cache(tmp_path, pack):
    docs = [
        data.Document("the cat sat on a mat", "stories", "stories", 0),
        data.Document("x = 1 + 2", "code", "code", 1),
        data.Document("two plus two equals four", "gsm8k", "math", 2),
        data.Document("def f ( ) : return x", "code", "code", 3),
    ]
    tokenized = data.tokenize_documents(docs, word_tokenizer(), max_length=5, pack=pack)
    cache = ActivationCollector(FakeWrapper(), progress=False).collect(
        tokenized, tmp_path, batch_size=2, shard_tokens=6, dataset_name="mixed"
    )
    rd = cache.load()
    labels = tokenized.token_labels()
    assert rd.num_tokens == tokenized.num_tokens
    for name, values in labels.items():
        assert torch.equal(getattr(rd, name), values), name
    assert rd.domain_names == tokenized.domain_names and rd.dataset_names == tokenized.dataset_names
    assert cache.manifest["settings"]["pack"] is pack and cache.manifest["dataset"] == "mixed"
