"""Training checkpoints: their names, listing them (Hub branches or a local run), and choosing a few.

How routing evolves over training is studied by collecting the same data at many checkpoints.
OLMoE publishes its checkpoints as Hub branches named ``step{N}-tokens{M}B`` (e.g.
``step5000-tokens20B``, ``step1200000-tokens5033B``) next to ``main`` (the final, annealed
model) and a few others (``fp32``, ...); OLMo-2-style repos prefix a stage
(``stage1-step140000-tokens1174B``, ``stage2-ingredient1-step1000-tokens5B``). The toolkit's
own training runs write ``models/<run>/checkpoints.json`` (``[{revision|name, step, tokens, path}]``).
Collecting routing at each of them is ``core.collection.sweep``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence


_STEP_RE = re.compile(r"(?:^|[-_/])(?:step|checkpoint|ckpt)[-_]?(\d+)(?=$|[-_/])", re.IGNORECASE)
_TOKENS_RE = re.compile(r"(?:^|[-_])tokens[-_]?(\d+(?:\.\d+)?)([kmbt]?)(?=$|[-_])", re.IGNORECASE)
_STAGE_RE = re.compile(r"^(stage(\d+))(?:[-_](ingredient\d+))?(?=[-_])", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
FINAL_NAMES = ("main",)


class CheckpointError(RuntimeError):
    """Checkpoints cannot be listed or swept as asked."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint. ``name`` is the Hub branch (the revision to load) or the local subdirectory.

    ``step``/``tokens`` are None for branches that are not training steps (``main``, ``fp32``);
    ``tokens`` is the absolute count of training tokens seen. ``path`` is set for local checkpoints.
    """

    name: str
    step: int | None = None
    tokens: int | None = None
    stage: str | None = None
    path: str | None = None

    @property
    def revision(self) -> str | None:
        """What to pass as ``revision=`` to load it from the Hub (None for a local directory)."""
        return None if self.path else self.name

    @property
    def is_final(self) -> bool:
        return self.name in FINAL_NAMES

    def to_dict(self) -> dict:
        return asdict(self)


def parse_checkpoint_name(name: str) -> Checkpoint:
    """Parse a branch or directory name into step, tokens and stage (None where absent).

    >>> parse_checkpoint_name("step5000-tokens20B")
    Checkpoint(name='step5000-tokens20B', step=5000, tokens=20000000000, stage=None, path=None)
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"checkpoint name must be a non-empty string, got {name!r}")
    step_m = _STEP_RE.search(name)
    tok_m = _TOKENS_RE.search(name)
    stage_m = _STAGE_RE.match(name)
    tokens = None
    if tok_m:
        tokens = int(round(float(tok_m.group(1)) * _UNITS[tok_m.group(2).lower()]))
    stage = None
    if stage_m:
        stage = stage_m.group(1).lower() + (f"-{stage_m.group(3).lower()}" if stage_m.group(3) else "")
    return Checkpoint(name=name, step=int(step_m.group(1)) if step_m else None, tokens=tokens, stage=stage)


def order_key(c: Checkpoint) -> tuple:
    """Stages in order, steps in order within a stage, the final model last, other names by name."""
    if c.step is None:
        return (2 if c.is_final else 1, 0, "", 0, c.name)
    stage_num = int(re.match(r"stage(\d+)", c.stage).group(1)) if c.stage else 0
    return (0, stage_num, c.stage or "", c.step, c.name)


def sort_checkpoints(checkpoints: Sequence[Checkpoint]) -> list[Checkpoint]:
    return sorted(checkpoints, key=order_key)


def list_hub_checkpoints(repo_id: str, *, include_final: bool = True, include_other: bool = False) -> list[Checkpoint]:
    """A Hub repository's training checkpoints (branches with a step), sorted by step.

    ``include_final`` appends ``main``; ``include_other`` keeps non-step branches such as ``fp32``.
    """
    try:
        from huggingface_hub import list_repo_refs

        refs = list_repo_refs(repo_id)
    except Exception as e:  # offline mode, network errors, missing repo: all stop the sweep the same way
        kind = type(e).__name__
        if "NotFound" in kind:
            raise CheckpointError(f"repository {repo_id} was not found on the Hugging Face Hub") from e
        raise CheckpointError(
            f"could not list the branches of {repo_id}: the Hugging Face Hub could not be reached ({kind}); "
            "pass the checkpoint names explicitly to parse_checkpoint_name instead"
        ) from e
    out = []
    for branch in refs.branches:
        c = parse_checkpoint_name(branch.name)
        if c.step is not None or (include_final and c.is_final) or (include_other and not c.is_final):
            out.append(c)
    return sort_checkpoints(out)


