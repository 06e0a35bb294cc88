"""The toolkit's own small MoE causal LM as a transformers ``PreTrainedModel``.

Built like OLMoE in transformers 5 (Llama attention with rotary embeddings, RMSNorm, a sparse
MoE block in every layer) so that ``save_pretrained`` writes safetensors, ``AutoModelForCausalLM``
opens the folder once this module is imported, and the toolkit's generic wrapper finds the
routers by their ``(logits, weights, index)`` contract without a special case. The forward
records router logits through transformers' ``capture_outputs`` mechanism
(``output_router_logits=True``) and adds the load-balancing and z-losses to the LM loss.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from core.study_moe.dispatch import DEFAULT_EXPERT_DISPATCH, check_dispatch
from core.study_moe.layer import (
    ROUTING_MODES,
    StudyMoeExperts,
    StudyMoeSparseBlock,
    StudyMoeTopKRouter,
    load_balancing_loss,
    router_z_loss,
)

MODEL_TYPE = "study_moe"


def _check_options(routing: str, num_experts: int, num_experts_per_tok: int, capacity_factor: float | None,
                   hidden_size: int, num_attention_heads: int) -> None:
    """Refuse a configuration the model cannot be built from, with one line saying which value is wrong."""
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    if not 1 <= num_experts_per_tok <= num_experts:
        raise ValueError(f"num_experts_per_tok must be in [1, num_experts={num_experts}], got {num_experts_per_tok}")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")


class StudyMoeConfig(PretrainedConfig):
    """Configuration of the toolkit's MoE LM; MoE fields named as in OLMoE / Mixtral configs.

    ``routing`` is "topk" or "random"; ``capacity_factor`` None means no token is ever dropped;
    ``router_jitter_noise`` is the multiplicative input-noise width used in training only;
    ``expert_dispatch`` ("loop" or "grouped", equal to float tolerance) only says how the experts'
    matmuls are issued (``core.study_moe.dispatch``).
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_local_experts": "num_experts"}

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        intermediate_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 512,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        routing: str = "topk",
        norm_topk_prob: bool = False,
        capacity_factor: float | None = None,
        router_jitter_noise: float = 0.0,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.001,
        output_router_logits: bool = False,
        expert_dispatch: str = DEFAULT_EXPERT_DISPATCH,
        **kwargs,
    ):
        _check_options(routing, num_experts, num_experts_per_tok, capacity_factor, hidden_size, num_attention_heads)
        self.expert_dispatch = check_dispatch(expert_dispatch)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self._set_moe(num_experts, num_experts_per_tok, routing, norm_topk_prob, capacity_factor, router_jitter_noise,
                      router_aux_loss_coef, router_z_loss_coef, output_router_logits)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _set_moe(
        self,
        num_experts: int,
        num_experts_per_tok: int,
        routing: str,
        norm_topk_prob: bool,
        capacity_factor: float | None,
        router_jitter_noise: float,
        router_aux_loss_coef: float,
        router_z_loss_coef: float,
        output_router_logits: bool,
    ) -> None:
        """Store the routing fields (experts, selection, capacity, auxiliary losses), apart from the transformer's shape."""
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.routing = routing
        self.norm_topk_prob = norm_topk_prob
        self.capacity_factor = capacity_factor
        self.router_jitter_noise = router_jitter_noise
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.output_router_logits = output_router_logits


class StudyMoeAttention(LlamaAttention):
    """Causal self-attention with rotary embeddings (Llama's; q/k/v/o projections)."""


class StudyMoeRMSNorm(LlamaRMSNorm):
    """RMSNorm (Llama's)."""


class StudyMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: attention, then the sparse MoE feed-forward."""

    def __init__(self, config: StudyMoeConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = StudyMoeAttention(config=config, layer_idx=layer_idx)
        self.mlp = StudyMoeSparseBlock(config)
        self.input_layernorm = StudyMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = StudyMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``token_mask [B, T]`` (True = real token) keeps padding out of the MoE routing."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), token_mask)


class StudyMoePreTrainedModel(PreTrainedModel):
    """Shared weight init and output-recording declarations (router logits, hidden states, attentions)."""

    config_class = StudyMoeConfig
    config: StudyMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["StudyMoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(StudyMoeTopKRouter, index=0),
        "hidden_states": StudyMoeDecoderLayer,
        "attentions": StudyMoeAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        PreTrainedModel._init_weights(self, module)
        std = self.config.initializer_range
        if isinstance(module, StudyMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, StudyMoeTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)


class StudyMoeModel(StudyMoePreTrainedModel):
    """Embeddings, the decoder stack and the final norm."""

    def __init__(self, config: StudyMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([StudyMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = StudyMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        token_mask = real_token_mask(attention_mask, inputs_embeds.shape[1])
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                token_mask=token_mask,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class StudyMoeForCausalLM(StudyMoePreTrainedModel, GenerationMixin):
    """The causal LM head on ``StudyMoeModel``; loss = LM loss + aux_coef * balance + z_coef * z-loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: StudyMoeConfig):
        super().__init__(config)
        self.model = StudyMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits and outputs.router_logits:
            seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            mask = real_token_mask(attention_mask, seq_len)
            aux_loss = load_balancing_loss(outputs.router_logits, self.num_experts, self.num_experts_per_tok, mask,
                                           selected=self._chosen_experts(len(outputs.router_logits)))
            if loss is not None:
                z_loss = router_z_loss(outputs.router_logits, mask)
                loss = loss + self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def _chosen_experts(self, num_layers: int) -> tuple[torch.Tensor, ...] | None:
        """The experts each router chose in this forward (random routing's choice is not the top-k)."""
        chosen = tuple(layer.mlp.gate.last_top_k_index for layer in self.model.layers[: self.config.num_hidden_layers])
        if len(chosen) != num_layers or any(c is None for c in chosen):
            return None  # routers not all run (e.g. a cut model): fall back to the top-k of the logits
        return chosen


def real_token_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """``[B, T]`` bool of the current tokens that are real, from a 2-D padding mask (None: all real).

    With a key-value cache the mask covers past and current tokens; the current ones are its last
    ``seq_len`` columns. A 4-D (already expanded) mask carries no per-token padding: None.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:].bool()


def register_with_auto() -> None:
    """Make ``study_moe`` a model type transformers' ``Auto*`` classes open from any folder (idempotent).

    Called on import, and again by whoever opens a model by name, since an import runs only once.
    """
    AutoConfig.register(MODEL_TYPE, StudyMoeConfig, exist_ok=True)
    AutoModel.register(StudyMoeConfig, StudyMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(StudyMoeConfig, StudyMoeForCausalLM, exist_ok=True)


register_with_auto()
