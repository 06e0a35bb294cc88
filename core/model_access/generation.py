"""Routing recorded at every step of ``generate()``, with the key-value cache on.

A teacher-forced trace shows how a model routes a text it is handed; generation shows how it
routes the text it writes, one token per forward. The routers are hooked (as in
:mod:`core.model_access.recorder`) through the whole of ``generate()``: the prefill forward gives
the prompt's rows, each decoding step one row per sequence, and the per-step records are joined
along the token axis. The last generated token never goes through the model inside ``generate()``
(it is sampled from the previous step), so it is fed once more through the cache, as the next
decoding step would feed it, and its output is discarded: the routing covers the whole final sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from core.model_access.discovery import NoRoutersError
from core.model_access.recorder import RoutingRecorder
from core.routing_data import RoutingData

# ``wrapper`` below is a ``core.model_access.wrapper.MoEModelWrapper``; not imported, even for typing:
# the wrapper imports this module, and the library keeps no import cycles (tests/test_import_contracts.py)
MoEModelWrapper = Any

__all__ = ["GeneratedRouting", "generate_routing"]

# generate() options whose steps are not one row per sequence in order (beams reorder rows, assistants
# propose several tokens and drop some): their routing would not be the routing of the final sequences
_REFUSED = {"num_beams": 1, "num_return_sequences": 1, "assistant_model": None, "prompt_lookup_num_tokens": None}


@dataclass
class GeneratedRouting:
    """What ``generate_routing`` returns: the sequences (prompt + generated) and how every token of them was routed.

    ``routing`` has the fields ``trace_routing(sequences, attention_mask)`` gives, rows in the same
    order (row-major over ``sequences``, padding left out), so analyses take either. In a batch, a
    row that ended before the others goes on being fed the pad token, with attention, as
    ``generate()`` feeds it: those tokens have rows too, as they would in ``trace_routing``.
    """

    sequences: torch.Tensor  # long [B, P + G], the prompt (left-padded) then the generated tokens
    attention_mask: torch.Tensor  # long [B, P + G], the prompt's mask then ones (as generate() extends it)
    prompt_length: int  # P
    routing: RoutingData

    @property
    def new_tokens(self) -> torch.Tensor:
        """The generated token ids ``[B, G]``."""
        return self.sequences[:, self.prompt_length:]


class _Steps:
    """Hooks on the model's own forward: after each call, the routers' records of that call become token rows."""

    def __init__(self, model: nn.Module, recorder: RoutingRecorder, to_rows: Callable[[list, list], list[torch.Tensor]]) -> None:
        self.model, self.recorder, self.to_rows = model, recorder, to_rows
        self.fed: list[torch.Tensor] = []  # [B, T] token ids of each forward
        self.rows: list[list[torch.Tensor]] = []  # per forward: logits, experts, weights, each [B, T, L, ...]
        self.last_kwargs: dict[str, Any] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "_Steps":
        self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.model.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def _before(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if args:
            raise ValueError("generate_routing expects generate() to call the model with keyword arguments only")
        if kwargs.get("input_ids") is None:
            raise ValueError("generate_routing records token ids; inputs_embeds are not supported")
        self.last_kwargs = dict(kwargs)

    def _after(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.recorder.missing():
            raise NoRoutersError(f"routers {self.recorder.missing()} did not run in a generation step")
        ids = self.last_kwargs["input_ids"]
        scores, chosen, _ = self.recorder.take()
        batch, width = ids.shape
        self.fed.append(ids.detach().cpu())
        self.rows.append([t.reshape(batch, width, *t.shape[1:]) for t in self.to_rows(scores, chosen)])

    def feed_last(self, last_ids: torch.Tensor) -> None:
        """The last generated token through the cache, as the next decoding step of generate() would feed it."""
        kw = dict(self.last_kwargs)
        if kw.get("past_key_values") is None:
            raise ValueError("generate_routing needs the model's key-value cache; the model ran without one")
        mask = kw.get("attention_mask")
        if mask is not None:
            if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
                raise ValueError("generate_routing needs a 2-D attention mask (a static or compiled cache is not supported)")
            kw["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"][..., -1:] + 1
        kw["input_ids"] = last_ids.to(kw["input_ids"].device)
        self.model(**kw)


def _prompt(wrapper: MoEModelWrapper, inputs: Any, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of the prompt(s): text is tokenized left-padded; right padding is refused."""
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        tok = wrapper.tokenizer
        if tok is None:
            raise ValueError("text needs a tokenizer: pass token ids, or give the wrapper a tokenizer")
        side, tok.padding_side = getattr(tok, "padding_side", "right"), "left"
        try:
            enc = tok([inputs] if isinstance(inputs, str) else list(inputs), return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        inputs, attention_mask = enc["input_ids"], enc["attention_mask"]
    ids, mask = wrapper._inputs(inputs, attention_mask)
    mask = mask.long()
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("generate_routing needs left padding (the prompt's padding goes before its tokens)")
    return ids, mask


def _refuse(wrapper: MoEModelWrapper, generate_kwargs: Mapping[str, Any]) -> None:
    """One line for each way of generating whose steps are not one row per final sequence."""
    if wrapper.remote or wrapper.hf_model is None:
        raise ValueError("generate_routing records with local hooks; a remote model cannot be traced during generation")
    if generate_kwargs.get("use_cache") is False:
        raise ValueError("generate_routing records generation with the key-value cache (use_cache=False is not supported)")
    for key, plain in _REFUSED.items():
        if generate_kwargs.get(key, plain) != plain:
            raise ValueError(f"generate_routing does not support {key}={generate_kwargs[key]!r}: "
                             "its steps are not one token per final sequence")


def generate_routing(wrapper: MoEModelWrapper, inputs: Any, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 16, do_sample: bool = False, **generate_kwargs: Any) -> GeneratedRouting:
    """Generate with the key-value cache and record every step's routing (see the module doc)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    _refuse(wrapper, generate_kwargs)
    ids, mask = _prompt(wrapper, inputs, attention_mask)
    dev = wrapper._device()
    model = wrapper.hf_model
    with torch.no_grad(), RoutingRecorder(wrapper._modules, wrapper.layers) as rec, \
            _Steps(model, rec, lambda s, c: wrapper._layer_rows(s, c, dev)) as steps:
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=do_sample, **generate_kwargs)
        sequences = (out if isinstance(out, torch.Tensor) else out.sequences).cpu()
        steps.feed_last(sequences[:, -1:])
    fed = torch.cat(steps.fed, dim=1)
    if not torch.equal(fed, sequences):  # each token fed once, in order: the rows are the final sequences' rows
        raise RuntimeError(f"generate() fed {tuple(fed.shape)} tokens that are not its {tuple(sequences.shape)} sequences")
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], sequences.shape[1] - mask.shape[1])], dim=1)
    keep = full_mask.reshape(-1).bool()
    logits, idx, wts = (torch.cat(parts, dim=1).flatten(0, 1).cpu()[keep] for parts in zip(*steps.rows))
    batch, width = sequences.shape
    routing = RoutingData(
        moe_layers=wrapper.moe_layers, num_experts=wrapper.num_experts, top_k=wrapper.top_k, score_fn=wrapper.score_fn,
        router_logits=logits.float(), topk_idx=idx.long(), topk_weight=wts.float(),
        token_ids=sequences.reshape(-1)[keep], positions=torch.arange(width).expand(batch, width).reshape(-1)[keep],
    )
    return GeneratedRouting(sequences=sequences, attention_mask=full_mask, prompt_length=ids.shape[1], routing=routing)
