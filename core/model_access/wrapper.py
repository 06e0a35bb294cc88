"""One object that opens any Hugging Face MoE and hands back what its routers did.

Built on nnterp's ``StandardizedTransformer`` (and so on nnsight): routers and experts are
found by :mod:`core.model_access.discovery`, so the rest of the toolkit never asks which family a model
belongs to. Tracing records, per MoE layer and non-padding token, the router logits and the
selection the experts module actually received (which is not always top-k of the logits:
DeepSeek-V3 adds a correction bias and group-limited selection).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from types import SimpleNamespace
from typing import Any, Mapping

import torch
from torch import nn

from core.model_access.bypass import NnsightBypass
from core.model_access.discovery import (ROUTER_KINDS, MoELayerInfo, MoESpec, NoRoutersError, discover_router_kinds, of_kind,
                                         router_matrix)
from core.model_access.expert_weights import LayerExperts, expert_matrices
from core.model_access.generation import GeneratedRouting, generate_routing
from core.model_access.host_copy import PendingCopy, start_host_copy
from core.model_access.interventions import ExpertsAblation, experts_selection, renormalize_without
from core.model_access.recorder import RoutingRecorder
from core.model_access.router_outputs import expert_logits, router_scores, scores_and_indices, topk_weights
from core.model_access.loading import (ModelLoadError, Placement, drop_scan_hooks, has_accelerate_hooks, input_device,
                                       is_big_model, is_dispatched, load_hf, materialized, quiet_nnterp, release_freed_memory,
                                       resolve_dtype)
from core.routing_data import RoutingData

__all__ = ["GeneratedRouting", "ModelLoadError", "MoEModelWrapper"]


class PendingRouting:
    """A traced batch whose tensors are on their way to the host; ``wait()`` builds its ``RoutingData``."""

    def __init__(self, copy: PendingCopy, fields: dict[str, Any], hidden_layers: list[int]) -> None:
        self._copy, self._fields, self._hidden_layers = copy, fields, hidden_layers

    def wait(self) -> RoutingData:
        logits, idx, wts, *hidden = self._copy.wait()
        return RoutingData(
            router_logits=logits.float(), topk_idx=idx.long(), topk_weight=wts.float(),
            hidden={layer: h for layer, h in zip(self._hidden_layers, hidden)}, **self._fields,
        )


def envoy_at(model: Any, path: str) -> Any:
    """The nnsight envoy of the module at ``path`` (``model.layers.3.mlp.gate``)."""
    env = model
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def plain_info(info: MoELayerInfo) -> SimpleNamespace:
    """A layer description as a plain namespace: what a remote trace can carry (NDIF cannot rebuild our dataclasses)."""
    return SimpleNamespace(**{f.name: getattr(info, f.name) for f in dataclasses.fields(info)})


def _read_experts(module: nn.Module, device: str | torch.device) -> dict[str, torch.Tensor | None]:
    """One layer's expert matrices in float32 on ``device``: views where possible, copies where weights are offloaded."""
    with materialized(module):
        mats = expert_matrices(module)
        copy = has_accelerate_hooks(module)  # offloaded weights go back to meta on exit
        return {k: None if v is None else v.to(device, torch.float32, copy=copy) for k, v in mats.items()}


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token ``[B, T-1]`` on the host, in float32, one row of the batch at a time.

    All rows at once held three float32 copies of the logits (cast, shifted, log-softmax): 1.2 GB
    for 8 rows of 256 tokens over OLMoE's 50k vocabulary, on top of the model's forward.
    """
    targets = input_ids[:, 1:].to(logits.device)
    rows = [torch.nn.functional.cross_entropy(logits[b, :-1].float(), targets[b], reduction="none").cpu()
            for b in range(logits.shape[0])]
    return torch.stack(rows) if rows else torch.empty(0, max(logits.shape[1] - 1, 0))


class MoEModelWrapper:
    """A traced MoE language model: which layers route, and what each router decided.

    ``model`` is a Hub name, a local directory, or an in-memory ``torch.nn.Module`` (a
    transformers model). ``remote=True`` hands the name to nnsight for remote execution (NDIF);
    ``remote="local"`` runs every trace through nnsight's local simulation of it (the request
    serialized and restored with this toolkit's modules out of reach, as on NDIF's servers).
    ``moe_spec`` names the router and experts modules of a custom model that does not declare
    them the transformers way. ``engine`` says how routing is recorded and experts ablated locally:
    PyTorch hooks (the default; next to free) or an nnsight trace (what runs remotely); both give
    the same ``RoutingData`` and losses. ``placement`` spreads a model bigger than one device over
    several, or offloads part of it (accelerate, through transformers); a model already dispatched
    that way may be passed in too. Tracing, weights and ablation work the same on it.
    ``router_kind`` picks which routers a model with several kinds is studied through
    (``"feed_forward"``, the default, or ``"attention"``: JetMoE's mixture of attention heads); one
    wrapper traces one kind, so the layers, experts and weights of a ``RoutingData`` are of one kind.
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        revision: str | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        remote: bool | str = False,
        tokenizer: Any = None,
        moe_spec: MoESpec | Mapping[str, Any] | None = None,
        engine: str = "hooks",
        placement: Placement | None = None,
        router_kind: str | None = None,
    ) -> None:
        from nnterp import StandardizedTransformer

        if engine not in ("hooks", "nnsight"):
            raise ValueError(f"engine must be 'hooks' or 'nnsight', got {engine!r}")
        if remote not in (True, False, "local"):
            raise ValueError(f"remote must be True, False or 'local', got {remote!r}")
        if router_kind not in (None, *ROUTER_KINDS):
            raise ValueError(f"router_kind must be one of {', '.join(ROUTER_KINDS)}, got {router_kind!r}")
        self.engine = engine
        self._trims: bool | None = None  # forward_loss gives freed memory back: a big model's (decided at its first call)

        self.revision = revision
        self.device = str(device)
        self.remote = remote
        # where the weights come from and the dtype asked for: what a routing cache's identity is made of
        self.source: Any = None if remote is True else model
        self.dtype_option = dtype
        dtype = resolve_dtype(dtype)
        if isinstance(moe_spec, Mapping):
            moe_spec = MoESpec.from_dict(dict(moe_spec))
        hf_model, tokenizer = self._open_hf_model(model, revision, device, dtype, trust_remote_code, tokenizer, placement)
        self.tokenizer = tokenizer

        self._standardize(StandardizedTransformer, hf_model, tokenizer, trust_remote_code)
        self.hf_model: nn.Module = self.model._model
        if self.hf_model is not None and is_dispatched(self.hf_model):
            self.device = str(input_device(self.hf_model))  # where its inputs go (and what a cache's identity records)
        if self.hf_model is not None:
            drop_scan_hooks(self.hf_model)
        if self.tokenizer is None:
            self.tokenizer = getattr(self.model, "tokenizer", None)
        self._read_layers(moe_spec, router_kind)

    def _open_hf_model(self, model: str | os.PathLike | nn.Module, revision: str | None, device: str, dtype: Any,
                       trust_remote_code: bool, tokenizer: Any, placement: Placement | None) -> tuple[nn.Module | None, Any]:
        """The transformers model to wrap (None when it runs remotely) and its tokenizer; sets ``model_name``."""
        remote = self.remote
        if isinstance(model, nn.Module):
            hf_model = model if remote is True or is_dispatched(model) else model.to(device).eval()
            if dtype not in (None, "auto") and not is_dispatched(hf_model):
                hf_model = hf_model.to(dtype)
            self.model_name = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or type(hf_model).__name__
        elif remote is True:
            hf_model, self.model_name = None, str(model)
        else:
            self.model_name = str(model)
            hf_model, loaded_tok = load_hf(self.model_name, revision, dtype, self.device, trust_remote_code, placement)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        return hf_model, tokenizer

    def _standardize(self, standardized: type, hf_model: nn.Module | None, tokenizer: Any, trust_remote_code: bool) -> None:
        """Set ``model`` to nnterp's ``standardized`` transformer, again without renaming checks where nnterp cannot rename."""
        st_kwargs: dict[str, Any] = {"check_renaming": True, "trust_remote_code": trust_remote_code}
        if tokenizer is not None:
            st_kwargs["tokenizer"] = tokenizer
        if self.remote is True:
            st_kwargs.update(remote=True, revision=self.revision)
        with quiet_nnterp():
            try:
                self.model = standardized(hf_model if hf_model is not None else self.model_name, **st_kwargs)
            except Exception as e:  # nnterp could not standardise the names: tracing by module path still works
                if type(e).__name__ != "RenamingError":
                    raise
                st_kwargs["check_renaming"] = False
                self.model = standardized(hf_model if hf_model is not None else self.model_name, **st_kwargs)

    def _read_layers(self, moe_spec: MoESpec | None, router_kind: str | None) -> None:
        """Find the MoE layers of the kind asked for and set the model-wide facts (layer count, experts, top-k), refusing mixed ones."""
        kinds = discover_router_kinds(self.hf_model, moe_spec)
        self.router_kinds: dict[str, list[int]] = {kind: [info.layer for info in infos] for kind, infos in kinds.items()}
        self.layers: list[MoELayerInfo] = of_kind(kinds, router_kind, type(self.hf_model).__name__)
        self.router_kind: str = self.layers[0].kind
        self._modules = dict(self.hf_model.named_modules())
        self._bypass = NnsightBypass(list(self._modules.values()))
        cfg = getattr(self.hf_model, "config", None)
        n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(getattr(cfg, "text_config", None), "num_hidden_layers", None)
        self.num_layers: int = int(n_layers) if n_layers else int(getattr(self.model, "num_layers", len(self.layers)))
        experts = {info.num_experts for info in self.layers}
        ks = {info.top_k for info in self.layers}
        if len(experts) != 1 or len(ks) != 1:
            raise NoRoutersError(f"MoE layers disagree on expert count {sorted(experts)} or top-k {sorted(ks)}; not supported yet")
        self.num_experts: int = experts.pop()
        self.top_k: int = ks.pop()
        self.hidden_size: int = self.layers[0].hidden_size
        self.score_fn: str = self.layers[0].score_fn

    # ----------------------------------------------------------------- facts
    @property
    def moe_layers(self) -> list[int]:
        """Model layer indices that have a router (dense layers are left out)."""
        return [info.layer for info in self.layers]

    @property
    def num_experts_per_layer(self) -> dict[int, int]:
        return {info.layer: info.num_experts for info in self.layers}

    @property
    def top_k_per_layer(self) -> dict[int, int]:
        return {info.layer: info.top_k for info in self.layers}

    @property
    def shared_experts(self) -> dict[int, int]:
        """Number of always-on shared experts per MoE layer (0 where the family has none)."""
        return {info.layer: info.shared_experts for info in self.layers}

    def describe(self) -> dict[str, Any]:
        """The facts a report's summary needs, as plain values."""
        return {
            "model": self.model_name,
            "revision": self.revision,
            "family": getattr(getattr(self.hf_model, "config", None), "model_type", type(self.hf_model).__name__),
            "num_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "shared_experts": self.shared_experts,
            "score_fn": self.score_fn,
            "router_kind": self.router_kind,
            "router_kinds": dict(self.router_kinds),
            "warnings": self.untraced_routers(),
        }

    def untraced_routers(self) -> list[str]:
        """One line per kind of router the model has that this wrapper does not trace (a run says it: nothing is dropped silently)."""
        return [f"the model also has {kind.replace('_', '-')} routers (layers {layers}), not traced here: this wrapper "
                f"traces its {self.router_kind.replace('_', '-')} routers; MoEModelWrapper(..., router_kind={kind!r}) traces those"
                for kind, layers in self.router_kinds.items() if kind != self.router_kind]

    # ---------------------------------------------------------------- inputs
    def _inputs(self, input_ids: Any, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(input_ids, Mapping):
            attention_mask = input_ids.get("attention_mask", attention_mask)
            input_ids = input_ids["input_ids"]
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask).to(input_ids.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if input_ids.dim() != 2 or input_ids.numel() == 0 or not attention_mask.any():
            raise ValueError(f"nothing to trace: input_ids of shape {tuple(input_ids.shape)} with "
                             f"{int(attention_mask.bool().sum())} real tokens (give [batch, tokens] with at least one token)")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        vocab = self._vocab_size()  # padding positions are embedded too, so every id is checked
        if vocab is not None:
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= vocab:
                raise ValueError(f"token ids must lie in [0, {vocab}) for this model's vocabulary; got ids from "
                                 f"{lo} to {hi} (a tokenizer of another model?)")
        return input_ids, attention_mask

    def _vocab_size(self) -> int | None:
        emb = getattr(self.hf_model, "get_input_embeddings", lambda: None)() if self.hf_model is not None else None
        n = getattr(emb, "num_embeddings", None)
        return int(n) if n else getattr(getattr(self.hf_model, "config", None), "vocab_size", None)

    # --------------------------------------------------------------- tracing
    def trace_routing(
        self,
        input_ids: Any,
        attention_mask: torch.Tensor | None = None,
        hidden_layers: tuple[int, ...] | list[int] = (),
    ) -> RoutingData:
        """Router logits and actual expert selection for every non-padding token of a batch."""
        return self.start_trace(input_ids, attention_mask, hidden_layers).wait()

    def start_trace(
        self,
        input_ids: Any,
        attention_mask: torch.Tensor | None = None,
        hidden_layers: tuple[int, ...] | list[int] = (),
    ) -> "PendingRouting":
        """Trace a batch and start its one copy to the host; ``.wait()`` gives the ``RoutingData``.

        Only what routing needs leaves the trace: each router's scores and the selected experts
        and weights (the experts' hidden-state input is not kept). On a GPU the copy runs while
        the caller queues the next batch.
        """
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        dev = self._device()
        feed = {"input_ids": input_ids.to(dev), "attention_mask": attention_mask.to(dev)}
        hidden_layers = sorted(set(int(h) for h in hidden_layers))
        if hidden_layers:
            blocks = len(self.model.layers)  # the decoder blocks, which some configs count differently
            bad = [h for h in hidden_layers if not 0 <= h < blocks]
            if bad:
                raise ValueError(f"hidden_layers {bad} out of range: the model has {blocks} decoder layers")
        record = self._record_nnsight if self.remote or self.engine == "nnsight" else self._record_hooks
        scores, chosen, hidden_saved = record(feed, hidden_layers)
        rows_host = attention_mask.reshape(-1).cpu().nonzero().squeeze(1)
        tensors = self._layer_rows(scores, chosen, dev) + [h.reshape(-1, h.shape[-1]).to(dev) for h in hidden_saved]
        if rows_host.numel() < attention_mask.numel():  # padding to drop (the stacked rows are already new tensors)
            rows = rows_host.to(dev)
            tensors = [t.index_select(0, rows) for t in tensors]
        else:
            tensors = [t.clone() if i >= 3 else t for i, t in enumerate(tensors)]  # hidden states: not views of the model's
        return PendingRouting(
            start_host_copy(tensors),
            dict(moe_layers=self.moe_layers, num_experts=self.num_experts, top_k=self.top_k, score_fn=self.score_fn,
                 token_ids=input_ids.reshape(-1).cpu()[rows_host], positions=rows_host % input_ids.shape[1]),
            hidden_layers,
        )

    def generate_routing(
        self,
        inputs: Any,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        **generate_kwargs: Any,
    ) -> GeneratedRouting:
        """Generate with the key-value cache on, recording each step's routing: how the model routes what it writes.

        ``inputs`` is token ids (``[T]``, ``[B, T]`` left-padded, or a tokenizer's output) or text.
        Returns the sequences (prompt + generated) and a ``RoutingData`` of every token of them, in
        the form and row order of ``trace_routing(sequences, attention_mask)``. Beam search and
        assisted generation are refused (their steps are not one token per final sequence).
        """
        return generate_routing(self, inputs, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                **generate_kwargs)

    def tracing_session(self) -> contextlib.AbstractContextManager:
        """``with wrapper.tracing_session():`` many traces in a row; nnsight's instrumentation is set aside once for all.

        For the hooks engine only (an nnsight trace needs the instrumentation: there it does nothing).
        Nothing but traces may run the model inside it.
        """
        if self.remote or self.engine == "nnsight":
            return contextlib.nullcontext()
        return self._bypass()

    def _record_hooks(self, feed: dict, hidden_layers: list[int]) -> tuple[list, list, list]:
        """One plain forward with PyTorch hooks on the routers (and experts, and asked layers)."""
        hidden_modules = {layer: self.model.layers[layer]._module for layer in hidden_layers}
        with torch.no_grad(), self._bypass(), \
                RoutingRecorder(self._modules, self.layers, hidden_modules) as rec:
            self.hf_model(**feed)
        if rec.missing():
            raise NoRoutersError(f"routers {rec.missing()} did not run in the forward pass; pass a MoESpec naming the right modules")
        return rec.scores, rec.chosen, rec.hidden

    def _record_nnsight(self, feed: dict, hidden_layers: list[int]) -> tuple[list, list, list]:
        """The same records through an nnsight trace (what runs remotely).

        The traced code touches only the nnsight model, plain layer descriptions and module-level
        helpers, never the wrapper: what NDIF receives is that code, not this object and its weights.
        """
        model, remote = self.model, self.remote
        plain = {info.layer: plain_info(info) for info in self.layers}
        # nnsight needs module accesses in execution order: layer by layer, input before router before experts
        plan = [(layer, layer in hidden_layers, plain.get(layer)) for layer in sorted(set(self.moe_layers) | set(hidden_layers))]
        scores: list[Any] = []
        chosen: list[Any] = []
        hidden_saved: list[Any] = []
        with torch.no_grad(), model.trace(feed, remote=remote):
            for layer, keep_hidden, info in plan:
                if keep_hidden:
                    hidden_saved.append(model.layers_input[layer].save())
                if info is None:
                    continue
                out = envoy_at(model, info.router_path).output
                scores.append(router_scores(out, info).save())
                if info.experts_index_arg is not None:
                    idx, w = experts_selection(info, *envoy_at(model, info.experts_path).inputs)
                    chosen.append((idx.save(), w.save()))
                elif scores_and_indices(out, info):
                    chosen.append((out[2].save(), out[1].save()))
                else:
                    chosen.append(None)
        return scores, chosen, hidden_saved

    def _layer_rows(self, scores: list, chosen: list, dev: torch.device) -> list[torch.Tensor]:
        """One forward's records as token-major ``[N, L, ...]`` tensors on ``dev``: logits, selected experts (small ints), weights.

        Shared by a teacher-forced trace and each step of a generation, so both give the same fields.
        """
        logits, idx, wts = [], [], []
        for info, lg, sel in zip(self.layers, scores, chosen):
            lg = expert_logits(lg, info).to(dev)
            i, w = self._selection(info, sel, lg)
            logits.append(lg)
            idx.append(i.to(dev))
            wts.append(w.to(dev))
        experts = torch.stack(idx, dim=1)
        experts = experts.masked_fill(experts >= self.num_experts, -1)  # a padding slot some families use (one expert count: _read_layers)
        if dev.type != "cpu":  # small ints make the one copy to the host smaller; on the CPU there is no copy
            experts = experts.to(torch.int16 if self.num_experts < 2**15 else torch.int32)
        return [torch.stack(logits, dim=1), experts, torch.stack(wts, dim=1)]

    def _selection(self, info: MoELayerInfo, sel: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the experts received (read from their input or the router's tuple), else top-k of the scores.

        Ids of ``num_experts`` and above (a padding slot) are set to -1 by the caller, once for all layers.
        """
        if sel is not None:
            idx, w = sel
        else:  # neither the experts nor the router's tuple carry them (JetMoE, Doge): as the block computes them
            idx, w = topk_weights(logits, info)
        idx = idx.reshape(-1, idx.shape[-1]).long()
        w = w.reshape(-1, w.shape[-1])
        if w.shape != idx.shape:  # some routers hand the experts a dense [N, E] score matrix
            w = w.gather(1, idx.clamp(max=w.shape[1] - 1).to(w.device)) if w.shape[1] == info.num_experts else w
        return idx, w

    def _device(self) -> torch.device:
        """Where inputs go: the input embedding's execution device on a dispatched model, else the weights'."""
        return input_device(self.hf_model)

    # ---------------------------------------------------------------- weights
    def get_router_weights(self) -> dict[int, torch.Tensor]:
        """Each MoE layer's router matrix ``[E, H]`` (float32, CPU), keyed by model layer index."""
        out = {}
        for info in self.layers:
            with materialized(self._modules[info.router_path]) as router:
                out[info.layer] = router_matrix(router, info.num_experts, info.hidden_size).float().cpu().clone()
        return out

    def get_expert_weights(self, device: str | torch.device = "cpu") -> LayerExperts:
        """Each MoE layer's experts: ``gate``/``up`` ``[E, I, H]`` (gate may be None), ``down`` ``[E, H, I]``.

        float32 on ``device``, read one layer at a time as the caller asks for it (:class:`LayerExperts`).
        """
        readers = {}
        for info in self.layers:
            if info.experts_path is None:
                raise NoRoutersError(f"layer {info.layer}: no experts module was found next to router {info.router_path}")
            readers[info.layer] = lambda m=self._modules[info.experts_path]: _read_experts(m, device)
        return LayerExperts(readers)

    # --------------------------------------------------------------- ablation
    def _ablated_logits(self, feed: dict, plan: list[tuple[MoELayerInfo, list[int]]]) -> torch.Tensor:
        """The logits of one nnsight trace with ``plan``'s experts removed (what runs remotely, or with engine="nnsight")."""
        model, remote = self.model, self.remote  # the traced code never touches the wrapper (see _record_nnsight)
        plan = [(plain_info(info), experts) for info, experts in plan]
        with torch.no_grad(), model.trace(feed, remote=remote):
            for info, experts in plan:
                renormalize_without(*experts_selection(info, *envoy_at(model, info.experts_path).inputs), experts)
            logits = model.output.logits.save()
        return logits

    def forward_loss(
        self,
        input_ids: Any,
        attention_mask: torch.Tensor | None = None,
        ablate: Mapping[int, list[int]] | None = None,
    ) -> torch.Tensor:
        """Next-token loss per position ``[B, T-1]`` (NaN at padding), with experts optionally ablated.

        Ablating removes the expert from every token's selection at that layer and rescales the
        remaining selected experts' weights so they keep the token's original total weight.
        """
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        ablate = {int(k): sorted(set(int(e) for e in v)) for k, v in (ablate or {}).items() if v}
        by_layer = {info.layer: info for info in self.layers}
        for layer in ablate:
            if layer not in by_layer:
                raise ValueError(f"layer {layer} has no router; MoE layers are {self.moe_layers}")
            if by_layer[layer].experts_index_arg is None:
                raise ValueError(f"layer {layer}: the experts module does not receive the selection, so it cannot be ablated")
            bad = [e for e in ablate[layer] if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(f"layer {layer}: experts {bad} do not exist (the layer has {self.num_experts})")
        dev = self._device()
        feed = {"input_ids": input_ids.to(dev), "attention_mask": attention_mask.to(dev)}
        plan = [(by_layer[layer], experts) for layer, experts in sorted(ablate.items())]
        if self.remote or self.engine == "nnsight":
            logits = self._ablated_logits(feed, plan)
        else:  # the hooks engine, locally: a plain forward, the same edit made by pre-hooks
            with torch.no_grad(), self._bypass(), ExpertsAblation(self._modules, plan):
                logits = self.hf_model(**feed).logits
        loss = next_token_losses(logits, input_ids)
        del logits
        # ablation and pruning call this hundreds of times: without the trim, freed activations stayed in glibc's heap
        # and the resident set kept growing (about 0.1 GB a call over 4 calls at OLMoE's 16 layers, bf16)
        if self._trims is None:
            self._trims = is_big_model(self.hf_model)
        if self._trims:
            release_freed_memory()
        valid = attention_mask[:, 1:].bool().cpu() & attention_mask[:, :-1].bool().cpu()
        return loss.masked_fill(~valid, float("nan"))
