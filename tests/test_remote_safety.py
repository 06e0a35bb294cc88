"""The traces that run on NDIF (routing and ablation) pass nnsight's local simulation of a remote request.

``remote="local"`` serializes each trace as NDIF would receive it and restores it with the
toolkit's own modules out of reach, as on NDIF's servers, then runs it. What could not be
tested here: the network, NDIF's queue and which models it hosts (see the README).
"""

from __future__ import annotations

import pytest
import torch

from core.model_access.wrapper import MoEModelWrapper
from tests.test_data_tokenization import word_tokenizer
from tests.tiny_models import VOCAB, build


@pytest.fixture(scope="module")
def payloads():
    """Sizes of the serialized requests the simulation sends."""
    from nnsight.schema.request import RequestModel

    sizes: list[int] = []
    real = RequestModel.serialize

    def recording(self, *a, **k):
        out = real(self, *a, **k)
        sizes.append(len(out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RequestModel, "serialize", recording)
        yield sizes


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe", "deepseek_v3"])
def test_remote_routing_equals_local_routing(family, payloads):
    model = build(family, seed=2)
    local = MoEModelWrapper(model, tokenizer=word_tokenizer())
    remote = MoEModelWrapper(model, tokenizer=word_tokenizer(), remote="local")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    hidden = [local.moe_layers[-1]]
    a, b = local.trace_routing(ids, mask, hidden_layers=hidden), remote.trace_routing(ids, mask, hidden_layers=hidden)
    assert torch.equal(a.topk_idx, b.topk_idx) and torch.equal(a.router_logits, b.router_logits)
    assert torch.equal(a.topk_weight, b.topk_weight) and torch.equal(a.hidden[hidden[0]], b.hidden[hidden[0]])
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert payloads and payloads[-1] < weights / 4, "the request carries the model (the wrapper was captured)"


def test_remote_ablation_equals_local_ablation():
    model = build("olmoe", seed=3)
    local = MoEModelWrapper(model, tokenizer=word_tokenizer())
    remote = MoEModelWrapper(model, tokenizer=word_tokenizer(), remote="local")
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    ablate = {local.moe_layers[-1]: [1, 2], local.moe_layers[0]: [0]}  # given out of order: traced in layer order
    torch.testing.assert_close(local.forward_loss(ids, ablate=ablate), remote.forward_loss(ids, ablate=ablate), equal_nan=True)
    assert not torch.equal(local.forward_loss(ids), local.forward_loss(ids, ablate=ablate))


def test_remote_must_be_true_false_or_local():
    with pytest.raises(ValueError, match="'local'"):
        MoEModelWrapper(build("olmoe"), remote="ndif")
