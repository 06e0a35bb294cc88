"""Tiny random MoE models of many families, built from configs (nothing is downloaded)."""

from __future__ import annotations

import importlib

import torch

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# family -> (config class, model class, config overrides)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                                               num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=32, moe_intermediate_size=16, num_experts=8,
                                                               num_experts_per_tok=2, head_dim=8)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8,
                                                                     num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
                                                                     first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                                                                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                                                         sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8,
                                                           num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                                                           first_k_dense_replace=1, head_dim=8)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(intermediate_size=32, moe_intermediate_size=16, moe_num_experts=8,
                                                                         moe_k=2, moe_layer_start_index=1, moe_num_shared_experts=0, head_dim=8)),
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family`` with eager experts (grouped_mm is not for CPU float32)."""
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    # random (not zero) router weights and biases so routing is not degenerate
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and ("gate" in name or "router" in name) and p.abs().sum() == 0:
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.5)
    return model.eval()


def available(family: str) -> bool:
    import transformers

    return hasattr(transformers, FAMILIES[family][0]) and importlib.util.find_spec("transformers") is not None
