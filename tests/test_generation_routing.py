"""Routing recorded during generate() (key-value cache on) is the routing of the final sequence, teacher-forced.

Greedy generation of 8 tokens, then ``trace_routing`` of the prompt + generated sequence: each
token's selected experts are equal, its router logits and weights equal to float32 tolerance. Both
run eager attention. It holds for every family of ``tests/tiny_models.py`` (OLMoE, Mixtral,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, GPT-OSS with an 8-token sliding window shorter than the
13-token sequence, GraniteMoE, PhiMoE, GLM-4-MoE, ERNIE-4.5-MoE) and the toolkit's own model
(study_moe). It does not hold for a router with a token-dropping capacity (study_moe with
``capacity_factor``): a decoding step routes one token, which never overflows an expert, while a
teacher-forced forward routes the whole sequence at once and drops the overflow; that case is
tested to differ, which also shows the decode rows come from the decoding steps, not from a re-trace.
"""

from __future__ import annotations

import pytest
import torch

from core.model_access.wrapper import MoEModelWrapper
from tests.tiny_models import FAMILIES, VOCAB, build

NEW = 8
PROMPT = torch.tensor([[5, 6, 7, 8, 9]])


def _study_moe(**overrides) -> torch.nn.Module:
    """The toolkit's own model, tiny, with random (not zero) router weights."""
    from core.study_moe.model import StudyMoeConfig, StudyMoeForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
               num_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = StudyMoeForCausalLM(StudyMoeConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and p.abs().sum() == 0:
                p.normal_(0, 0.5)
    return model


def _wrapper(family: str, **overrides) -> MoEModelWrapper:
    model = _study_moe(**overrides) if family == "study_moe" else build(family)
    model.set_attn_implementation("eager")  # the same attention for the cached steps and the teacher-forced forward
    return MoEModelWrapper(model)


@pytest.fixture(scope="module", params=sorted(FAMILIES) + ["study_moe"])
def family(request):
    return request.param, _wrapper(request.param)


def _assert_same_routing(got, want, label: str) -> None:
    assert got.num_tokens == want.num_tokens, label
    assert torch.equal(got.token_ids, want.token_ids), label
    assert torch.equal(got.positions, want.positions), label
    assert torch.equal(got.topk_idx, want.topk_idx), f"{label}: selected experts differ"
    torch.testing.assert_close(got.router_logits, want.router_logits, rtol=0, atol=1e-5, msg=label)
    torch.testing.assert_close(got.topk_weight, want.topk_weight, rtol=0, atol=1e-5, msg=label)


def test_generation_routing_equals_teacher_forced_trace(family):
    name, w = family
    gen = w.generate_routing(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW)
    with torch.no_grad():  # recording changes nothing the model generates
        plain = w.hf_model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(gen.sequences, plain), name
    assert gen.sequences.shape == (1, PROMPT.shape[1] + NEW) and torch.equal(gen.new_tokens, plain[:, PROMPT.shape[1]:])
    assert gen.routing.num_tokens == PROMPT.shape[1] + NEW  # the prefill's 5 rows, then one per generated token
    assert (gen.routing.moe_layers, gen.routing.num_experts, gen.routing.top_k) == (w.moe_layers, w.num_experts, w.top_k)
    _assert_same_routing(gen.routing, w.trace_routing(gen.sequences, gen.attention_mask), name)


def test_sampled_generation_is_recorded_too():
    """Sampling picks other tokens than greedy decoding; the routing is still that of the sequence it wrote."""
    w = _wrapper("mixtral")
    torch.manual_seed(1)
    gen = w.generate_routing(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, temperature=2.0)
    greedy = w.generate_routing(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW)
    assert not torch.equal(gen.sequences, greedy.sequences)
    _assert_same_routing(gen.routing, w.trace_routing(gen.sequences), "sampled")


@pytest.mark.parametrize("name", ["olmoe", "gpt_oss", "study_moe"])
def test_left_padded_batch_routes_each_row_as_alone(name):
    """Each row of a left-padded batch is routed as its unpadded sequence, teacher-forced alone, would be."""
    w = _wrapper(name)
    ids = torch.tensor([[0, 0, 5, 6, 7], [11, 12, 13, 14, 15]])
    gen = w.generate_routing(ids, (ids != 0).long(), max_new_tokens=6, min_new_tokens=6)
    assert gen.sequences.shape == (2, 11) and torch.equal(gen.attention_mask[:, 2:], torch.ones(2, 9, dtype=torch.long))
    first = int(gen.attention_mask[0].sum())
    rows = [slice(0, first), slice(first, gen.routing.num_tokens)]
    for b in range(2):
        alone = w.trace_routing(gen.sequences[b][gen.attention_mask[b].bool()])
        got = gen.routing.select(rows[b])
        got.positions = got.positions - int((gen.attention_mask[b] == 0).sum())  # columns of the padded batch
        _assert_same_routing(got, alone, f"{name} row {b}")


def test_a_capacity_router_routes_generation_differently():
    """With a capacity limit, teacher forcing drops tokens (weight 0) that one-token decoding steps never drop."""
    w = _wrapper("study_moe", capacity_factor=0.5)
    gen = w.generate_routing(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW)
    forced = w.trace_routing(gen.sequences, gen.attention_mask)
    decoded = slice(PROMPT.shape[1], None)  # tokens routed by a decoding step, one at a time
    assert (gen.routing.topk_weight[decoded] != 0).all()
    assert (forced.topk_weight[decoded] == 0).any()
    # the prefill routes the prompt as a teacher-forced forward of the prompt alone does (capacity from its 5 tokens)
    prompt_alone = w.trace_routing(PROMPT)
    assert (prompt_alone.topk_weight == 0).any()
    _assert_same_routing(gen.routing.select(slice(0, PROMPT.shape[1])), prompt_alone, "prefill")


def test_text_prompts_are_left_padded():
    from core.study_moe.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["the cat sat on the mat", "a dog ran far away"] * 4, vocab_size=300)
    model = _study_moe(vocab_size=300)
    model.set_attn_implementation("eager")
    w = MoEModelWrapper(model, tokenizer=tok)
    texts = ["the cat sat", "a dog ran far away"]
    gen = w.generate_routing(texts, max_new_tokens=4, min_new_tokens=4)
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    assert tok.padding_side == "right"  # the tokenizer is left as it was
    assert torch.equal(gen.sequences[:, :enc["input_ids"].shape[1]], enc["input_ids"])
    by_ids = w.generate_routing(enc["input_ids"], enc["attention_mask"], max_new_tokens=4, min_new_tokens=4)
    _assert_same_routing(gen.routing, by_ids.routing, "text")


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_beams=2), "num_beams"),
    (dict(num_return_sequences=2, do_sample=True), "num_return_sequences"),
    (dict(use_cache=False), "use_cache"),
])
def test_generation_that_is_not_one_token_per_step_is_refused(kwargs, words):
    w = _wrapper("olmoe")
    with pytest.raises(ValueError, match=words):
        w.generate_routing(PROMPT, max_new_tokens=2, **kwargs)


def test_right_padding_and_no_new_token_are_refused():
    w = _wrapper("olmoe")
    with pytest.raises(ValueError, match="left padding"):
        w.generate_routing(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        w.generate_routing(PROMPT, max_new_tokens=0)
