"""The toolkit's own sparse MoE layer: router, experts and the block that joins them.

It follows the transformers 5 conventions of OLMoE so that the generic router discovery of
``MoEModelWrapper`` finds it with no special case:

* ``StudyMoeTopKRouter(hidden [N, H]) -> (router_logits [N, E], top_k_weights [N, k], top_k_index [N, k])``
  with its weight in ``router.weight [E, H]``;
* ``StudyMoeExperts(hidden [N, H], top_k_index, top_k_weights)`` with fused weights
  ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (OLMoE's layout, gated FFN);
* ``StudyMoeSparseBlock`` with attributes ``gate`` and ``experts``.

Routing modes: ``"topk"`` (softmax over the logits, top-k, optional renormalisation) and
``"random"`` (k distinct experts drawn uniformly per token, weight 1/k each; the router still
computes logits, but they do not choose anything: the sanity-check arm of the seed-002 grid).

Capacity factor: each expert takes at most ``ceil(capacity_factor * N * k / E)`` assignments
per forward. Assignments are served slot-major (every token's first choice before any second
choice), then in token order. A dropped assignment keeps its expert index and gets weight 0;
the experts module skips zero-weight assignments (no compute), so a token whose every
assignment is dropped passes through the layer on the residual stream only. The router counts
drops of its last forward in ``router.last_num_dropped`` (a 0-d tensor).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from transformers.activations import ACT2FN

ROUTING_MODES = ("topk", "random")


# --------------------------------------------------------------------------- routing helpers
def random_expert_choice(num_tokens: int, num_experts: int, top_k: int, device=None, generator=None) -> torch.Tensor:
    """``[N, k]`` distinct experts drawn uniformly per token (top-k of i.i.d. uniform scores)."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    scores = torch.rand(num_tokens, num_experts, device=device, generator=generator)
    return scores.topk(top_k, dim=-1).indices


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ``ceil(capacity_factor * N * k / E)`` (GShard/Switch)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for no limit), got {capacity_factor}")
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_keep_mask(top_k_index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Boolean ``[N, k]``: True for assignments within their expert's capacity.

    Priority is slot-major (all first choices, then all second choices), then token order, so a
    token's preferred expert is kept before anyone's fallback expert.
    """
    n, k = top_k_index.shape
    slot_major = top_k_index.t().reshape(-1)  # [k*N]: slot 0 of every token, then slot 1, ...
    onehot = F.one_hot(slot_major, num_experts)
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1)  # 1-based rank inside its expert
    keep = position <= capacity
    return keep.reshape(k, n).t()


def routing_entropy(router_logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy (nats) of the softmax routing distribution, ``[..., E] -> [...]``."""
    logp = torch.log_softmax(router_logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# --------------------------------------------------------------------------- auxiliary losses
def _flat_mask(attention_mask: torch.Tensor | None, rows: int, device) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    if mask.numel() != rows:
        raise ValueError(f"attention_mask has {mask.numel()} entries but the router saw {rows} tokens")
    return mask


def _as_layers(router_logits: tuple[torch.Tensor, ...] | torch.Tensor, loss_name: str) -> tuple[torch.Tensor, ...]:
    layers = (router_logits,) if isinstance(router_logits, torch.Tensor) else tuple(router_logits)
    if not layers:
        raise ValueError(f"{loss_name} needs at least one layer of router logits")
    return layers


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | torch.Tensor,
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e``, averaged over layers.

    ``f_e`` is the share of the N*k top-k assignments that go to expert e (sums to 1) and ``P_e``
    the mean routing probability of e, so a perfectly uniform router scores exactly 1.0 and a
    router that sends everything to one expert with certainty scores E.
    """
    layers = _as_layers(router_logits, "load_balancing_loss")
    total = 0.0
    for logits in layers:
        probs = torch.softmax(logits.float(), dim=-1)
        selected = probs.topk(top_k, dim=-1).indices  # [N, k]
        assign = F.one_hot(selected, num_experts).float().sum(dim=1)  # [N, E]
        mask = _flat_mask(attention_mask, probs.shape[0], probs.device)
        if mask is None:
            f = assign.sum(0) / (probs.shape[0] * top_k)
            p = probs.mean(0)
        else:
            denom = mask.sum().clamp(min=1.0)
            f = (assign * mask[:, None]).sum(0) / (denom * top_k)
            p = (probs * mask[:, None]).sum(0) / denom
        total = total + num_experts * (f * p).sum()
    return total / len(layers)


def router_z_loss(router_logits: tuple[torch.Tensor, ...] | torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-sum-exp of the logits, averaged over layers.

    Keeps logits small so the softmax stays numerically tame; zero logits over E experts give
    ``log(E) ** 2``.
    """
    layers = _as_layers(router_logits, "router_z_loss")
    total = 0.0
    for logits in layers:
        z = torch.logsumexp(logits.float(), dim=-1) ** 2
        mask = _flat_mask(attention_mask, z.shape[0], z.device)
        total = total + (z.mean() if mask is None else (z * mask).sum() / mask.sum().clamp(min=1.0))
    return total / len(layers)


# --------------------------------------------------------------------------- modules
class StudyMoeTopKRouter(nn.Module):
    """Linear router with top-k or random selection, jitter and capacity limits (see module doc)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.hidden_size
        self.routing = config.routing
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = config.capacity_factor
        self.jitter_noise = config.router_jitter_noise
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {self.num_experts}], got {self.top_k}")
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        # assignments the capacity limit dropped in the last forward (a 0-d tensor: no host sync)
        self.last_num_dropped = torch.zeros((), dtype=torch.long)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if self.training and self.jitter_noise > 0:  # multiplicative input jitter (Switch Transformer)
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        router_logits = F.linear(hidden_states, self.weight)  # [N, E]
        n = router_logits.shape[0]
        if self.routing == "topk":
            probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
            top_k_weights, top_k_index = probs.topk(self.top_k, dim=-1)
            if self.norm_topk_prob:
                top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        else:
            top_k_index = random_expert_choice(n, self.num_experts, self.top_k, device=router_logits.device)
            top_k_weights = torch.full((n, self.top_k), 1.0 / self.top_k, device=router_logits.device)
        if self.capacity_factor is not None:
            capacity = expert_capacity(n, self.num_experts, self.top_k, self.capacity_factor)
            keep = capacity_keep_mask(top_k_index, self.num_experts, capacity)
            top_k_weights = top_k_weights * keep
            self.last_num_dropped = (~keep).sum()
        else:
            self.last_num_dropped = torch.zeros((), dtype=torch.long, device=router_logits.device)
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index


class StudyMoeExperts(nn.Module):
    """E gated feed-forward experts, dispatched sparsely: each expert sees only its tokens.

    Assignments are sorted by expert, every expert runs one matmul pair on its contiguous slice,
    and the weighted results are scattered back with ``index_add_``. Assignments with weight 0
    (capacity drops) or index ``E`` (transformers' "no expert" sentinel) are skipped. Under fake
    tensors (nnsight's shape-only scan) there is no routing to dispatch on, so it returns zeros.
    """

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def expert_forward(self, expert: int, x: torch.Tensor, gate_up=None, down=None) -> torch.Tensor:
        """One expert's gated FFN on its tokens ``[n, H] -> [n, H]`` (weights may be pre-unbound views)."""
        gate_up = self.gate_up_proj[expert] if gate_up is None else gate_up
        down = self.down_proj[expert] if down is None else down
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, down)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if is_fake(hidden_states):  # shape-only scan (nnsight/nnterp): no data to dispatch on
            return torch.zeros_like(hidden_states)
        n, k = top_k_index.shape
        flat_expert = top_k_index.reshape(-1)
        flat_weight = top_k_weights.reshape(-1)
        flat_token = torch.arange(n, device=hidden_states.device).repeat_interleave(k)
        active = (flat_weight != 0) & (flat_expert < self.num_experts)
        flat_expert, flat_weight, flat_token = flat_expert[active], flat_weight[active], flat_token[active]

        order = torch.argsort(flat_expert, stable=True)
        token_sorted = flat_token[order]
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        x = hidden_states.index_select(0, token_sorted)
        # split/unbind (not slicing/indexing) so the backward pass concatenates gradients
        # instead of filling a full-size zero tensor per expert
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outputs = []
        for expert, chunk in enumerate(torch.split(x, counts)):
            if chunk.shape[0]:
                outputs.append(self.expert_forward(expert, chunk, gate_up[expert], down[expert]))
        final = torch.zeros_like(hidden_states)
        if outputs:
            y = torch.cat(outputs) * flat_weight[order, None].to(hidden_states.dtype)
            final.index_add_(0, token_sorted, y.to(final.dtype))
        return final


class StudyMoeSparseBlock(nn.Module):
    """The MoE feed-forward of a decoder layer: ``gate`` routes, ``experts`` compute."""

    def __init__(self, config):
        super().__init__()
        self.gate = StudyMoeTopKRouter(config)
        self.experts = StudyMoeExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)
        _, top_k_weights, top_k_index = self.gate(flat)
        return self.experts(flat, top_k_index, top_k_weights).reshape(batch_size, sequence_length, hidden_dim)
