"""Metrics of the own-MoE trainer and its tokenizer, against known answers."""

import math

import pytest
import torch

from core.study_moe.evaluation import routing_accuracy, unigram_cross_entropy, utilization
from core.study_moe.config import TrainConfig, checkpoint_steps, learning_rate
from core.study_moe.corpus import split_documents
from core.study_moe.tokenizer import train_bpe_tokenizer
from data.documents import Document


def test_utilization_shares_selections():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1]])
    assert utilization(idx, 4).tolist() == pytest.approx([0.5, 2 / 6, 1 / 6, 0.0])


def test_routing_accuracy_separable_and_chance():
    # domain 0 always uses expert 0, domain 1 expert 1; documents alternate train/test by parity
    domains = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 1, 1])
    docs = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 11])
    selected = torch.nn.functional.one_hot(domains, 2)
    acc, chance = routing_accuracy(selected, domains, docs)
    assert acc == 1.0
    assert chance == pytest.approx(4 / 6)  # test half: docs 1,3,5,7,9,11 -> domains 0,1,0,1,1,1
    uninformative = torch.ones(10, 2)
    acc, _ = routing_accuracy(uninformative, domains, docs)
    assert acc == pytest.approx(chance) or acc == pytest.approx(1 - chance)


def test_routing_accuracy_without_two_domains_is_nan():
    acc, chance = routing_accuracy(torch.ones(4, 3), torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert math.isnan(acc) and math.isnan(chance)
    with pytest.raises(ValueError, match="one row per token"):
        routing_accuracy(torch.ones(4, 3), torch.zeros(3, dtype=torch.long), torch.arange(4))


def test_unigram_cross_entropy_known_value():
    # add-one counts [3, 2] -> p = [0.6, 0.4]
    ce = unigram_cross_entropy(torch.tensor([0, 0, 1]), torch.tensor([0, 1]), vocab_size=2)
    assert ce == pytest.approx(-(math.log(0.6) + math.log(0.4)) / 2)


def test_checkpoint_steps_are_geometric_and_dense_early():
    assert checkpoint_steps(600, 7) == [0, 9, 19, 38, 75, 150, 300, 600]
    assert checkpoint_steps(3, 4) == [0, 1, 2, 3]
    assert checkpoint_steps(1000, 5, spacing=10 ** 0.5) == [0, 10, 32, 100, 316, 1000]
    with pytest.raises(ValueError):
        checkpoint_steps(0, 3)


def test_learning_rate_warmup_and_cosine_floor():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)
    assert learning_rate(110, cfg) == pytest.approx(0.1)


def test_train_config_rejects_unknown_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig.from_dict({"val_fraction": 0.6, "test_fraction": 0.5})
    with pytest.raises(ValueError, match="top_k"):
        TrainConfig.from_dict({"num_experts": 4, "top_k": 5})
    with pytest.raises(ValueError, match="routing"):
        TrainConfig.from_dict({"routing": "hash"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_split_documents_keeps_every_domain_in_every_split():
    docs = [Document(f"t{i}", "a" if i < 20 else "b", "general" if i < 20 else "code", i) for i in range(40)]
    train, val, test = split_documents(docs, 0.1, 0.2, seed=0)
    assert len(val) == 4 and len(test) == 8 and len(train) == 28
    for part in (train, val, test):
        assert {d.domain for d in part} == {"general", "code"}
    assert len({d.doc_id for d in train + val + test}) == 40


def test_bpe_tokenizer_roundtrips_and_has_specials():
    texts = ["def add(a, b):\n    return a + b\n", "Alice was beginning to get very tired.", "12 + 30 = 42"] * 20
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= 300
    unseen = "Ünïcode ✓ text that was never seen"
    assert tok.decode(tok(unseen)["input_ids"]) == unseen
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(texts, vocab_size=100)
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe_tokenizer([], vocab_size=300)


def test_unigram_by_domain_scores_each_domain_on_its_own_targets():
    from types import SimpleNamespace

    from core.study_moe.evaluation import unigram_by_domain

    ids = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])
    data = SimpleNamespace(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
                           domain_ids=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), domain_names=["a", "b"])
    train = torch.tensor([0, 0, 1])  # add-one: p = [0.6, 0.4]
    out = unigram_by_domain(train, data, vocab_size=2)
    assert out["a"] == pytest.approx(-(math.log(0.6) + math.log(0.4)) / 2)  # targets 0, 1 (the padded one left out)
    assert out["b"] == pytest.approx(-(math.log(0.4) + 2 * math.log(0.6)) / 3)  # targets 1, 0, 0


def test_plateau_needs_both_a_settled_loss_and_every_domain_beating_its_baseline():
    from core.study_moe.training import plateau, plateau_line

    def ckpt(rev, loss, domains):
        return {"revision": rev, "val_loss": loss, "val_domain_loss": domains}

    unigram = {"math": 6.0, "code": 5.0}
    settled = plateau([ckpt("a", 3.05, {}), ckpt("b", 3.0, {"math": 3.0, "code": 3.9})], unigram)
    assert settled["holds"] and settled["relative_change"] == pytest.approx(0.05 / 3.05)
    assert settled["domain_ratio"] == pytest.approx({"math": 0.5, "code": 0.78})
    assert "plateau holds" in plateau_line(settled) and "+1.6%" in plateau_line(settled)
    still_falling = plateau([ckpt("a", 3.2, {}), ckpt("b", 3.0, {"math": 3.0, "code": 3.0})], unigram)
    assert not still_falling["holds"] and not still_falling["settled"] and still_falling["beats_unigram"]
    weak_domain = plateau([ckpt("a", 3.0, {}), ckpt("b", 3.0, {"math": 3.0, "code": 4.5})], unigram)
    assert not weak_domain["holds"] and weak_domain["settled"] and not weak_domain["beats_unigram"]
    assert "does NOT hold" in plateau_line(weak_domain)
    assert not plateau([ckpt("b", 3.0, {})], unigram)["holds"]


def test_the_embedded_default_is_in_olmoes_routing_regime():
    """Issue 29: 64 experts, top-8 unnormalized, dropless, OLMoE's loss weights, >= 6 layers, >= 8 log-spaced checkpoints."""
    from core.study_moe.config import DEFAULT_CONFIG

    cfg = TrainConfig.from_yaml(DEFAULT_CONFIG)
    assert (cfg.num_experts, cfg.top_k, cfg.routing, cfg.capacity_factor) == (64, 8, "topk", None)
    assert (cfg.router_aux_loss_coef, cfg.router_z_loss_coef) == (0.01, 0.001) and cfg.num_layers >= 6
    assert cfg.intermediate_size * 2 == cfg.hidden_size and cfg.expert_dispatch == "grouped"
    from core.study_moe.model import StudyMoeConfig

    assert StudyMoeConfig().norm_topk_prob is False  # the trainer never renormalizes the top-k weights
    steps = checkpoint_steps(cfg.steps, cfg.num_checkpoints, cfg.checkpoint_spacing)
    assert len(steps) >= 9 and steps[0] == 0 and steps[-1] == cfg.steps
    assert steps[1] / cfg.steps < 0.01  # the first after step 0 is well under 1% of training
    ratios = [b / a for a, b in zip(steps[1:], steps[2:])]
    assert max(ratios) / min(ratios) < 1.1  # log-spaced
    assert "shakespeare:train" in cfg.held_out  # literature is held out for analysis too
