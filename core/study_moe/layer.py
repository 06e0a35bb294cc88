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
per forward, N counting real (non-padding) tokens only. Assignments are served slot-major
(every token's first choice before any second choice), then in token order. A dropped
assignment keeps its expert index and gets weight 0; the experts module skips zero-weight
assignments (no compute), so a token whose every assignment is dropped passes through the
layer on the residual stream only. The router counts drops of its last forward in
``router.last_num_dropped`` (a 0-d tensor) and keeps the experts it chose in
``router.last_top_k_index`` (the balance loss must count the actual choice, random or not).

Padding: the block takes an optional ``token_mask`` (True for real tokens; the model passes its
attention mask). Padding tokens get weight 0 on every slot, take no capacity and are left out
of the balance and z-losses, so real tokens route exactly as they would without the padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from transformers.activations import ACT2FN

from core.study_moe.dispatch import DEFAULT_EXPERT_DISPATCH, check_dispatch, dispatch, sorted_assignments

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


def capacity_keep_mask(
    top_k_index: torch.Tensor, num_experts: int, capacity: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean ``[N, k]``: True for assignments within their expert's capacity.

    Priority is slot-major (all first choices, then all second choices), then token order, so a
    token's preferred expert is kept before anyone's fallback expert. Tokens False in
    ``token_mask [N]`` (padding) take no slot and are never kept.
    """
    n, k = top_k_index.shape
    slot_major = top_k_index.t().reshape(-1)  # [k*N]: slot 0 of every token, then slot 1, ...
    onehot = F.one_hot(slot_major, num_experts)
    if token_mask is not None:
        real = token_mask.reshape(-1).bool().repeat(k)  # [k*N], slot-major like slot_major
        onehot = onehot * real[:, None]
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1)  # 1-based rank inside its expert; 0 for padding
    keep = (position <= capacity) & (position > 0)
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


def dispatch_fractions(selected: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``f [E]``: the share of the (real tokens') ``[N, k]`` assignments that go to each expert."""
    assign = F.one_hot(selected.long().clamp(0, num_experts - 1), num_experts).float()  # [N, k, E]
    valid = (selected >= 0) & (selected < num_experts)  # -1 or E: no expert
    if mask is not None:
        valid = valid & mask.bool()[:, None]
    assign = (assign * valid[..., None]).sum(dim=1)  # [N, E]
    return assign.sum(0) / valid.sum().clamp(min=1)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | torch.Tensor,
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    selected: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e``, averaged over layers.

    ``f_e`` is the share of the N*k assignments that go to expert e (sums to 1) and ``P_e`` the
    mean routing probability of e, so a perfectly uniform router scores exactly 1.0 and a router
    that sends everything to one expert with certainty scores E. ``selected`` ([N, k] per layer)
    are the experts actually chosen (random routing does not choose the top-k); without it
    they are the top-k of the logits.
    """
    layers = _as_layers(router_logits, "load_balancing_loss")
    chosen = [None] * len(layers) if selected is None else _as_layers(selected, "load_balancing_loss")
    if len(chosen) != len(layers):
        raise ValueError(f"selected has {len(chosen)} layers but router_logits has {len(layers)}")
    total = 0.0
    for logits, sel in zip(layers, chosen):
        probs = torch.softmax(logits.float(), dim=-1)
        sel = probs.topk(top_k, dim=-1).indices if sel is None else sel.reshape(probs.shape[0], -1).to(probs.device)
        mask = _flat_mask(attention_mask, probs.shape[0], probs.device)
        f = dispatch_fractions(sel, num_experts, mask)
        if mask is None:
            p = probs.mean(0)
        else:
            p = (probs * mask[:, None]).sum(0) / mask.sum().clamp(min=1.0)
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
        # the experts chosen in the last forward [N, k]: what the balance loss counts
        self.last_top_k_index: torch.Tensor | None = None

    def _select(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, index) [N, k]`` before capacity: top-k of the softmax, or k uniform random experts."""
        n = router_logits.shape[0]
        if self.routing == "topk":
            probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
            top_k_weights, top_k_index = probs.topk(self.top_k, dim=-1)
            if self.norm_topk_prob:
                top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
            return top_k_weights, top_k_index
        top_k_index = random_expert_choice(n, self.num_experts, self.top_k, device=router_logits.device)
        return torch.full((n, self.top_k), 1.0 / self.top_k, device=router_logits.device), top_k_index

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route ``[N, H]`` tokens; ``token_mask [N]`` (True = real) keeps padding out of capacity and weights."""
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if self.training and self.jitter_noise > 0:  # multiplicative input jitter (Switch Transformer)
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        router_logits = F.linear(hidden_states, self.weight)  # [N, E]
        n = router_logits.shape[0]
        top_k_weights, top_k_index = self._select(router_logits)
        real = None if token_mask is None else token_mask.reshape(-1).to(device=router_logits.device, dtype=torch.bool)
        if real is not None and real.shape[0] != n:
            raise ValueError(f"token_mask has {real.shape[0]} entries but the router saw {n} tokens")
        if self.capacity_factor is not None:
            n_real = n if real is None or is_fake(real) else int(real.sum())
            capacity = expert_capacity(n_real, self.num_experts, self.top_k, self.capacity_factor)
            keep = capacity_keep_mask(top_k_index, self.num_experts, capacity, real)
            top_k_weights = top_k_weights * keep
            dropped = ~keep if real is None else ~keep & real[:, None]
            self.last_num_dropped = dropped.sum()
        else:
            if real is not None:
                top_k_weights = top_k_weights * real[:, None]
            self.last_num_dropped = torch.zeros((), dtype=torch.long, device=router_logits.device)
        self.last_top_k_index = top_k_index.detach()
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index


class StudyMoeExperts(nn.Module):
    """E gated feed-forward experts, dispatched sparsely: each expert sees only its tokens.

    Assignments are sorted by expert, every expert runs one matmul pair on its contiguous slice,
    and the weighted results are scattered back with ``index_add_``. Assignments with weight 0
    (capacity drops) or index ``E`` (transformers' "no expert" sentinel) are skipped. The config's
    ``expert_dispatch`` says how the matmuls are issued: ``"loop"`` (one pair per expert, the
    reference) or ``"grouped"`` (two grouped matmuls for all experts; ``core.study_moe.dispatch``). Under fake
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
        self.expert_dispatch = check_dispatch(getattr(config, "expert_dispatch", DEFAULT_EXPERT_DISPATCH))

    def expert_forward(self, expert: int, x: torch.Tensor, gate_up=None, down=None) -> torch.Tensor:
        """One expert's gated FFN on its tokens ``[n, H] -> [n, H]`` (weights may be pre-unbound views)."""
        gate_up = self.gate_up_proj[expert] if gate_up is None else gate_up
        down = self.down_proj[expert] if down is None else down
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, down)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if is_fake(hidden_states):  # shape-only scan (nnsight/nnterp): no data to dispatch on
            return torch.zeros_like(hidden_states)
        assigned = sorted_assignments(top_k_index, top_k_weights, self.num_experts)
        return dispatch(self.expert_dispatch, self, hidden_states, assigned)


class StudyMoeSparseBlock(nn.Module):
    """The MoE feed-forward of a decoder layer: ``gate`` routes, ``experts`` compute."""

    def __init__(self, config):
        super().__init__()
        self.gate = StudyMoeTopKRouter(config)
        self.experts = StudyMoeExperts(config)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, H] -> [B, T, H]``; ``token_mask [B, T]`` (True = real token) keeps padding out of routing."""
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)
        if token_mask is None:  # called as transformers' blocks are: the router sees only the hidden states
            _, top_k_weights, top_k_index = self.gate(flat)
        else:
            _, top_k_weights, top_k_index = self.gate(flat, token_mask.reshape(-1))
        return self.experts(flat, top_k_index, top_k_weights).reshape(batch_size, sequence_length, hidden_dim)
