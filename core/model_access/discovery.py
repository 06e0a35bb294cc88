"""Find the routers and experts of any Hugging Face MoE without a per-family table.

transformers declares, per model class, which module's output carries router logits
(``_can_record_outputs["router_logits"]``, an ``OutputRecorder``). That declaration is the
primary source: the router modules are the instances of the declared class, their parent is
the MoE block and the block's ``experts`` child is what receives the selected experts. A
model that declares nothing (a custom or remote-code model) names its modules through a
small :class:`MoESpec`, or falls back to a structural search (a module with an ``experts``
sibling and an ``[E, H]`` weight).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class NoRoutersError(ValueError):
    """The model has no MoE routers the toolkit can find."""


@dataclass
class MoESpec:
    """How to find routers in a model that does not declare them the transformers way.

    ``router`` and ``experts`` are regular expressions matched (``re.fullmatch``) against module
    names from ``model.named_modules()``; ``experts`` may instead be a name relative to the
    router's parent (default ``"experts"``). ``router_output_index`` picks the logits out of a
    router that returns a tuple. ``top_k``/``num_experts`` override what is read from modules
    and config; ``score_fn`` is "softmax" or "sigmoid"; ``renormalize`` says whether the chosen experts'
    weights are scaled to sum to one (read only where the experts module does not receive the weights).
    """

    router: str
    experts: str = "experts"
    router_output_index: int = 0
    top_k: int | None = None
    num_experts: int | None = None
    score_fn: str | None = None
    renormalize: bool | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoESpec":
        return cls(**d)


@dataclass
class MoELayerInfo:
    """Where one MoE layer's router and experts live, and how to read them."""

    layer: int  # index of the decoder layer
    router_path: str  # dotted module name of the router
    experts_path: str | None  # dotted module name of the experts module (None: router output only)
    router_output_index: int  # which element of the router's tuple output holds the logits
    num_experts: int
    top_k: int
    hidden_size: int
    score_fn: str = "softmax"
    # how the experts module receives the selection: positional index or keyword name
    experts_index_arg: int | str | None = None
    experts_weight_arg: int | str | None = None
    shared_experts: int = 0
    shared_paths: list[str] = field(default_factory=list)
    # which block the router serves: "feed_forward", or "attention" (JetMoE's mixture of attention heads)
    kind: str = "feed_forward"
    # where the experts module does not receive the selection (JetMoE, Doge, Llama 4), the weights are rebuilt from
    # the scores: True when the block scales the chosen experts' weights to sum to one (a softmax over the top-k)
    renormalize: bool = False


# the kinds of router, the feed-forward one first: it is what a wrapper traces unless asked for another
ROUTER_KINDS = ("feed_forward", "attention")


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder_layers)\.(\d+)(?:\.|$)")
INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts", "topk_indices", "topk_idx", "indices", "expert_indices")
# router attributes that count the router's output classes (zero or skip experts included), most specific first
ROUTER_EXPERT_ATTRS = ("num_router_classes", "n_routed_experts", "num_experts", "moe_num_experts")
ROUTER_TOPK_ATTRS = ("top_k", "moe_top_k", "num_experts_per_tok")
WEIGHT_NAMES = ("top_k_weights", "routing_weights", "router_scores", "topk_weights", "topk_weight", "weights", "scores", "expert_weights")


def _config_get(config: Any, *names: str) -> Any:
    configs = [config] + [getattr(config, n, None) for n in ("text_config", "language_config", "ffn_config")]
    for cfg in configs:
        if cfg is None:
            continue
        for n in names:
            v = getattr(cfg, n, None)
            if v is not None:
                return v
    return None


def _router_recorders(model: nn.Module) -> list[Any]:
    """All ``router_logits`` recorders declared by the model or any of its submodules."""
    found = []
    for mod in model.modules():
        rec = getattr(type(mod), "_can_record_outputs", None) or {}
        entry = rec.get("router_logits") if isinstance(rec, dict) else None
        if entry is None:
            continue
        for e in entry if isinstance(entry, (list, tuple)) else [entry]:
            if e not in found:
                found.append(e)
    return found


