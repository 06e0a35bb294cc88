"""Reading and editing, inside an nnsight trace, the selection an experts module receives.

Families pass the selected experts and their weights to the experts module by position or by
keyword (``core.model_access.discovery`` finds which); tracing reads them, and ablation removes
experts from them in place and renormalizes the rest, so the rest of the forward pass runs as
the model would without those experts.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from core.model_access.discovery import INDEX_NAMES, WEIGHT_NAMES, MoELayerInfo


def experts_selection(info: MoELayerInfo, args: Any, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    """The ``(indices, weights)`` the experts module was called with, passed by position or by keyword."""

    def arg(spec: int | str | None, names: tuple[str, ...]) -> Any:
        if isinstance(spec, int) and spec < len(args):
            return args[spec]
        for n in names:
            if n in kwargs:
                return kwargs[n]
        raise KeyError(f"layer {info.layer}: the experts module {info.experts_path} was not given argument {spec!r}")

    return arg(info.experts_index_arg, INDEX_NAMES), arg(info.experts_weight_arg, WEIGHT_NAMES)


def renormalize_without(idx: torch.Tensor, weights: torch.Tensor, experts: list[int]) -> None:
    """In place: zero the weights of ``experts`` and rescale the rest to the original row total."""
    drop = torch.isin(idx, torch.tensor(experts, device=idx.device))
    total = weights.sum(dim=-1, keepdim=True)
    kept = weights.masked_fill(drop, 0)
    kept_sum = kept.sum(dim=-1, keepdim=True)
    scale = torch.where(kept_sum != 0, total / kept_sum.where(kept_sum != 0, torch.ones_like(kept_sum)), torch.zeros_like(kept_sum))
    weights.copy_(kept * scale)


class ExpertsAblation:
    """The same edit as a PyTorch pre-hook on each ablated layer's experts module: ablation in a plain local forward.

    ``with ExpertsAblation(modules, [(info, experts), ...]):`` one forward of the model then runs
    without those experts; the hooks are gone on leaving. An nnsight trace costs a fixed time per
    forward (about 40% of a small model's), and ablation and pruning run hundreds of forwards.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], plan: list[tuple[MoELayerInfo, list[int]]]) -> None:
        self._modules, self._plan, self._handles = modules, plan, []

    def __enter__(self) -> "ExpertsAblation":
        for info, experts in self._plan:
            hook = lambda _m, args, kwargs, info=info, experts=experts: renormalize_without(  # noqa: E731
                *experts_selection(info, args, kwargs), experts)
            self._handles.append(self._modules[info.experts_path].register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
