"""Random weights written one decoder layer at a time, so writing a model never holds it whole.

``from_config`` followed by ``save_pretrained`` holds every weight, and transformers then copies
the checkpoint format's split of fused expert tensors besides: 1.74x the weights at OLMoE's
4-layer shape, more than 24 GB at 16 layers. Here the model is built on the meta device, and
each group of parameters (the decoder layers one by one, then everything outside them) is
materialised, initialised by the model's own ``_init_weights``, reverted to the checkpoint's
on-disk format by transformers' own ``revert_weight_conversion``, written as one safetensors
shard, and returned to the meta device. Peak memory is about one layer, whatever the depth.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from core.model_access.loading import big_blocks_freed_to_system

INDEX_NAME = "model.safetensors.index.json"


def _layer_list(model: torch.nn.Module, count: int) -> torch.nn.ModuleList | None:
    """The decoder layers: the ModuleList with one entry per hidden layer (none for an unusual model)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return lists[0] if len(lists) == 1 else None


def _groups(model: torch.nn.Module, layers: torch.nn.ModuleList | None) -> Iterator[list[torch.nn.Module]]:
    """Each decoder layer's modules, then every other module holding its own parameters or buffers."""
    inside: set[int] = set()
    for layer in layers or []:
        mods = list(layer.modules())
        inside.update(id(m) for m in mods)
        yield mods
    yield [m for m in model.modules() if id(m) not in inside]


def _materialise(model: Any, modules: list[torch.nn.Module]) -> None:
    """The modules' own tensors on the CPU, initialised as ``from_config`` would (HF ``_init_weights``)."""
    for m in modules:
        m.to_empty(device="cpu", recurse=False)
    model.tie_weights()  # to_empty gave each module its own tensor: a tied head shares the embeddings' again
    with torch.no_grad():
        for m in modules:
            model._init_weights(m)


def _group_state(model: torch.nn.Module, modules: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The persistent tensors the modules hold directly, under the model's full names."""
    own = {id(m) for m in modules}
    state = {}
    for prefix, m in model.named_modules():
        if id(m) not in own:
            continue
        skip = getattr(m, "_non_persistent_buffers_set", set())
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t is not None and name not in skip:
                state[f"{prefix}.{name}" if prefix else name] = t
    return state


def write_weights(model: Any, folder: Path) -> dict[str, Any]:
    """Every weight of ``model`` (built on the meta device) written into ``folder`` as shards and an index.

    Returns the index transformers reads (``weight_map`` and ``metadata.total_size``). Tied
    weights are written once, as ``save_pretrained`` writes them.
    """
    layers = _layer_list(model, int(model.config.num_hidden_layers))
    groups = list(_groups(model, layers))
    weight_map: dict[str, str] = {}
    total = 0
    with big_blocks_freed_to_system():
        for i, modules in enumerate(groups):
            total += _write_group(model, modules, folder, i, len(groups), weight_map)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _write_group(model: Any, modules: list[torch.nn.Module], folder: Path, i: int, count: int,
                 weight_map: dict[str, str]) -> int:
    """Group ``i`` of ``count`` materialised, written as its own shard (named in ``weight_map``) and let go; its bytes."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    _materialise(model, modules)
    state = remove_tied_weights_from_state_dict(_group_state(model, modules), model)
    shard = {k: v.contiguous() for k, v in revert_weight_conversion(model, state).items()}
    name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))
    size = sum(t.numel() * t.element_size() for t in shard.values())
    del shard, state
    if i < count - 1:  # the last group holds the embeddings a tied head shares; nothing follows it
        for m in modules:
            m.to_empty(device="meta", recurse=False)
    return size


def build_on_meta(cfg: Any, dtype: torch.dtype) -> Any:
    """The causal LM of ``cfg`` with every tensor on the meta device: its structure, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def save_random_model(cfg: Any, folder: str | os.PathLike, dtype: torch.dtype) -> int:
    """Config, generation config and random weights of ``cfg`` in ``folder``; returns the parameter count."""
    folder = Path(folder)
    model = build_on_meta(cfg, dtype)
    count = sum(p.numel() for p in model.parameters())
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    write_weights(model, folder)
    return count