def _matches_recorder(name: str, module: nn.Module, rec: Any) -> bool:
    if isinstance(rec, type):
        return isinstance(module, rec)
    target = getattr(rec, "target_class", None)
    layer_name = getattr(rec, "layer_name", None)
    class_name = getattr(rec, "class_name", None)
    if layer_name is not None and not (name == layer_name or name.endswith("." + layer_name)):
        return False
    if class_name is not None and not type(module).__name__.endswith(class_name):
        return False
    if target is not None and not isinstance(module, target):
        return False
    return target is not None or layer_name is not None or class_name is not None


def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _expert_count_from_module(mod: nn.Module) -> int | None:
    if isinstance(mod, nn.ModuleList):
        return len(mod)
    n = getattr(mod, "num_experts", None)
    if isinstance(n, int):
        return n
    for pname in ("gate_up_proj", "up_proj", "down_proj", "w1"):
        p = getattr(mod, pname, None)
        if isinstance(p, torch.Tensor) and p.dim() == 3:
            return int(p.shape[0])
    return None


def router_matrix(router: nn.Module, num_experts: int, hidden_size: int) -> torch.Tensor:
    """The router's ``[E, H]`` projection, however the module stores it."""
    candidates = []
    for pname, p in router.named_parameters():
        if p.dim() == 2 and tuple(p.shape) == (num_experts, hidden_size):
            candidates.append((pname, p.detach()))
        elif p.dim() == 2 and tuple(p.shape) == (hidden_size, num_experts):
            candidates.append((pname, p.detach().t()))
    if not candidates:
        raise NoRoutersError(
            f"router module {type(router).__name__} has no [{num_experts}, {hidden_size}] weight matrix"
        )
    candidates.sort(key=lambda c: (c[0] not in ("weight", "gate.weight", "linear.weight", "classifier.weight"), c[0]))
    return candidates[0][1]


def _find_experts(named: dict[str, nn.Module], router_name: str, spec: MoESpec | None) -> str | None:
    parent = _parent_name(router_name)
    if spec is not None and spec.experts:
        rel = f"{parent}.{spec.experts}" if parent else spec.experts
        if rel in named:
            return rel
        layer = _layer_index(router_name)
        for n in named:
            if re.fullmatch(spec.experts, n) and _layer_index(n) == layer:
                return n
    for cand in ("experts", "expert", "moe_experts"):
        rel = f"{parent}.{cand}" if parent else cand
        if rel in named:
            return rel
    return None


