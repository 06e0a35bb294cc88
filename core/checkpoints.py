"""Training checkpoints to sweep: Hub branches or a local run, and one routing cache per checkpoint.

How routing evolves over training is studied by collecting the same data at many checkpoints.
OLMoE publishes its checkpoints as Hub branches named ``step{N}-tokens{M}B`` (e.g.
``step5000-tokens20B``, ``step1200000-tokens5033B``) next to ``main`` (the final, annealed
model) and a few others (``fp32``, ...); OLMo-2-style repos prefix a stage
(``stage1-step140000-tokens1174B``, ``stage2-ingredient1-step1000-tokens5B``). The toolkit's
own training runs write ``models/<run>/checkpoints.json`` (``[{revision|name, step, tokens, path}]``).
``sweep_checkpoints`` writes one cache per (checkpoint, dataset) under
``<cache_root>/<model>/<checkpoint>/<dataset>/`` and keeps ``<cache_root>/<model>/index.json``
over them up to date after every cache.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from core.routing_cache import FORMAT_VERSION, RoutingCache, atomic_write_json, read_manifest

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


def _order_key(c: Checkpoint) -> tuple:
    """Stages in order, steps in order within a stage, the final model last, other names by name."""
    if c.step is None:
        return (2 if c.is_final else 1, 0, "", 0, c.name)
    stage_num = int(re.match(r"stage(\d+)", c.stage).group(1)) if c.stage else 0
    return (0, stage_num, c.stage or "", c.step, c.name)


def sort_checkpoints(checkpoints: Sequence[Checkpoint]) -> list[Checkpoint]:
    return sorted(checkpoints, key=_order_key)


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
    if spacing == "log":
        lo_l, hi_l = math.log(max(lo, 1.0)), math.log(max(hi, 1.0))
        targets = [math.exp(lo_l + (hi_l - lo_l) * i / (n - 1)) for i in range(n)]
    else:
        targets = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    picked: list[int] = []
    for t in targets:
        free = [i for i in range(len(xs)) if i not in picked]
        picked.append(min(free, key=lambda i: (abs(xs[i] - t), i)))
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


# ---------------------------------------------------------------------------- sweep
def model_slug(model_name: str) -> str:
    """A directory name for a model id (``allenai/OLMoE-1B-7B-0924`` -> ``allenai__OLMoE-1B-7B-0924``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_name.replace("/", "__")).strip("_") or "model"


def sweep_cache_dir(cache_root: str | os.PathLike, model_name: str, checkpoint: Checkpoint, dataset: str) -> Path:
    return Path(cache_root) / model_slug(model_name) / model_slug(checkpoint.name) / model_slug(dataset)


def index_path(cache_root: str | os.PathLike, model_name: str) -> Path:
    return Path(cache_root) / model_slug(model_name) / "index.json"


