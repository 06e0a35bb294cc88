"""Tokenization keeps per-token document id, position, dataset and domain; with offline tokenizers."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data import DataError, DatasetLoader, Document, tokenize_documents

WORDS = "a b c d e f g h".split()


def word_tokenizer(with_specials: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS: token id of word i is i + (number of specials)."""
    specials = ["[PAD]", "[UNK]", "[EOS]"] if with_specials else ["[UNK]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_specials:
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def docs():
    return [
        Document("a b c", "ds1", "math", 10),
        Document("d e", "ds2", "code", 20),
        Document("f g h a", "ds1", "math", 30),
    ]


def test_truncate_mode_one_row_per_document():
    out = tokenize_documents(docs(), word_tokenizer(), max_length=3)
    # ids: [PAD]=0 [UNK]=1 [EOS]=2 a=3 b=4 ... h=10
    assert out.input_ids.tolist() == [[3, 4, 5], [6, 7, 0], [8, 9, 10]]
    assert out.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    assert out.doc_ids.tolist() == [[10, 10, 10], [20, 20, -1], [30, 30, 30]]
    assert out.positions.tolist() == [[0, 1, 2], [0, 1, -1], [0, 1, 2]]
    assert out.domain_names == ["math", "code"] and out.dataset_names == ["ds1", "ds2"]
    assert out.domain_ids.tolist() == [[0, 0, 0], [1, 1, -1], [0, 0, 0]]
    assert out.dataset_ids.tolist() == [[0, 0, 0], [1, 1, -1], [0, 0, 0]]
    assert len(out) == 3 and out.num_tokens == 8 and not out.packed


def test_pack_mode_joins_with_eos_and_continues_positions():
    out = tokenize_documents(docs(), word_tokenizer(), max_length=4, pack=True)
    # stream: a b c EOS | d e EOS | f g h a EOS  (12 tokens) -> 3 rows of 4
    assert out.input_ids.tolist() == [[3, 4, 5, 2], [6, 7, 2, 8], [9, 10, 3, 2]]
    assert out.doc_ids.tolist() == [[10, 10, 10, 10], [20, 20, 20, 30], [30, 30, 30, 30]]
    assert out.positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [1, 2, 3, 4]]
    assert out.attention_mask.all()
    assert out.domain_ids.tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_pack_mode_pads_last_row_and_works_without_eos_or_pad():
    out = tokenize_documents(docs(), word_tokenizer(with_specials=False), max_length=5, pack=True)
    # no EOS: a b c d e | f g h a ; no pad token -> pad id 0; ids: [UNK]=0 a=1 ... h=8
    assert out.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 1, 0]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert out.doc_ids.tolist() == [[10, 10, 10, 20, 20], [30, 30, 30, 30, -1]]
    assert out.positions[1].tolist() == [0, 1, 2, 3, -1]


def test_bare_tokenizers_tokenizer_is_accepted():
    out = tokenize_documents(docs(), word_tokenizer().backend_tokenizer, max_length=8)
    assert out.input_ids[0, :3].tolist() == [3, 4, 5]


def test_token_labels_and_batches_in_order():
    out = tokenize_documents(docs(), word_tokenizer(), max_length=3)
    flat = out.token_labels()
    assert flat["token_ids"].tolist() == [3, 4, 5, 6, 7, 8, 9, 10]
    assert flat["doc_ids"].tolist() == [10, 10, 10, 20, 20, 30, 30, 30]
    assert flat["positions"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    parts = list(out.batches(2))
    assert [len(p) for p in parts] == [2, 1]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), out.input_ids)
    assert [d.doc_id for d in parts[0].documents] == [10, 20] and [d.doc_id for d in parts[1].documents] == [30]
    assert parts[1].domain_names == out.domain_names
    assert out.document(20).text == "d e"
    with pytest.raises(KeyError):
        out.document(99)
    with pytest.raises(DataError, match="batch_size"):
        list(out.batches(0))


def test_fixed_name_tables():
    out = tokenize_documents(docs(), word_tokenizer(), max_length=3, domain_names=["general", "math", "code"])
    assert out.domain_ids[:, 0].tolist() == [1, 2, 1]
    with pytest.raises(DataError, match="not in the given domains table"):
        tokenize_documents(docs(), word_tokenizer(), max_length=3, domain_names=["math"])


def test_bad_input():
    tok = word_tokenizer()
    with pytest.raises(DataError, match="duplicate doc_id 10"):
        tokenize_documents([Document("a", "x", "math", 10), Document("b", "y", "code", 10)], tok, 4)
    with pytest.raises(DataError, match="max_length"):
        tokenize_documents(docs(), tok, 0)
    with pytest.raises(DataError, match="no documents"):
        tokenize_documents([], tok, 4)
    with pytest.raises(DataError, match="tokenizer must be"):
        tokenize_documents(docs(), object(), 4)
    with pytest.raises(DataError, match="Document objects"):
        tokenize_documents(["a b"], tok, 4)


def test_bpe_tokenizer_on_bundled_corpora():
    loader = DatasetLoader(offline=True)
    documents = loader.load_datasets(["gsm8k", "humaneval", "alice"], num_samples_per_dataset=5, seed=0)
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator([d.text for d in documents], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", unk_token="[UNK]")
    packed = tokenize_documents(documents, tok, max_length=64, pack=True)
    truncated = tokenize_documents(documents, tok, max_length=64)
    assert packed.input_ids.shape[1] == 64 and len(truncated) == 15
    labels = packed.token_labels()
    # every document appears, its tokens in order, with its own domain
    for d in documents:
        mine = labels["doc_ids"] == d.doc_id
        assert mine.any()
        assert labels["positions"][mine].tolist() == list(range(int(mine.sum())))
        assert {packed.domain_names[i] for i in labels["domain_ids"][mine].tolist()} == {d.domain}
    # token counts: packing keeps every token (+1 EOS per document)
    lengths = [len(tok(d.text)["input_ids"]) for d in documents]
    assert packed.num_tokens == sum(lengths) + len(documents)
    assert truncated.attention_mask.sum(1).tolist() == [min(n, 64) for n in lengths]


def test_rows_head_tokens_and_concat():
    from data import TokenizedDataset

    out = tokenize_documents(docs(), word_tokenizer(), max_length=3)
    head = out.head_tokens(5)  # rows of 3 and 2 tokens fit, the third would make 8
    assert len(head) == 2 and head.num_tokens == 5 and [d.doc_id for d in head.documents] == [10, 20]
    assert len(out.head_tokens(1)) == 1, "at least one row"
    mid = out.rows(slice(1, 2))
    assert mid.doc_ids.tolist() == [[20, 20, -1]] and [d.doc_id for d in mid.documents] == [20]
    wide = tokenize_documents(docs()[:1], word_tokenizer(), max_length=3, domain_names=out.domain_names, dataset_names=out.dataset_names)
    short = tokenize_documents(docs()[1:2], word_tokenizer(), max_length=3, domain_names=out.domain_names, dataset_names=out.dataset_names)
    both = TokenizedDataset.concat([short, wide])
    assert both.input_ids.shape[1] == max(short.input_ids.shape[1], wide.input_ids.shape[1])
    assert both.num_tokens == short.num_tokens + wide.num_tokens
    assert both.doc_ids[both.attention_mask == 0].eq(-1).all()
    other = tokenize_documents(docs(), word_tokenizer(), max_length=3, domain_names=["code", "math"])
    with pytest.raises(DataError, match="name tables"):
        TokenizedDataset.concat([out, other])
