"""Models with a real model's dimensions and random weights: measuring the toolkit at scale with no Hub.

Speed and memory depend on a model's shapes, not on its trained values, so a randomly
initialised model with OLMoE-1B-7B's hidden, expert, vocabulary and routing sizes costs what
OLMoE costs. ``--model random:NAME`` in the main run writes one once (into ``models/``) and
studies it like any local folder. Known shapes are built offline; any other Hub model's
``config.json`` is read from the Hub where it is reachable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from core.owned_files import built_in_scratch, check_replaceable

RANDOM_PREFIX = "random:"
RECORD_NAME = "random_model.json"


def olmoe_1b_7b_config(layers: int = 16) -> Any:
    """OLMoE-1B-7B-0924's dimensions: hidden 2048, experts of 1024, 64 experts top-8 unnormalized, 50k vocabulary."""
    import transformers

    return transformers.OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
                                    num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                                    norm_topk_prob=False, max_position_embeddings=4096, pad_token_id=1, bos_token_id=None,
                                    eos_token_id=50279)


KNOWN_SHAPES: dict[str, Callable[[], Any]] = {"allenai/OLMoE-1B-7B-0924": olmoe_1b_7b_config}
ALIASES = {"olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924", "allenai/OLMoE-1B-7B-0125": "allenai/OLMoE-1B-7B-0924"}


class ShapeError(ValueError):
    """A ``random:`` model cannot be built; the message says why in one line."""


def is_random_spec(model: str | None) -> bool:
    return bool(model) and str(model).startswith(RANDOM_PREFIX)


def shape_name(spec: str) -> str:
    """The model name behind ``random:NAME`` (aliases such as ``olmoe-1b-7b`` resolved)."""
    name = spec[len(RANDOM_PREFIX):] if is_random_spec(spec) else spec
    if not name:
        raise ShapeError("random: needs a model name, e.g. random:allenai/OLMoE-1B-7B-0924")
    return ALIASES.get(name, name)


def _layer_count(cfg: Any) -> int:
    return int(getattr(cfg, "num_hidden_layers"))


def shape_config(spec: str, layers: int | None = None) -> Any:
    """The config of ``random:NAME`` with ``layers`` decoder layers (all of the model's if None).

    Known shapes need no network; for any other name the Hub's ``config.json`` is read.
    """
    name = shape_name(spec)
    if name in KNOWN_SHAPES:
        cfg = KNOWN_SHAPES[name]()
    else:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            known = ", ".join(sorted(KNOWN_SHAPES) + sorted(ALIASES))
            raise ShapeError(f"no shape for {name!r}: not one the toolkit knows offline ({known}) and its config could "
                             f"not be read from the Hub ({str(e).splitlines()[0]})") from None
    full = _layer_count(cfg)
    if layers is not None:
        if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= full:
            raise ShapeError(f"layers must be a whole number from 1 to {full} (the layers of {name}), not {layers!r}")
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = list(cfg.layer_types)[:layers]
    return cfg


def random_model_folder(spec: str, layers: int | None, seed: int, models_dir: str | os.PathLike) -> Path:
    """Where ``random:NAME`` with these layers and seed is kept: one folder per (shape, layers, seed)."""
    cfg_layers = layers if layers is not None else _layer_count(shape_config(spec))
    slug = shape_name(spec).replace("/", "--")
    return Path(models_dir) / "random" / f"{slug}-{cfg_layers}layers-seed{seed}"


def write_random_model(cfg: Any, folder: str | os.PathLike, tokenizer: Any, *, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16, record: dict[str, Any] | None = None) -> Path:
    """A randomly initialised causal LM of config ``cfg``, saved with a tokenizer into ``folder`` atomically.

    Weights are stored in ``dtype`` (bf16, as OLMoE's are on the Hub; the run chooses the compute
    dtype). The tokenizer's special ids replace the config's. ``record`` goes into
    ``random_model.json`` with the seed, so the folder says what it is.
    """
    from core.model_access.random_weights import save_random_model

    folder = Path(folder)
    hint = "choose another --models-dir"
    check_replaceable(folder, hint)  # a folder holding what the toolkit did not write is refused before any work
    if len(tokenizer) > cfg.vocab_size:
        raise ShapeError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary {cfg.vocab_size}")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(cfg, key, getattr(tokenizer, key))
    torch.manual_seed(seed)
    with built_in_scratch(folder, hint) as tmp:  # the old folder's own files only are replaced (core.owned_files)
        parameters = save_random_model(cfg, tmp, dtype)  # one layer in memory at a time (core.model_access.random_weights)
        tokenizer.save_pretrained(tmp)
        info = {"seed": seed, "dtype": str(dtype).removeprefix("torch."), "parameters": parameters,
                "layers": _layer_count(cfg), **(record or {})}
        (tmp / RECORD_NAME).write_text(json.dumps(info, indent=1))
    return folder


def ensure_random_model(spec: str, layers: int | None, seed: int, models_dir: str | os.PathLike,
                        make_tokenizer: Callable[[int], Any]) -> Path:
    """The folder of ``random:NAME`` (``layers``, ``seed``), written first if it is not complete yet.

    ``make_tokenizer(vocab_size)`` gives the tokenizer saved beside the weights (the real
    model's tokenizer needs the Hub; any tokenizer within the vocabulary costs the same).
    """
    folder = random_model_folder(spec, layers, seed, models_dir)
    if (folder / RECORD_NAME).is_file():
        return folder
    cfg = shape_config(spec, layers)
    return write_random_model(cfg, folder, make_tokenizer(int(cfg.vocab_size)), seed=seed,
                              record={"shape_of": shape_name(spec)})
