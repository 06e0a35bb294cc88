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


# ---------------------------------------------------------------- every MoE family transformers ships
# What every tiny MoE gets (only the keys its config already has are passed), then per-family fixes.
MOE_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_k=2,
                moe_topk=2, n_group=2, topk_group=1, first_k_dense_replace=1, decoder_sparse_step=1, mlp_only_layers=[],
                n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                sliding_window=8)

# model_type -> config overrides a family needs to be built tiny and run (a real hybrid has an attention layer)
MOE_OVERRIDES: dict[str, dict] = {
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2)),
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"]),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                        linear_attn_config=dict(head_dim=8, num_heads=4)),  # its default 32 heads of 128: 5 s a test
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=8, layer_types=["mamba", "attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "gemma4_text": dict(enable_moe_block=True, top_k_experts=2, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8),
    "deepseek_v4": dict(mlp_layer_types=["hash_moe", "moe"]),
    "doge": dict(is_moe=True),
    "zaya": dict(num_experts_per_tok=1),
    "beam": dict(mlp_layer_types=["dense", "sparse"]),
    "longcat_flash": dict(zero_expert_num=2),
    "mimo_v2_flash": dict(num_key_value_heads=2),
    "qwen4_exp_text": dict(layer_types=["linear_attention", "indexed_attention"], indexer_n_heads=2, indexer_kv_heads=1,
                           indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2),  # the family supports top-1 only
}

# model_type -> why it is not built tiny here (a family that fails inside the toolkit is never listed)
MOE_SKIPS: dict[str, str] = {}


def _has_router_outputs(model_cls: type) -> bool:
    """The class (or a module of its file) declares router_logits, or its forward takes output_router_logits."""
    import inspect
    import sys

    mod = sys.modules[model_cls.__module__]
    for obj in vars(mod).values():
        rec = getattr(obj, "_can_record_outputs", None) if isinstance(obj, type) else None
        if isinstance(rec, dict) and "router_logits" in rec:
            return True
    return "output_router_logits" in inspect.signature(model_cls.forward).parameters


def moe_causal_lm_families() -> dict[str, str]:
    """model_type -> causal-LM class name, for every MoE family of the installed transformers (one per class)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    by_class: dict[str, str] = {}
    for model_type, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        name = names[0] if isinstance(names, (list, tuple)) else names
        cls = getattr(transformers, name, None)
        if cls is None or not _has_router_outputs(cls):
            continue
        own = getattr(getattr(cls, "config_class", None), "model_type", model_type)
        if name not in by_class or model_type == own:  # aliases (llama4 / llama4_text) share one class
            by_class[name] = own if own else model_type
    return {mt: name for name, mt in sorted(by_class.items(), key=lambda kv: kv[1])}


def _config_has(cfg: object, key: str) -> bool:
    try:
        return hasattr(cfg, key)
    except Exception:  # per-layer (heterogeneous) configs refuse global reads of per-layer fields
        return False


def _tiny_config(cfg_cls: type, model_type: str) -> object:
    """The family's config made tiny; a multimodal wrapper gets a tiny text decoder and no other towers."""
    default = cfg_cls()
    text_cfg = getattr(default, "text_config", None)
    if text_cfg is not None and model_type not in MOE_OVERRIDES:
        towers = {n: None for n in ("vision_config", "audio_config") if _config_has(default, n)}
        text_type = getattr(text_cfg, "model_type", "")
        text_kw = {k: v for k, v in MOE_BASE.items() if _config_has(text_cfg, k)}
        text_kw.update(MOE_OVERRIDES.get(text_type, {}))
        cfg = cfg_cls(text_config=text_kw, **towers)
        cfg.text_config._experts_implementation = "eager"
        return cfg
    kw = {k: v for k, v in MOE_BASE.items() if _config_has(default, k)}
    kw.update(MOE_OVERRIDES.get(model_type, {}))
    return cfg_cls(**kw)


def build_moe_family(model_type: str, class_name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of any MoE family, from its own config class, with eager experts."""
    import transformers

    model_cls = getattr(transformers, class_name)
    cfg = _tiny_config(model_cls.config_class, model_type)
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg)
    _randomize_routers(model)
    return model.eval()


def _randomize_routers(model: torch.nn.Module) -> None:
    """Random (not zero) router weights and score biases, so that routing is not degenerate."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and ("gate" in name or "router" in name) and p.abs().sum() == 0:
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name and b.is_floating_point():
                b.normal_(0, 0.5)
