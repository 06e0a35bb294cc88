"""Read each expert's gate, up and down projections in one layout, whatever the family stores.

The toolkit's layout is ``gate [E, I, H]``, ``up [E, I, H]``, ``down [E, H, I]`` (PyTorch
``Linear`` convention: rows are outputs). transformers 5 marks its fused experts with
``is_transposed``, ``is_concatenated`` and ``has_gate`` (``use_experts_implementation``); a
module list of per-expert MLPs is stacked. ``gate`` is ``None`` for experts without a gate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

_GATE_NAMES = ("gate_proj", "w1", "wi_0", "fc_gate")
_UP_NAMES = ("up_proj", "w3", "wi_1", "fc1", "wi", "c_fc")
_DOWN_NAMES = ("down_proj", "w2", "wo", "fc2", "c_proj")


class ExpertLayoutError(ValueError):
    """The experts module stores its weights in a way the toolkit does not recognise."""


def _linear_weight(module: nn.Module, names: tuple[str, ...]) -> torch.Tensor | None:
    for n in names:
        sub = getattr(module, n, None)
        if isinstance(sub, nn.Linear):
            return sub.weight.detach()
        if isinstance(sub, torch.Tensor) and sub.dim() == 2:
            return sub.detach()
    return None


def _from_module_list(experts: nn.ModuleList) -> dict[str, torch.Tensor | None]:
    gates, ups, downs = [], [], []
    for i, e in enumerate(experts):
        g, u, d = _linear_weight(e, _GATE_NAMES), _linear_weight(e, _UP_NAMES), _linear_weight(e, _DOWN_NAMES)
        if u is None or d is None:
            raise ExpertLayoutError(
                f"expert {i} ({type(e).__name__}) has no recognisable up/down projections (looked for {_UP_NAMES} / {_DOWN_NAMES})"
            )
        gates.append(g)
        ups.append(u)
        downs.append(d)
    gate = torch.stack(gates) if all(g is not None for g in gates) else None
    return {"gate": gate, "up": torch.stack(ups), "down": torch.stack(downs)}


def _from_fused(experts: nn.Module) -> dict[str, torch.Tensor | None]:
    transposed = bool(getattr(experts, "is_transposed", False))
    concatenated = bool(getattr(experts, "is_concatenated", True))
    gate_up = getattr(experts, "gate_up_proj", None)
    up_only = getattr(experts, "up_proj", None)
    down = getattr(experts, "down_proj", None)
    if down is None or (gate_up is None and up_only is None):
        raise ExpertLayoutError(
            f"experts module {type(experts).__name__} has neither gate_up_proj/up_proj+down_proj parameters nor a list of experts"
        )
    down = down.detach()
    if transposed:  # stored as [E, in, out]
        down = down.transpose(1, 2)
    gate = None
    if gate_up is not None and getattr(experts, "has_gate", True):
        gu = gate_up.detach()
        if transposed:
            gu = gu.transpose(1, 2)  # -> [E, 2I, H]
        if concatenated:
            gate, up = gu.chunk(2, dim=1)
        else:
            gate, up = gu[:, ::2], gu[:, 1::2]
    else:
        up = (gate_up if gate_up is not None else up_only).detach()
        if transposed:
            up = up.transpose(1, 2)
    return {"gate": gate, "up": up, "down": down}


def expert_matrices(experts: nn.Module) -> dict[str, torch.Tensor | None]:
    """``{"gate": [E,I,H] | None, "up": [E,I,H], "down": [E,H,I]}`` for one layer's experts."""
    if isinstance(experts, nn.ModuleList):
        return _from_module_list(experts)
    return _from_fused(experts)


class LayerExperts(Mapping):
    """``{layer: expert matrices}`` read from the model when a layer is asked for, never all at once.

    OLMoE's experts are 6.4 GB per 4 layers in float32: a copy of every layer doubled the
    memory of the alignment analysis. Each access reads one layer (a view of the model's own
    weights where they already are float32 on the device asked for; do not edit it in place).
    """

    def __init__(self, readers: Mapping[int, Callable[[], dict[str, torch.Tensor | None]]]) -> None:
        self._readers = dict(readers)

    def __getitem__(self, layer: int) -> dict[str, torch.Tensor | None]:
        return self._readers[layer]()

    def __iter__(self) -> Iterator[int]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)
