"""How the experts module sends assignments to its E experts: a Python loop, or one grouped matmul.

Both start from the same sorted assignments (``sorted_assignments``: zero-weight capacity drops
and the "no expert" index ``E`` left out, the rest sorted by expert, stable in token order) and
end with the same weighted ``index_add_`` back to the tokens, so they differ only in how the
per-expert matmuls are issued:

* ``"loop"`` — the reference: one ``F.linear`` pair per expert that has tokens (E calls per layer);
* ``"grouped"`` — ``torch.nn.functional.grouped_mm`` over the contiguous per-expert slices (two
  calls per layer, whatever E). Its kernel takes float32, bfloat16 and float16 with rows whose
  byte strides are multiples of 16; where that does not hold (float64, an odd hidden or
  intermediate size, a torch without ``grouped_mm``) ``grouped_mm_supported`` is False and the
  loop runs instead, so the result is the same either way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

EXPERT_DISPATCHES = ("loop", "grouped")
DEFAULT_EXPERT_DISPATCH = "loop"  # grouped is faster only at E = 64 (1.05-1.17x fwd+bwd) and slower at the 4 x 8 default (0.91-0.96x): README
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SortedAssignments(NamedTuple):
    """The computed assignments sorted by expert: ``expert``, ``weight``, ``token`` [M] and ``counts`` [E]."""

    expert: torch.Tensor
    weight: torch.Tensor
    token: torch.Tensor
    counts: torch.Tensor


def check_dispatch(name: str) -> str:
    """The dispatch name, or a one-line ValueError naming the choices."""
    if name not in EXPERT_DISPATCHES:
        raise ValueError(f"expert_dispatch must be one of {EXPERT_DISPATCHES}, got {name!r}")
    return name


def sorted_assignments(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> SortedAssignments:
    """Drop zero-weight and sentinel assignments, then sort by expert (stable: token order within an expert)."""
    n, k = top_k_index.shape
    flat_expert = top_k_index.reshape(-1)
    flat_weight = top_k_weights.reshape(-1)
    flat_token = torch.arange(n, device=top_k_index.device).repeat_interleave(k)
    active = (flat_weight != 0) & (flat_expert < num_experts)
    flat_expert, flat_weight, flat_token = flat_expert[active], flat_weight[active], flat_token[active]
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts)
    return SortedAssignments(flat_expert[order], flat_weight[order], flat_token[order], counts)


def combine(hidden_states: torch.Tensor, y: torch.Tensor, assigned: SortedAssignments) -> torch.Tensor:
    """Weight each assignment's output and add it to its token (tokens with none stay zero)."""
    final = torch.zeros_like(hidden_states)
    y = y * assigned.weight[:, None].to(y.dtype)
    final.index_add_(0, assigned.token, y.to(final.dtype))
    return final


def loop_dispatch(experts, hidden_states: torch.Tensor, assigned: SortedAssignments) -> torch.Tensor:
    """The reference: ``experts.expert_forward`` once per expert that has assignments."""
    x = hidden_states.index_select(0, assigned.token)
    # split/unbind (not slicing/indexing) so the backward pass concatenates gradients
    # instead of filling a full-size zero tensor per expert
    gate_up, down = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
    outputs = [experts.expert_forward(e, chunk, gate_up[e], down[e])
               for e, chunk in enumerate(torch.split(x, assigned.counts.tolist())) if chunk.shape[0]]
    if not outputs:
        return torch.zeros_like(hidden_states)
    return combine(hidden_states, torch.cat(outputs), assigned)


def grouped_mm_supported(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: a kernel dtype and 16-byte aligned row strides."""
    if not hasattr(F, "grouped_mm") or hidden_states.dtype not in _GROUPED_DTYPES:
        return False
    if gate_up_proj.dtype != hidden_states.dtype or down_proj.dtype != hidden_states.dtype:
        return False
    size = hidden_states.element_size()
    return all(d * size % 16 == 0 for d in (gate_up_proj.shape[-1], down_proj.shape[-1]))


def grouped_dispatch(experts, hidden_states: torch.Tensor, assigned: SortedAssignments) -> torch.Tensor:
    """All experts in two ``grouped_mm`` calls over the sorted slices (``offs``: the slices' ends)."""
    if not grouped_mm_supported(hidden_states, experts.gate_up_proj, experts.down_proj):
        return loop_dispatch(experts, hidden_states, assigned)
    offs = assigned.counts.cumsum(0).to(torch.int32)
    x = hidden_states.index_select(0, assigned.token)
    gate, up = F.grouped_mm(x, experts.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    y = F.grouped_mm(experts.act_fn(gate) * up, experts.down_proj.transpose(-2, -1), offs=offs)
    return combine(hidden_states, y, assigned)


def dispatch(name: str, experts, hidden_states: torch.Tensor, assigned: SortedAssignments) -> torch.Tensor:
    """Run the named dispatch (``EXPERT_DISPATCHES``)."""
    return (grouped_dispatch if check_dispatch(name) == "grouped" else loop_dispatch)(experts, hidden_states, assigned)