def _selection_args(experts: nn.Module) -> tuple[int | str | None, int | str | None]:
    """Which forward arguments of the experts module carry the selected indices and weights."""
    if isinstance(experts, nn.ModuleList):
        return None, None
    try:
        # accelerate's dispatch wraps forward (keeping the original as _old_forward): read the original's arguments
        params = list(inspect.signature(getattr(experts, "_old_forward", experts.forward)).parameters.values())
    except (TypeError, ValueError):
        return None, None
    params = [p for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    idx_arg = w_arg = None
    for pos, p in enumerate(params):
        if idx_arg is None and p.name in INDEX_NAMES:
            idx_arg = pos
        elif w_arg is None and p.name in WEIGHT_NAMES:
            w_arg = pos
    if idx_arg is None or w_arg is None:
        return None, None
    return idx_arg, w_arg


def _score_fn(router: nn.Module) -> str:
    """'sigmoid' when the router scores experts with a sigmoid (DeepSeek-V3 style), else 'softmax'."""
    try:
        src = inspect.getsource(type(router).forward)
    except (OSError, TypeError):
        return "softmax"
    uses_sigmoid = "sigmoid" in src
    uses_softmax = "softmax" in src
    return "sigmoid" if uses_sigmoid and not uses_softmax else "softmax"


def _renormalizes(router: nn.Module, block: nn.Module | None, config: Any) -> bool:
    """Whether the block scales the chosen experts' weights to sum to one.

    Said by a ``norm_topk_prob`` the router, its block or the config holds, or by the router's code
    taking its softmax after its top-k (JetMoE and Doge: a softmax over the k chosen scores, which
    sums to one). transformers declares no field for the latter: the code is the only statement of it.
    """
    if _softmax_after_topk(router):
        return True
    for holder in (router, block):
        flag = getattr(holder, "norm_topk_prob", None)
        if isinstance(flag, bool):
            return flag
    return _config_get(config, "norm_topk_prob") is True


def _softmax_after_topk(router: nn.Module) -> bool:
    try:
        src = inspect.getsource(type(router).forward)
    except (OSError, TypeError):
        return False
    topk, softmax = src.find("topk("), src.rfind("softmax(")
    return 0 <= topk < softmax


def _shared_experts(named: dict[str, nn.Module], router_name: str, config: Any) -> tuple[int, list[str]]:
    parent = _parent_name(router_name)
    prefix = f"{parent}." if parent else ""
    paths = [
        n
        for n in named
        if n.startswith(prefix) and "." not in n[len(prefix):] and "shared" in n[len(prefix):] and "gate" not in n[len(prefix):]
    ]
    if not paths:
        return 0, []
    n_cfg = _config_get(config, "n_shared_experts", "num_shared_experts", "shared_expert_count")
    return int(n_cfg) if isinstance(n_cfg, int) and n_cfg > 0 else len(paths), paths


def discover_router_kinds(model: nn.Module, spec: MoESpec | None = None) -> dict[str, list[MoELayerInfo]]:
    """Every MoE layer of ``model`` by kind of router (``ROUTER_KINDS`` order, kinds the model has), each in layer order.

    JetMoE routes both its attention heads and its feed-forward experts: the two are separate
    routings (other experts, other weights), so they are kept apart, never counted as one layer.
    """
    named = dict(model.named_modules())
    config = getattr(model, "config", None)
    hidden_size = _config_get(config, "hidden_size", "d_model", "n_embd") if config is not None else None
    router_names = _innermost(_router_names(model, named, spec, hidden_size))
    by_kind: dict[str, list[MoELayerInfo]] = {}
    seen: set[tuple[str, int]] = set()
    for order, (name, out_index) in enumerate(router_names):
        layer = _layer_index(name)
        layer = order if layer is None else layer
        kind = router_kind(name)
        if (kind, layer) in seen:
            continue
        by_kind.setdefault(kind, []).append(_layer_info(named, name, layer, out_index, spec, config, hidden_size, kind))
        seen.add((kind, layer))
    if not by_kind:
        name = type(model).__name__
        raise NoRoutersError(
            f"{name} has no MoE routers: it declares no router_logits output and no module looks like a router "
            "with experts. Is this a dense model? For a custom MoE pass moe_spec=MoESpec(router=..., experts=...)."
        )
    return {kind: sorted(by_kind[kind], key=lambda info: info.layer) for kind in ROUTER_KINDS if kind in by_kind}


def discover_moe_layers(model: nn.Module, spec: MoESpec | None = None, kind: str | None = None) -> list[MoELayerInfo]:
    """The MoE layers of one kind of router (default: the model's first kind, its feed-forward routers), in layer order."""
    return of_kind(discover_router_kinds(model, spec), kind, type(model).__name__)


def of_kind(kinds: dict[str, list[MoELayerInfo]], kind: str | None, model_name: str) -> list[MoELayerInfo]:
    """The layers of ``kind`` (None: the first kind), refused in one line where the model has no such routers."""
    if kind is None:
        return next(iter(kinds.values()))
    if kind not in kinds:
        raise NoRoutersError(f"{model_name} has no {kind} routers; its routers are: {', '.join(kinds)}")
    return kinds[kind]


def router_kind(name: str) -> str:
    """'attention' for a router inside an attention module, else 'feed_forward'."""
    return "attention" if _is_attention_path(name) else "feed_forward"


def _innermost(router_names: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Routers without a router inside them: JetMoE's attention passes its gate's logits on, and the gate is the router."""
    names = [n for n, _ in router_names]
    return [(n, i) for n, i in router_names if not any(o != n and o.startswith(n + ".") for o in names)]


def _router_names(model: nn.Module, named: dict[str, nn.Module], spec: MoESpec | None,
                  hidden_size: int | None) -> list[tuple[str, int]]:
    """(module name, index of the logits in its output) of every router: by ``spec``, by declaration, else by structure."""
    router_names: list[tuple[str, int]] = []
    if spec is not None:
        router_names = [(n, spec.router_output_index) for n in named if re.fullmatch(spec.router, n)]
        if not router_names:
            raise NoRoutersError(f"no module name matches the router pattern {spec.router!r}")
        return router_names
    for rec in _router_recorders(model):
        index = rec.index if hasattr(rec, "index") and rec.index is not None else 0
        router_names += [(n, index) for n, m in named.items() if n and _matches_recorder(n, m, rec)]
    if not router_names:  # structural fallback for models that declare nothing
        router_names = _structural_routers(named, hidden_size)
    return router_names


def _structural_routers(named: dict[str, nn.Module], hidden_size: int | None) -> list[tuple[str, int]]:
    """Routers of a model that declares none: modules with an experts sibling and an [E, H] weight."""
    router_names: list[tuple[str, int]] = []
    for n, m in named.items():
        experts = _find_experts(named, n, None) if n else None
        if experts is None or experts == n or isinstance(m, nn.ModuleList):
            continue
        e = _expert_count_from_module(named[experts])
        if e is not None and hidden_size is not None and _has_matrix(m, e, hidden_size):
            router_names.append((n, 0))
    return router_names


def _layer_info(named: dict[str, nn.Module], name: str, layer: int, out_index: int, spec: MoESpec | None,
                config: Any, hidden_size: int | None, kind: str) -> MoELayerInfo:
    """The description of the MoE layer routed by module ``name``; refused when its sizes cannot be told."""
    router = named[name]
    experts_path = _find_experts(named, name, spec)
    experts = named.get(experts_path) if experts_path else None
    num_experts, top_k = _experts_and_top_k(router, experts, spec, config)
    h = hidden_size or getattr(router, "hidden_dim", None)
    if not (isinstance(num_experts, int) and isinstance(top_k, int) and isinstance(h, int)):
        raise NoRoutersError(
            f"found router {name} but could not tell its number of experts, top-k or hidden size; "
            "pass a MoESpec with num_experts and top_k"
        )
    idx_arg, w_arg = _selection_args(experts) if experts is not None else (None, None)
    n_shared, shared_paths = _shared_experts(named, name, config)
    renormalize = False
    if idx_arg is None:  # the weights are rebuilt from the scores: how the block scales them
        declared = spec.renormalize if spec is not None else None
        renormalize = declared if declared is not None else _renormalizes(router, named.get(_parent_name(name)), config)
    return MoELayerInfo(
        layer=layer,
        router_path=name,
        experts_path=experts_path,
        router_output_index=out_index,
        num_experts=int(num_experts),
        top_k=int(top_k),
        hidden_size=int(h),
        score_fn=(spec.score_fn if spec and spec.score_fn else _score_fn(router)),
        experts_index_arg=idx_arg,
        experts_weight_arg=w_arg,
        shared_experts=n_shared,
        shared_paths=shared_paths,
        kind=kind,
        renormalize=renormalize,
    )


def _experts_and_top_k(router: nn.Module, experts: nn.Module | None, spec: MoESpec | None, config: Any) -> tuple[Any, Any]:
    """Expert count and top-k of one layer, from the spec, then the router, the experts module and the config."""
    num_experts = (spec.num_experts if spec else None) or _int_attr(router, ROUTER_EXPERT_ATTRS)
    if not isinstance(num_experts, int) and experts is not None:
        num_experts = _expert_count_from_module(experts)
    if not isinstance(num_experts, int):
        num_experts = _config_get(config, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    top_k = (spec.top_k if spec else None) or _int_attr(router, ROUTER_TOPK_ATTRS)
    if not isinstance(top_k, int):
        top_k = _config_get(config, "num_experts_per_tok", "top_k", "moe_topk", "moe_top_k", "top_k_experts", "num_selected_experts")
    return num_experts, top_k


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first of ``names`` that the module holds as a positive int."""
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _is_attention_path(name: str) -> bool:
    return any(part in ("attn", "attention", "self_attn", "self_attention") for part in name.split("."))


def _has_matrix(module: nn.Module, num_experts: int, hidden_size: int) -> bool:
    for p in module.parameters(recurse=False):
        if p.dim() == 2 and tuple(p.shape) in ((num_experts, hidden_size), (hidden_size, num_experts)):
            return True
    return isinstance(module, nn.Linear) and module.out_features == num_experts and module.in_features == hidden_size
