"""Generated text coloured by routing: the colours of the generated tokens are the routing recorded while generating."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.analysis.generated_text import generated_text, prompts_of
from core.analysis.routed_text import routed_text
from core.model_access.wrapper import MoEModelWrapper
from tests.fakes import routing
from tests.tiny_models import VOCAB, build
from viz.report import Report
from viz.routed_text import expert_colour, routed_text_html, routed_text_payload

NEW, PROMPT = 6, 5
LENGTHS, DOMAINS = [9, 4, 12, 8, 1], [0, 0, 1, 1, 1]  # doc 4 is one token: no prompt to continue


@pytest.fixture(scope="module")
def wrapper():
    model = build("olmoe")
    model.set_attn_implementation("eager")
    return MoEModelWrapper(model)


def _kept(wrapper) -> object:
    """The coloured text's kept documents (their routing is not used: only where each starts and its tokens)."""
    rng = np.random.default_rng(0)
    n, L, k = sum(LENGTHS), len(wrapper.moe_layers), wrapper.top_k
    doc = np.repeat(np.arange(len(LENGTHS)), LENGTHS)
    idx = np.zeros((n, L, k), int) + np.arange(k)
    rd = routing(idx, wrapper.num_experts, doc_ids=doc, positions=np.concatenate([np.arange(m) for m in LENGTHS]),
                 domain_ids=np.asarray(DOMAINS)[doc], dataset_ids=np.zeros(n, int), token_ids=rng.integers(3, VOCAB, n),
                 domain_names=["math", "code"], dataset_names=["ds"])
    text = routed_text(rd, docs_per_domain=3, max_tokens=50)
    text.moe_layers = list(wrapper.moe_layers)  # the model's layer numbers (the fake numbers them 0..L-1)
    return text


def test_generated_tokens_are_coloured_by_the_routing_of_their_decoding_step(wrapper):
    text = _kept(wrapper)
    gen = generated_text(wrapper, text, per_domain=2, prompt_tokens=PROMPT, new_tokens=NEW)
    assert prompts_of(text, 2, PROMPT) == [0, 1, 2, 3] and gen.doc_id.tolist() == [0, 1, 2, 3]
    assert gen.prompt_length.tolist() == [5, 4, 5, 5]  # document 1 has only 4 tokens: all of them are its prompt
    payload = routed_text_payload(gen, None)
    L, k = len(wrapper.moe_layers), wrapper.top_k
    for d, doc in enumerate(payload["docs"]):
        prompt = torch.as_tensor(text.token_ids[text.document(d)][:gen.prompt_length[d]])[None]
        alone = wrapper.generate_routing(prompt, max_new_tokens=NEW, min_new_tokens=NEW)  # the same prompt, by itself
        assert doc["prompt"] == prompt.shape[1] and len(doc["tokens"]) == prompt.shape[1] + NEW
        assert [int(t) for t in doc["tokens"]] == alone.sequences[0].tolist()
        shown = np.asarray(doc["e"]).reshape(-1, L, k)[:, :, 0]  # the page's top-1 expert of each token at each layer
        w = alone.routing.topk_weight.numpy()
        recorded = np.take_along_axis(alone.routing.topk_idx.numpy(), w.argmax(-1)[..., None], -1)[..., 0]
        assert np.array_equal(shown, recorded), f"document {d}"
        assert [expert_colour(e) for e in shown[doc["prompt"]:, 0]] == [expert_colour(e) for e in recorded[doc["prompt"]:, 0]]


def test_prompts_of_one_length_share_a_batch_and_route_as_alone(wrapper):
    """Batched generation (two prompts of 5 tokens) gives each continuation the routing it gets alone."""
    text = _kept(wrapper)
    gen = generated_text(wrapper, text, per_domain=2, prompt_tokens=PROMPT, new_tokens=NEW)
    d = 2
    prompt = torch.as_tensor(text.token_ids[text.document(d)][:PROMPT])[None]
    alone = wrapper.generate_routing(prompt, max_new_tokens=NEW, min_new_tokens=NEW)
    assert np.array_equal(gen.experts[gen.document(d)], alone.routing.topk_idx.numpy())
    np.testing.assert_allclose(gen.weights[gen.document(d)], alone.routing.topk_weight.numpy(), atol=1e-5)


def test_the_page_marks_generated_tokens_and_colours_them_in_a_browser(wrapper, tmp_path, browser):
    from viz.browser_check import BrowserUnavailable, check_page

    gen = generated_text(wrapper, _kept(wrapper), per_domain=2, prompt_tokens=PROMPT, new_tokens=NEW)
    payload = routed_text_payload(gen, None)
    report = Report("t", plotlyjs="file")
    report.add_html("Text", routed_text_html(payload, "generated-text"), "generated_text", data=payload)
    page = report.write(tmp_path)
    try:
        result, (seen,) = check_page(page, evaluate=[GENERATED_JS], browser=browser)
    except BrowserUnavailable as e:
        pytest.skip(str(e))
    assert result.ok, result
    seen = json.loads(seen)
    L, k = len(wrapper.moe_layers), wrapper.top_k
    want = [expert_colour(np.asarray(doc["e"]).reshape(-1, L, k)[t, 0, 0]) for doc in payload["docs"]
            for t in range(doc["prompt"], len(doc["tokens"]))]
    assert seen["marks"] == 4 and seen["generated"] == 4 * NEW
    assert seen["colours"] == [_rgb(c) for c in want]
    assert "(generated)" in seen["tip"] and "(prompt)" in seen["prompt_tip"]
    assert "then 6 generated" in seen["head"]


def _rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


GENERATED_JS = """(() => {
  const root = document.getElementById('generated-text');
  const gen = Array.from(root.querySelectorAll('.rt-tok.rt-gen'));
  const hover = s => { s.dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: 5, clientY: 5}));
                       return root.querySelector('.rt-tip').textContent; };
  const tip = hover(gen[0]), promptTip = hover(root.querySelector('.rt-tok:not(.rt-gen)'));
  return JSON.stringify({marks: root.querySelectorAll('.rt-mark').length, generated: gen.length,
                         colours: gen.map(s => getComputedStyle(s).backgroundColor), tip: tip, prompt_tip: promptTip,
                         head: root.querySelector('.rt-head').textContent});
})()"""


def test_the_study_skips_it_when_off_or_remote():
    from types import SimpleNamespace as NS

    from core.pipeline.analyses.generated_text import _skip

    def ctx(tokens, remote=None, hf=True):
        return NS(options=NS(analysis=NS(generate_tokens=tokens), model=NS(remote=remote)), wrapper=NS(hf_model=object() if hf else None))

    assert _skip(ctx(24)) is None
    assert "turned off" in _skip(ctx(0))
    assert "remote" in _skip(ctx(24, remote="ndif")) and "remote" in _skip(ctx(24, hf=False))