def select_checkpoints(checkpoints: Sequence[Checkpoint], n: int = 8, spacing: str = "log") -> list[Checkpoint]:
    """Subsample to about ``n`` checkpoints spread over training, always keeping the first and last step.

    ``spacing="log"`` packs early training (where routing changes fastest) more densely;
    ``"linear"`` spaces evenly in steps. Non-step checkpoints (``main``) are kept as they are.
    """
    if spacing not in ("log", "linear"):
        raise ValueError(f"spacing must be 'log' or 'linear', got {spacing!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    stepped = sort_checkpoints([c for c in checkpoints if c.step is not None])
    others = [c for c in sort_checkpoints(checkpoints) if c.step is None and c.is_final]
    if len(stepped) <= n:
        return stepped + others
    if n == 1:
        return stepped[-1:] + others
    # position along training: tokens when every checkpoint has them (steps restart across stages)
    use_tokens = all(c.tokens is not None for c in stepped)
    xs = [float(c.tokens if use_tokens else c.step) for c in stepped]
    lo, hi = xs[0], xs[-1]
    if spacing == "log" and hi > 0:
        # Log-spaced over the checkpoints past step 0 (kept anyway), nearest in log distance: a
        # linear distance, or a range starting at 1 token, would spend the picks on the first steps.
        first = min(x for x in xs if x > 0)
        m = n - 1 if lo <= 0 else n
        targets = [math.exp(math.log(first) + (math.log(hi) - math.log(first)) * i / max(m - 1, 1)) for i in range(m)]

        def distance(i: int, t: float) -> float:
            return abs(math.log(xs[i]) - math.log(t)) if xs[i] > 0 else math.inf
    else:
        targets = [lo + (hi - lo) * i / (n - 1) for i in range(n)]

        def distance(i: int, t: float) -> float:
            return abs(xs[i] - t)
    picked: list[int] = []
    for t in targets:
        free = [i for i in range(len(xs)) if i not in picked]
        picked.append(min(free, key=lambda i: (distance(i, t), i)))
    picked = sorted(set(picked) | {0, len(xs) - 1})
    while len(picked) > n:  # first and last were forced in: drop the interior pick closest to a neighbour
        gaps = [(xs[picked[j + 1]] - xs[picked[j - 1]], j) for j in range(1, len(picked) - 1)]
        picked.pop(min(gaps)[1])
    return [stepped[i] for i in picked] + others


def list_local_checkpoints(run_dir: str | os.PathLike) -> list[Checkpoint]:
    """Checkpoints of a local training run: from ``checkpoints.json`` if present, else subdirectories with a config.json."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"training run directory {run} does not exist")
    listing = run / "checkpoints.json"
    out = []
    if listing.exists():
        try:
            raw = json.loads(listing.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{listing} is not valid JSON ({e})") from e
        entries = raw.get("checkpoints", []) if isinstance(raw, dict) else raw
        for i, e in enumerate(entries):
            name = e.get("name", e.get("revision")) if isinstance(e, dict) else None
            if not name:
                raise CheckpointError(f"entry {i} of {listing} has no 'name' (or 'revision')")
            parsed = parse_checkpoint_name(str(name))
            path = Path(e.get("path") or name)
            path = path if path.is_absolute() else run / path
            step = e.get("step", parsed.step)
            tokens = e.get("tokens", parsed.tokens)
            out.append(Checkpoint(
                name=str(name), step=None if step is None else int(step),
                tokens=None if tokens is None else int(tokens), stage=parsed.stage, path=str(path),
            ))
    else:
        for sub in sorted(p for p in run.iterdir() if p.is_dir() and (p / "config.json").exists()):
            c = parse_checkpoint_name(sub.name)
            out.append(Checkpoint(name=c.name, step=c.step, tokens=c.tokens, stage=c.stage, path=str(sub)))
    if not out:
        raise CheckpointError(f"no checkpoints in {run}: no checkpoints.json and no subdirectory with a config.json")
    return sort_checkpoints(out)
