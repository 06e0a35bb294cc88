"""The prompt generator: deterministic under a seed, correct arithmetic and code answers."""

import re

import pytest

from data import CAPABILITIES, DataError, PromptGenerator, tokenize_documents


def test_deterministic_under_seed():
    a = PromptGenerator(seed=7).generate_mixed(20)
    b = PromptGenerator(seed=7).generate_mixed(20)
    c = PromptGenerator(seed=8).generate_mixed(20)
    assert a == b
    assert [p.text for p in a] != [p.text for p in c]
    # each capability has its own stream: generating one does not shift another
    assert PromptGenerator(7).generate("code", 5) == [p for p in a if p.capability == "code"][:5]
    assert PromptGenerator(0).generate("story", 3, seed=7) == PromptGenerator(7).story_openings(3)


def solve(operation, operands):
    """The answer to a word problem, computed independently of the generator."""
    a, b, *rest = operands
    if operation == "add":
        return a + b
    if operation == "subtract":
        return a - b
    if operation == "multiply":
        return a * b
    if operation == "divide":
        return a // b
    assert operation == "multiply_subtract"
    return a * b - rest[0]


def test_arithmetic_answers_are_correct():
    prompts = PromptGenerator(seed=3).arithmetic_word_problems(300)
    ops = {p.meta["operation"] for p in prompts}
    assert ops == {"add", "subtract", "multiply", "divide", "multiply_subtract"}
    for p in prompts:
        numbers = [int(x) for x in re.findall(r"\d+", p.text)]
        operands = p.meta["operands"]
        assert numbers == operands  # the numbers in the text are the operands, in order
        expected = solve(p.meta["operation"], operands)
        if p.meta["operation"] == "divide":
            assert operands[0] % operands[1] == 0
        assert int(p.answer) == expected >= 0
        assert p.completion == f" {expected}" and p.domain == "math"


def test_known_arithmetic_problem():
    p = PromptGenerator(seed=1).arithmetic_word_problems(1)[0]
    assert p.text == "Noah shares 128 stickers equally among 8 friends. How many stickers does each friend get?"
    assert p.answer == "16"


def test_code_completions_pass_their_checks():
    for p in PromptGenerator(seed=5).code_completions(60):
        namespace: dict = {}
        exec(p.full_text, namespace)  # noqa: S102 - our own generated code
        fn = namespace[p.meta["function"]]
        assert fn(*p.meta["check"]["args"]) == p.meta["check"]["expected"]
        assert p.text.startswith(f"def {p.meta['function']}(") and p.domain == "code"


def test_factual_and_story_prompts():
    facts = PromptGenerator(seed=2).factual_sentences(30)
    assert all(p.full_text.endswith(f" {p.answer}.") and p.domain == "general" for p in facts)
    capital = next(p for p in PromptGenerator(seed=2).factual_sentences(200) if p.meta["subject"] == "France")
    assert capital.full_text == "The capital of France is Paris."
    stories = PromptGenerator(seed=2).story_openings(30)
    assert all(p.text[0].isupper() and p.text.endswith(".") and p.answer is None for p in stories)
    assert all(p.domain == "stories" for p in stories)
    assert not any(re.search(r"\ba [aeiou]", p.text) for p in stories)


def test_to_documents_and_tokenize():
    from tokenizers import Tokenizer, models, pre_tokenizers

    prompts = PromptGenerator(seed=0).generate_mixed(2)
    docs = PromptGenerator.to_documents(prompts, start_id=5)
    assert [d.doc_id for d in docs] == list(range(5, 13))
    assert [d.dataset for d in docs] == [f"prompts_{c}" for c in CAPABILITIES for _ in range(2)]
    assert docs[0].meta["answer"] == prompts[0].answer
    with_completion = PromptGenerator.to_documents(prompts, with_completion=True)
    assert with_completion[0].text == prompts[0].full_text
    words = sorted({w for d in docs for w in d.text.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tokenize_documents(docs, tok, max_length=16)
    lengths = [min(len(d.text.split()), 16) for d in docs]
    assert out.input_ids.shape == (8, max(lengths)) and out.num_tokens == sum(lengths)
    assert out.domain_names == ["math", "code", "general", "stories"]


def test_bad_capability_and_count():
    gen = PromptGenerator()
    with pytest.raises(DataError, match="known capabilities: arithmetic, code, factual, story"):
        gen.generate("poetry", 3)
    with pytest.raises(DataError, match="non-negative int"):
        gen.generate("code", -1)
    assert gen.generate("code", 0) == []
