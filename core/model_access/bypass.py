"""Run a forward without nnsight's per-module instrumentation, for the hooks engine.

nnsight instruments every module of a model it wraps: a forward wrapper and a hook pair each.
When no nnsight trace runs they hand everything through unchanged, but each module then takes
PyTorch's slow call path and two extra Python frames: about 4% of a tiny model's forward. The
hooks engine needs none of it, so for the length of its forward the instrumentation is set
aside and put back exactly as it was (the same dict objects, so the hooks' order is kept).
Only nnsight's own pieces are set aside; any other hook or forward wrapper (accelerate's) stays.

Working out what to set aside walks every hook of every module, which costs as much as it
saves; the plan is kept and reused while no hook was registered anywhere since (PyTorch numbers
every hook handle from one counter), no module's hooks or forward changed, and nothing that
ran inside the block left a hook behind. Blocks nest: a collection opens one around all its
batches, and each batch's own block then costs nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, NamedTuple

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["NnsightBypass"]


def _is_nnsight(hook: Any) -> bool:
    return getattr(hook, "__module__", "").startswith("nnsight.")


class _Step(NamedTuple):
    """One module's swap: its dict, the hook dicts and forward it has, and what it runs with meanwhile."""

    d: dict
    pre: OrderedDict
    post: OrderedDict
    fwd: Any
    n_pre: int
    n_post: int
    pre_bare: OrderedDict
    post_bare: OrderedDict
    n_bare: int  # how many hooks the two bare dicts hold between calls
    direct: Any  # None: the class's forward (the instance attribute is dropped)


def _step(module: nn.Module) -> _Step | None:
    """How to run ``module`` without nnsight's pieces, or None where it has none."""
    d = module.__dict__
    pre, post, fwd = d["_forward_pre_hooks"], d["_forward_hooks"], d.get("forward")
    original = d.get("__nnsight_forward__")
    wrapped = original is not None and fwd is not None and getattr(fwd, "__wrapped__", None) is original
    if not wrapped and not any(map(_is_nnsight, pre.values())) and not any(map(_is_nnsight, post.values())):
        return None
    direct = fwd
    if wrapped:  # nnsight's wrapper calls the class's forward or, on a dispatched model, accelerate's
        direct = None if getattr(type(module), "forward", None) is original else partial(original, module)
    pre_bare, post_bare = (OrderedDict((k, h) for k, h in hooks.items() if not _is_nnsight(h)) for hooks in (pre, post))
    return _Step(d, pre, post, fwd, len(pre), len(post), pre_bare, post_bare, len(pre_bare) + len(post_bare), direct)


class NnsightBypass:
    """``with bypass():`` runs the modules given without nnsight's instrumentation (see the module docstring)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self._modules = modules
        self._plan: list[_Step] | None = None
        self._stamp = -1  # the hook counter when the plan was last known good
        self._depth = 0  # inside an open bypass (a collection's whole loop), each batch's own is free

    def _current(self) -> list[_Step]:
        plan = self._plan
        if plan is None or RemovableHandle.next_id != self._stamp or not all(
            s.d["_forward_pre_hooks"] is s.pre and s.d["_forward_hooks"] is s.post and s.d.get("forward") is s.fwd
            and len(s.pre) == s.n_pre and len(s.post) == s.n_post for s in plan
        ):
            plan = [s for s in map(_step, self._modules) if s is not None]
        return plan

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self._depth:  # already set aside by an enclosing block: nothing to swap, nothing to put back
            yield
            return
        plan = self._plan = self._current()
        self._stamp = -1
        done = 0
        try:
            for s in plan:
                s.d["_forward_pre_hooks"], s.d["_forward_hooks"] = s.pre_bare, s.post_bare
                if s.direct is None:
                    s.d.pop("forward", None)
                else:
                    s.d["forward"] = s.direct
                done += 1
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
        finally:
            for s in plan[:done]:
                s.d["_forward_pre_hooks"], s.d["_forward_hooks"] = s.pre, s.post
                if s.fwd is not None:
                    s.d["forward"] = s.fwd
            if all(len(s.pre_bare) + len(s.post_bare) == s.n_bare for s in plan):  # nothing left behind inside
                self._stamp = RemovableHandle.next_id
