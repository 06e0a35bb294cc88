"""The routing monitor wired to trainers: the toolkit's own, and ``transformers``' Trainer for any HF MoE.

Why here: the monitor is an analysis (``core.analysis.routing_monitor``), the routers of an HF
model are found by ``core.model_access.discovery`` and the toolkit's trainer lives in
``core.study_moe``; rooms of one layer never import each other, so the study's layer joins them.

The callback reads the experts each router actually selected in every training forward (the
selection its experts module receives, or the router's own top-k output; the top-k of its scores
only where neither is visible), with the batch's attention mask, so padding is left out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from core.analysis.diagnosis import CollapseThresholds
from core.analysis.routing_monitor import RoutingMonitor, monitor_scalars
from core.model_access.discovery import MoELayerInfo, MoESpec, discover_moe_layers
from core.model_access.interventions import experts_selection
from core.model_access.router_outputs import router_scores, scores_and_indices

DEFAULT_WINDOW = 50  # training batches the diagnosis is taken over


def study_moe_monitor(window: int = DEFAULT_WINDOW) -> Callable[[Any], RoutingMonitor]:
    """A monitor factory for ``core.study_moe.training.train(monitor=...)``: one monitor per run's config."""
    return lambda cfg: RoutingMonitor(range(cfg.num_layers), cfg.num_experts, cfg.top_k, window=window)


class SelectionHooks:
    """Forward hooks that hand each training forward's selected experts ``[N, k]`` per layer to a monitor."""

    def __init__(self, model: nn.Module, layers: list[MoELayerInfo], monitor: RoutingMonitor) -> None:
        self.monitor, self._layers = monitor, layers
        self._selected: list[torch.Tensor | None] = [None] * len(layers)
        self._mask: torch.Tensor | None = None
        named = dict(model.named_modules())
        self._handles = [model.register_forward_pre_hook(self._begin, with_kwargs=True),
                         model.register_forward_hook(self._end)]
        for i, info in enumerate(layers):
            self._handles.append(named[info.router_path].register_forward_hook(self._router_hook(i, info)))
            if info.experts_index_arg is not None and info.experts_path is not None:
                hook = self._experts_hook(i, info)
                self._handles.append(named[info.experts_path].register_forward_pre_hook(hook, with_kwargs=True))

    def _begin(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        self._selected = [None] * len(self._layers)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _router_hook(self, i: int, info: MoELayerInfo):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if info.experts_index_arg is None and scores_and_indices(out, info):
                self._selected[i] = out[2]
            elif self._selected[i] is None:  # replaced by the experts' input where the experts take one
                self._selected[i] = router_scores(out, info).topk(info.top_k, dim=-1).indices
        return hook

    def _experts_hook(self, i: int, info: MoELayerInfo):
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            self._selected[i] = experts_selection(info, args, kwargs)[0]
        return hook

    def _end(self, module: nn.Module, args: Any, out: Any) -> None:
        if module.training and all(s is not None for s in self._selected):
            self.monitor.update([s for s in self._selected if s is not None], self._mask)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class RoutingMonitorCallback(TrainerCallback):
    """The live routing diagnosis for ``transformers.Trainer``: every log step, its record in the Trainer's logs.

    Scalars (``routing_monitor/alarms``, ``routing_monitor/layer_<l>/dead`` ...) go into the logs every
    reporter receives; put the callback first (``add_to(trainer)``) so W&B and TensorBoard see them.
    The whole record goes into ``trainer.state.log_history`` (``trainer_state.json``) and, with
    ``log_file``, one JSON line per log step.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, log_file: str | Path | None = None,
                 thresholds: CollapseThresholds | None = None, moe_spec: MoESpec | None = None) -> None:
        self.window, self.thresholds, self.moe_spec = window, thresholds, moe_spec
        self.log_file = None if log_file is None else Path(log_file)
        self.monitor: RoutingMonitor | None = None
        self.hooks: SelectionHooks | None = None
        self._logged_step = -1

    def add_to(self, trainer: Any) -> RoutingMonitorCallback:
        """Insert this callback before the Trainer's reporters, so that they log its scalars."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.hooks is None and model is not None:
            layers = discover_moe_layers(model, self.moe_spec)
            self.monitor = RoutingMonitor([info.layer for info in layers], layers[0].num_experts, layers[0].top_k,
                                          window=self.window, thresholds=self.thresholds)
            self.hooks = SelectionHooks(model, layers, self.monitor)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is None or logs is None or state.global_step == self._logged_step:
            return  # the end-of-training summary logs at the last step again: one record per step
        self._logged_step = state.global_step
        record = self.monitor.record()
        logs.update(monitor_scalars(record))
        if state.log_history:
            state.log_history[-1]["routing_monitor"] = record
        if self.log_file is not None and state.is_world_process_zero:
            with self.log_file.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "routing_monitor": record}) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