def load_sweep_index(path: str | os.PathLike) -> dict:
    """Read a sweep index (``index.json``); entries are sorted by checkpoint order."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no sweep index at {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"sweep index {p} is not valid JSON ({e})") from e


def open_sweep(
    path: str | os.PathLike, dataset: str, checkpoints: Sequence[Checkpoint | str] | None = None
) -> list[tuple[str, int | None, RoutingCache]]:
    """``(checkpoint, step, RoutingCache)`` for one dataset in checkpoint order, as ``checkpoint_dynamics`` wants.

    ``checkpoints`` picks which (in that order); by default those of the latest sweep, so caches
    an earlier sweep with other checkpoints left in the index do not slip in.
    """
    index = load_sweep_index(path)
    root = Path(path).parent
    if checkpoints is not None:
        names = [c.name if isinstance(c, Checkpoint) else str(c) for c in checkpoints]
    else:
        names = index.get("last_sweep")
    by_name = {e["checkpoint"]: e for e in index["entries"] if e["dataset"] == dataset and e["complete"]}
    if names is None:
        names = list(by_name)
    missing = [n for n in names if n not in by_name]
    if missing or not names:
        raise CheckpointError(
            f"sweep index {path} has no complete cache of dataset {dataset!r} for checkpoint(s) {missing or names}"
        )
    return [(n, by_name[n]["step"], RoutingCache.open(root / by_name[n]["path"])) for n in names]


def checkpoint_loader(model_name: str, **wrapper_kwargs: Any) -> Callable[[Checkpoint], Any]:
    """A ``make_wrapper`` for ``sweep_checkpoints``: a local checkpoint from its folder, a Hub one by revision."""

    def load(checkpoint: Checkpoint) -> Any:
        from core.model_wrapper import MoEModelWrapper

        if checkpoint.path:
            return MoEModelWrapper(checkpoint.path, **wrapper_kwargs)
        return MoEModelWrapper(model_name, revision=checkpoint.revision, **wrapper_kwargs)

    return load


def _already_done(cache_dir: Path, want: dict) -> bool:
    """True when a complete cache with the same data and settings is there (checked without loading a model)."""
    try:
        m = read_manifest(cache_dir)
    except Exception:
        return False
    if not m or not m.get("complete"):
        return False
    return all(m.get(k) == v for k, v in want.items() if k != "settings") and all(
        m["settings"].get(k) == v for k, v in want["settings"].items()
    )


def _write_index(path: Path, model_name: str, entries: dict[tuple[str, str], dict], order: dict[str, tuple]) -> None:
    rows = sorted(entries.values(), key=lambda e: (order.get(e["checkpoint"], (9,)), e["dataset"]))
    atomic_write_json(path, {"format_version": FORMAT_VERSION, "model": model_name, "last_sweep": list(order),
                             "entries": rows})


def sweep_checkpoints(
    checkpoints: Sequence[Checkpoint],
    datasets: Mapping[str, Any],
    make_wrapper: Callable[[Checkpoint], Any] | None,
    cache_root: str | os.PathLike,
    *,
    model_name: str,
    batch_size: int = 8,
    storage: str = "full",
    dtype: str = "float16",
    hidden_layers: Sequence[int] = (),
    shard_tokens: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Collect every dataset at every checkpoint; returns the path of the sweep's ``index.json``.

    ``datasets`` maps a name to tokenized data (the same rows at every checkpoint, so caches
    line up token for token). ``make_wrapper(checkpoint)`` loads the model at that checkpoint
(None: ``checkpoint_loader(model_name)``, i.e. its local folder or its Hub revision).
    Finished caches are skipped without loading the model; interrupted ones resume; the
    index is rewritten atomically after each cache, so a stopped sweep keeps what it did.
    """
    from core.activation_collector import DEFAULT_SHARD_TOKENS, ActivationCollector, data_fingerprint

    if not checkpoints:
        raise ValueError("sweep_checkpoints needs at least one checkpoint")
    if not datasets:
        raise ValueError("sweep_checkpoints needs at least one dataset")
    shard_tokens = shard_tokens or DEFAULT_SHARD_TOKENS
    make_wrapper = make_wrapper or checkpoint_loader(model_name)
    idx_path = index_path(cache_root, model_name)
    idx_path.parent.mkdir(parents=True, exist_ok=True)
    entries: dict[tuple[str, str], dict] = {}
    if idx_path.exists() and not force:
        entries = {(e["checkpoint"], e["dataset"]): e for e in load_sweep_index(idx_path).get("entries", [])}
    order = {c.name: _order_key(c) for c in checkpoints}
    fingerprints = {name: data_fingerprint(t) for name, t in datasets.items()}
    settings = {"storage": storage, "dtype": dtype, "batch_size": batch_size, "shard_tokens": shard_tokens,
                "hidden_layers": [int(x) for x in hidden_layers]}
    for ckpt in checkpoints:
        todo = []
        for ds_name, tokenized in datasets.items():
            cdir = sweep_cache_dir(cache_root, model_name, ckpt, ds_name)
            want = {"dataset": ds_name, "data_fingerprint": fingerprints[ds_name], "settings": settings}
            if not force and _already_done(cdir, want):
                entries[(ckpt.name, ds_name)] = _entry(ckpt, ds_name, RoutingCache.open(cdir), idx_path.parent)
                continue
            todo.append((ds_name, tokenized, cdir))
        if not todo:
            continue
        wrapper = make_wrapper(ckpt)
        collector = ActivationCollector(wrapper, batch_size=batch_size, progress=progress)
        for ds_name, tokenized, cdir in todo:
            cache = collector.collect(
                tokenized, cdir, batch_size=batch_size, storage=storage, dtype=dtype, hidden_layers=hidden_layers,
                shard_tokens=shard_tokens, dataset_name=ds_name, force=force,
            )
            entries[(ckpt.name, ds_name)] = _entry(ckpt, ds_name, cache, idx_path.parent)
            _write_index(idx_path, model_name, entries, order)
        del collector, wrapper
        gc.collect()
    _write_index(idx_path, model_name, entries, order)
    return idx_path


def _entry(ckpt: Checkpoint, dataset: str, cache: RoutingCache, root: Path) -> dict:
    return {
        "checkpoint": ckpt.name,
        "step": ckpt.step,
        "tokens": ckpt.tokens,
        "stage": ckpt.stage,
        "dataset": dataset,
        "path": os.path.relpath(cache.dir, root),
        "num_tokens": cache.num_tokens,
        "storage": cache.storage,
        "revision": cache.manifest.get("revision"),
        "complete": cache.complete,
    }
