"""Record what routing needs from one forward pass, with plain PyTorch hooks.

What is kept is declared once per MoE layer (as transformers' ``_can_record_outputs`` does):
the router's scores, the selection its experts module receives (indices and weights), and,
when asked, the hidden state entering chosen layers. Nothing else is held: the experts'
hidden-state input is dropped as soon as the selection is read from it.

This is the local recording path. An nnsight trace records the same things (and is what runs
remotely), but interleaves with every module of the model, which costs a fixed time per
forward that dominates on small models; hooks on the routers cost next to nothing.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from core.model_access.discovery import MoELayerInfo
from core.model_access.interventions import experts_selection
from core.model_access.router_outputs import router_scores, scores_and_indices

__all__ = ["RoutingRecorder"]


class RoutingRecorder:
    """Hooks for one forward: ``scores[i]``, ``chosen[i]`` per MoE layer, ``hidden[j]`` per asked layer.

    ``chosen[i]`` is ``(indices, weights)`` as the experts received them, or None where neither
    the experts' input nor the router's tuple carries them (the caller takes top-k of the scores).
    """

    def __init__(self, modules: Mapping[str, nn.Module], layers: list[MoELayerInfo],
                 hidden_modules: Mapping[int, nn.Module] | None = None) -> None:
        self._modules, self._layers = modules, layers
        self._hidden_modules = dict(hidden_modules or {})
        self.scores: list[Any] = [None] * len(layers)
        self.chosen: list[Any] = [None] * len(layers)
        self.hidden: list[Any] = [None] * len(self._hidden_modules)
        self._calls: dict[str, int] = {}
        self._handles: list[Any] = []

    def _count(self, path: str) -> None:
        self._calls[path] = self._calls.get(path, 0) + 1
        if self._calls[path] > 1:
            raise RuntimeError(f"module {path} ran more than once in one forward; routing per token is ambiguous")

    def __enter__(self) -> "RoutingRecorder":
        for i, info in enumerate(self._layers):
            self._handles.append(self._modules[info.router_path].register_forward_hook(self._router_hook(i, info)))
            if info.experts_index_arg is not None:
                experts = self._modules[info.experts_path]
                self._handles.append(experts.register_forward_pre_hook(self._experts_hook(i, info), with_kwargs=True))
        for j, module in enumerate(self._hidden_modules.values()):
            self._handles.append(module.register_forward_pre_hook(self._hidden_hook(j), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _router_hook(self, i: int, info: MoELayerInfo):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self._count(info.router_path)
            self.scores[i] = router_scores(out, info)
            if info.experts_index_arg is None and scores_and_indices(out, info):
                self.chosen[i] = (out[2], out[1])
        return hook

    def _experts_hook(self, i: int, info: MoELayerInfo):
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            self._count(str(info.experts_path))
            self.chosen[i] = experts_selection(info, args, kwargs)
        return hook

    def _hidden_hook(self, j: int):
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            self.hidden[j] = args[0] if args else kwargs["hidden_states"]
        return hook

    def take(self) -> tuple[list, list, list]:
        """The records of the forward that just ran, handed over; the recorder then waits for the next one.

        What lets one recorder live through the many forwards of ``generate()`` (prefill, then one
        per decoding step) while still refusing a module that runs twice within one forward.
        """
        taken = (self.scores, self.chosen, self.hidden)
        self.scores = [None] * len(self._layers)
        self.chosen = [None] * len(self._layers)
        self.hidden = [None] * len(self._hidden_modules)
        self._calls = {}
        return taken

    def missing(self) -> list[str]:
        """Routers that did not run in the forward (a model path the discovery got wrong)."""
        return [info.router_path for info, s in zip(self._layers, self.scores) if s is None]
