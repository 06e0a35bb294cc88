"""The toolkit's own MoE as a transformers model: outputs, losses, saving and loading."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from core.study_moe.layer import load_balancing_loss, router_z_loss
from core.study_moe.model import StudyMoeConfig, StudyMoeForCausalLM


def tiny_config(**kw) -> StudyMoeConfig:
    base = dict(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1)
    base.update(kw)
    return StudyMoeConfig(**base)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StudyMoeForCausalLM(tiny_config()).eval()


def test_forward_returns_router_logits_per_layer(model):
    ids = torch.randint(2, 97, (3, 7))
    out = model(ids, output_router_logits=True)
    assert out.logits.shape == (3, 7, 97)
    assert len(out.router_logits) == 2
    assert all(r.shape == (21, 4) for r in out.router_logits)
    assert model(ids).router_logits is None


def test_loss_adds_balance_and_z_losses(model):
    ids = torch.randint(2, 97, (2, 9))
    mask = torch.ones_like(ids)
    plain = model(ids, attention_mask=mask, labels=ids).loss
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    cfg = model.config
    aux = load_balancing_loss(out.router_logits, 4, 2, mask)
    z = router_z_loss(out.router_logits, mask)
    assert out.aux_loss.item() == pytest.approx(aux.item())
    expected = plain + cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_padding_does_not_change_real_tokens(model):
    ids = torch.randint(2, 97, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    a = model(ids).logits
    b = model(padded, attention_mask=mask).logits[:, :6]
    assert torch.allclose(a, b, atol=1e-5)


def test_save_pretrained_roundtrip_through_auto_classes(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "study_moe"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is StudyMoeForCausalLM
    ids = torch.randint(2, 97, (2, 5))
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    assert loaded.config.capacity_factor is None and loaded.config.routing == "topk"


def test_generate_runs(model):
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_training_step_reaches_every_router_and_expert():
    torch.manual_seed(0)
    model = StudyMoeForCausalLM(tiny_config(capacity_factor=1.5, router_jitter_noise=0.1)).train()
    ids = torch.randint(2, 97, (4, 8))
    model(ids, labels=ids, output_router_logits=True).loss.backward()
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.grad.abs().sum() > 0
        assert layer.mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_bad_config_values_are_clear_errors():
    with pytest.raises(ValueError, match="routing must be one of"):
        tiny_config(routing="expert-choice")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        tiny_config(num_experts_per_tok=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        tiny_config(capacity_factor=-1.0)


def test_nnterp_standardized_transformer_loads_it(model):
    from nnterp import StandardizedTransformer

    st = StandardizedTransformer(model, check_attn_probs_with_trace=False)
    assert st.num_layers == 2
    ids = torch.randint(2, 97, (1, 5))
    with torch.no_grad(), st.trace(ids):
        logits = st.logits.save()
    assert torch.allclose(logits, model(ids).logits, atol=1e-5)
