"""One routing cache per (checkpoint, dataset), plus each checkpoint's router weights.

How routing evolves over training is studied by collecting the same data at many checkpoints.
``sweep_checkpoints`` writes ``<cache_root>/<model>/<checkpoint>/<dataset>__<identity>/`` for every pair,
``<cache_root>/<model>/<checkpoint>/router_weights.safetensors`` beside them, and keeps
``<cache_root>/<model>/index.json`` up to date after every cache, so a stopped sweep keeps what
it did. It returns a :class:`Sweep` holding the open caches and the router weights, so the
caller never reads back what the sweep just wrote. A checkpoint whose caches (and router
weights) are complete is not loaded again, so a stopped sweep resumes without downloading the
checkpoints it finished; each Hub revision it downloads is freed from the HF cache once
collected (``core.collection.hub_disk``) unless ``keep_checkpoints``.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from core.collection.checkpoints import Checkpoint, CheckpointError, order_key
from core.collection.hub_disk import LEDGER_FILE, HubCheckpointFiles, is_hub_repo
from core.distributed import Ranks, current_ranks
from core.safe_io import atomic_write_json
from core.store.cache import RoutingCache
from core.store.cache_format import FORMAT_VERSION, CacheError, check_free_space, check_storage
from core.store.identity import checkpoint_identity, identity_key
from core.store.router_weights import save_router_weights, stored_router_weights
from core.store.split_cache import join_parts

ROUTER_WEIGHTS_FILE = "router_weights.safetensors"
INDEX_FILE = "index.json"


# ---------------------------------------------------------------------------- names and digests
SLUG_MAX = 120  # a longer name keeps its start and gets a digest of the whole: one folder name, never too long


def model_slug(model_name: str) -> str:
    """A folder name for a model id (``allenai/OLMoE-1B-7B-0924`` -> ``allenai__OLMoE-1B-7B-0924``).

    Always one name inside the folder it is joined to: no separator, no leading dot (so never
    ``..``), at most :data:`SLUG_MAX` characters.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name.replace("/", "__")).strip("_").lstrip(".") or "model"
    if len(slug) > SLUG_MAX:
        slug = f"{slug[:SLUG_MAX - 17]}-{hashlib.sha256(model_name.encode()).hexdigest()[:16]}"
    return slug


def sweep_cache_dir(cache_root: str | os.PathLike, model_name: str, checkpoint: Checkpoint, dataset: str,
                    key: str | None = None) -> Path:
    """``<root>/<model>/<checkpoint>/<dataset>[__<identity key>]``: one folder per cache identity."""
    leaf = model_slug(dataset) + (f"__{key}" if key else "")
    return Path(cache_root) / model_slug(model_name) / model_slug(checkpoint.name) / leaf


def router_weights_path(cache_root: str | os.PathLike, model_name: str, checkpoint: Checkpoint) -> Path:
    return Path(cache_root) / model_slug(model_name) / model_slug(checkpoint.name) / ROUTER_WEIGHTS_FILE


def index_path(cache_root: str | os.PathLike, model_name: str) -> Path:
    return Path(cache_root) / model_slug(model_name) / INDEX_FILE


# ---------------------------------------------------------------------------- the index
def load_sweep_index(path: str | os.PathLike) -> dict:
    """Read a sweep index (``index.json``); entries are sorted by checkpoint order."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no sweep index at {p}")
    try:
        index = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"sweep index {p} is not valid JSON ({e}); delete it, the next sweep writes it again") from e
    stored = index.pop("sha256", None) if isinstance(index, dict) else None
    if stored is not None and stored != _index_digest(index):
        raise CheckpointError(f"sweep index {p} fails its checksum (edited or damaged); delete it, the next sweep writes it again")
    return index


def open_sweep(
    path: str | os.PathLike, dataset: str, checkpoints: Sequence[Checkpoint | str] | None = None
) -> list[tuple[str, int | None, RoutingCache]]:
    """``(checkpoint, step, RoutingCache)`` for one dataset in checkpoint order, from a sweep's index on disk.

    ``checkpoints`` picks which (in that order); by default those of the latest sweep, so caches
    an earlier sweep with other checkpoints left in the index do not slip in.
    """
    index = load_sweep_index(path)
    root = Path(path).parent
    if checkpoints is not None:
        names = [c.name if isinstance(c, Checkpoint) else str(c) for c in checkpoints]
    else:
        names = index.get("last_sweep")
    last = index.get("last_paths", {})
    by_name: dict[str, dict] = {}
    for e in sorted(index["entries"], key=lambda e: str(e.get("written_at") or "")):  # the newest of several identities wins
        if e["dataset"] == dataset and e["complete"]:
            if f"{e['checkpoint']}/{dataset}" not in last or last[f"{e['checkpoint']}/{dataset}"] == e["path"]:
                by_name[e["checkpoint"]] = e
    if names is None:
        names = list(by_name)
    missing = [n for n in names if n not in by_name]
    if missing or not names:
        raise CheckpointError(
            f"sweep index {path} has no complete cache of dataset {dataset!r} for checkpoint(s) {missing or names}"
        )
    return [(n, by_name[n]["step"], RoutingCache.open(root / by_name[n]["path"])) for n in names]


def _entry(ckpt: Checkpoint, dataset: str, cache: RoutingCache, root: Path, key: str) -> dict:
    return {
        "checkpoint": ckpt.name,
        "step": ckpt.step,
        "tokens": ckpt.tokens,
        "stage": ckpt.stage,
        "dataset": dataset,
        "identity": key,
        "path": os.path.relpath(cache.dir, root),
        "num_tokens": cache.num_tokens,
        "storage": cache.storage,
        "revision": cache.manifest.get("revision"),
        "complete": cache.complete,
        "written_at": cache.manifest.get("updated_at"),
    }


def _write_index(path: Path, model_name: str, entries: dict[str, dict], order: dict[str, tuple],
                 last_paths: dict[str, str]) -> None:
    rows = sorted(entries.values(), key=lambda e: (order.get(e["checkpoint"], (9,)), e["dataset"], e["path"]))
    body = {"format_version": FORMAT_VERSION, "model": model_name, "last_sweep": list(order),
            "last_paths": last_paths, "entries": rows}
    atomic_write_json(path, {**body, "sha256": _index_digest(body)})


def _index_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------- the sweep
@dataclass
class Sweep:
    """What a sweep collected: the caches by dataset in checkpoint order, and each checkpoint's routers.

    ``caches[dataset][c]`` is the cache of checkpoint ``checkpoints[c]``; ``router_weights[c]``
    (when the sweep was asked for them) maps model layer index to the ``[E, H]`` router.
    """

    index_path: Path
    checkpoints: list[Checkpoint]
    caches: dict[str, list[RoutingCache]]
    router_weights: list[dict[int, torch.Tensor]] = field(default_factory=list)

    @property
    def datasets(self) -> list[str]:
        return list(self.caches)

    def final(self, dataset: str) -> RoutingCache:
        """The last checkpoint's cache of ``dataset`` (the model analysed in full)."""
        return self.caches[dataset][-1]

    def series(self, dataset: str) -> list[tuple[str, int | None, RoutingCache]]:
        """``(checkpoint, step, cache)`` in checkpoint order, as :func:`open_sweep` gives it."""
        return [(c.name, c.step, cache) for c, cache in zip(self.checkpoints, self.caches[dataset])]


def checkpoint_loader(model_name: str, **wrapper_kwargs: Any) -> Callable[[Checkpoint], Any]:
    """A ``make_wrapper`` for ``sweep_checkpoints``: a local checkpoint from its folder, a Hub one by revision."""

    def load(checkpoint: Checkpoint) -> Any:
        from core.model_access.wrapper import MoEModelWrapper

        if checkpoint.path:
            return MoEModelWrapper(checkpoint.path, **wrapper_kwargs)
        return MoEModelWrapper(model_name, revision=checkpoint.revision, **wrapper_kwargs)

    return load


def _complete_cache(cache_dir: Path, want: dict) -> RoutingCache | None:
    """The complete cache of exactly this identity, if there is one (checked without loading a model)."""
    try:
        cache = RoutingCache.open(cache_dir)  # refuses a missing, unfinished or inconsistent manifest
    except Exception:
        return None
    m = cache.manifest
    same = all(m.get(k) == v for k, v in want.items() if k != "settings") and all(
        m["settings"].get(k) == v for k, v in want["settings"].items()
    )
    return cache if same else None


def _known_entries(idx_path: Path) -> dict[str, dict]:
    """The index's entries whose cache is still there, by path (a damaged index is rebuilt: caches are found by identity)."""
    if not idx_path.exists():
        return {}
    try:
        old = load_sweep_index(idx_path).get("entries", [])
    except CheckpointError:
        old = []
    return {e["path"]: e for e in old if (idx_path.parent / e["path"] / "manifest.json").exists()}


def _reusable(ckpt: Checkpoint, datasets: Mapping[str, Any], model_id: dict, fingerprints: dict, settings: dict,
              cache_root: str | os.PathLike, model_name: str, root: Path, entries: dict, last_paths: dict,
              force: bool) -> tuple[dict[str, RoutingCache], list, dict[str, str]]:
    """One checkpoint's caches by identity: those complete already (recorded in ``entries``) and those to collect."""
    done: dict[str, RoutingCache] = {}
    todo, keys = [], {}
    for ds_name, tokenized in datasets.items():
        keys[ds_name] = identity_key(model_id, fingerprints[ds_name], settings, ds_name)
        cdir = sweep_cache_dir(cache_root, model_name, ckpt, ds_name, keys[ds_name])
        want = {"dataset": ds_name, "data_fingerprint": fingerprints[ds_name], "settings": settings}
        last_paths[f"{ckpt.name}/{ds_name}"] = os.path.relpath(cdir, root)
        cache = None if force else _complete_cache(cdir, want)
        if cache is not None:
            done[ds_name] = cache
            entries[last_paths[f"{ckpt.name}/{ds_name}"]] = _entry(ckpt, ds_name, done[ds_name], root, keys[ds_name])
        else:
            todo.append((ds_name, tokenized, cdir))
    return done, todo, keys


def _hub_files(checkpoints: Sequence[Checkpoint], repo: str, idx_path: Path, keep: bool) -> HubCheckpointFiles | None:
    """Who frees the sweep's Hub downloads: only when the model is a Hub name and a checkpoint is a Hub revision."""
    if not is_hub_repo(repo) or all(c.path for c in checkpoints):
        return None
    return HubCheckpointFiles(repo, idx_path.parent / LEDGER_FILE, keep=keep)


def _from_hub(wrapper: Any, repo: str) -> bool:
    """Whether a loaded wrapper read its weights from the HF cache (an in-memory or fake model did not)."""
    source = getattr(wrapper, "source", None)
    return isinstance(source, (str, os.PathLike)) and str(source) == repo


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
    router_weights: bool = False,
    force: bool = False,
    progress: bool = True,
    model_source: str | None = None,
    model_dtype: Any = None,
    device: str = "cpu",
    keep_checkpoints: bool = False,
    announce: Callable[[list[Checkpoint]], None] | None = None,
    token_bytes: int | None = None,
) -> Sweep:
    """Collect every dataset at every checkpoint; returns the :class:`Sweep` (its index is on disk too).

    ``datasets`` maps a name to tokenized data (the same rows at every checkpoint, so caches
    line up token for token). ``make_wrapper(checkpoint)`` loads the model at that checkpoint
    (default ``checkpoint_loader(model_name)``). Finished caches are skipped without loading the model.
    ``router_weights``: also keep each checkpoint's routers beside its caches (read while the
    model is loaded for collection; loaded only for them if they are missing). Each cache's
    folder is named by its identity (``core.store.identity``): the model at that checkpoint
    (``model_source``: its Hub name or folder, default ``model_name``; a local checkpoint's config
    and weight digests), ``model_dtype``, the ``device`` type, the data and the settings; ``force``
    collects again into the same identity. A Hub revision the sweep downloaded is freed once
    collected unless ``keep_checkpoints`` (``hub_disk``). ``announce(checkpoints)``: called once,
    before any model loads, with those that must; by then the caches still to collect are checked to
    fit the disk (``token_bytes`` per token). Under torchrun each rank collects its share
    (``core.distributed``), then opens the others'.
    """
    if not checkpoints or not datasets:
        raise ValueError("sweep_checkpoints needs at least one checkpoint and one dataset")
    check_storage(storage, dtype)
    make_wrapper = make_wrapper or checkpoint_loader(model_name)
    index = _open_index(cache_root, model_name, checkpoints)
    fingerprints, settings = _identity_parts(datasets, storage, dtype, batch_size, shard_tokens, hidden_layers)
    ranks = current_ranks()
    split = 1 < ranks.world_size and len(checkpoints) * len(datasets) < ranks.world_size  # fewer caches than processes
    collect_kw = {**settings, "hidden_layers": hidden_layers, "ranks": ranks if split else None}
    plans = _plan_checkpoints(checkpoints, datasets, fingerprints, settings, index, cache_root, model_source or model_name,
                              model_dtype, device, force=force, router_weights=router_weights)
    check_free_space(cache_root, sum(_tokens(t) for p in plans for _, t, _ in p.todo) * (token_bytes or 0))
    if announce is not None:
        announce([p.ckpt for p in plans if p.todo or (router_weights and p.routers is None)])
    _collect_plans(plans, list(datasets), make_wrapper, index, ranks, split, checkpoints, model_source or model_name,
                   keep_checkpoints=keep_checkpoints, router_weights=router_weights, batch_size=batch_size,
                   progress=progress, force=force, collect_kw=collect_kw)
    caches = {name: [p.done[name] for p in plans] for name in datasets}
    weights = [p.routers for p in plans] if router_weights else []
    if ranks.rank == 0:
        index.write()
    return Sweep(index.path, list(checkpoints), caches, weights)


@dataclass
class _SweepIndex:
    """The sweep's ``index.json`` as the sweep keeps it up to date: one object instead of five arguments to each step."""

    path: Path
    model_name: str
    order: dict[str, tuple]
    entries: dict[str, dict]  # by cache path
    last_paths: dict[str, str] = field(default_factory=dict)  # "<checkpoint>/<dataset>" -> the path this sweep uses

    def write(self) -> None:
        """Write the index as it stands now (atomically, with its checksum)."""
        _write_index(self.path, self.model_name, self.entries, self.order, self.last_paths)


def _tokens(tokenized: Any) -> int:
    mask = getattr(tokenized, "attention_mask", None)
    return int(mask.sum()) if mask is not None else 0


def _open_index(cache_root: str | os.PathLike, model_name: str, checkpoints: Sequence[Checkpoint]) -> _SweepIndex:
    """The sweep's index: its folder made, the entries still on disk from earlier sweeps, this sweep's checkpoint order."""
    idx_path = index_path(cache_root, model_name)
    idx_path.parent.mkdir(parents=True, exist_ok=True)
    entries = _known_entries(idx_path)
    order = {c.name: order_key(c) for c in checkpoints}
    return _SweepIndex(idx_path, model_name, order, entries)


def _identity_parts(datasets: Mapping[str, Any], storage: str, dtype: str, batch_size: int, shard_tokens: int | None,
                    hidden_layers: Sequence[int]) -> tuple[dict[str, str], dict]:
    """What tells a cache apart besides the model, for every checkpoint alike: each dataset's fingerprint, the settings."""
    from core.collection.collector import DEFAULT_SHARD_TOKENS, data_fingerprint

    shard_tokens = shard_tokens or DEFAULT_SHARD_TOKENS
    fingerprints = {name: data_fingerprint(t) for name, t in datasets.items()}
    settings = {"storage": storage, "dtype": dtype, "batch_size": batch_size, "shard_tokens": shard_tokens,
                "hidden_layers": [int(x) for x in hidden_layers]}
    return fingerprints, settings


def _plan_checkpoints(checkpoints: Sequence[Checkpoint], datasets: Mapping[str, Any], fingerprints: dict[str, str],
                      settings: dict, index: _SweepIndex, cache_root: str | os.PathLike, model_source: str,
                      model_dtype: Any, device: str, *, force: bool, router_weights: bool) -> list[_Pending]:
    """Per checkpoint, what is complete already and what is left: found from identities, without loading any model."""
    plans = []
    for ckpt in checkpoints:
        model_id = checkpoint_identity(model_source, ckpt, model_dtype, device)
        done, todo, keys = _reusable(ckpt, datasets, model_id, fingerprints, settings, cache_root, index.model_name,
                                     index.path.parent, index.entries, index.last_paths, force)
        w_path = router_weights_path(cache_root, index.model_name, ckpt)
        routers = None if force or not router_weights else stored_router_weights(w_path)
        plans.append(_Pending(ckpt, done, todo, keys, w_path, routers))
    return plans


def _collect_plans(plans: list[_Pending], names: list[str], make_wrapper: Callable[[Checkpoint], Any],
                   index: _SweepIndex, ranks: Ranks, split: bool, checkpoints: Sequence[Checkpoint], repo: str, *,
                   keep_checkpoints: bool, router_weights: bool, batch_size: int, progress: bool, force: bool,
                   collect_kw: dict) -> None:
    """Collect this rank's share of what is left, take the other ranks' share, and free the Hub downloads."""
    hub = _hub_files(checkpoints, repo, index.path, keep_checkpoints)
    shared = len(plans) < ranks.world_size  # ranks load the same checkpoints: free downloads once all are done
    for p, share in _my_share(plans, names, router_weights, ranks, split):
        _collect_checkpoint(share, make_wrapper, hub, repo, router_weights=router_weights,
                            batch_size=batch_size, progress=progress, force=force, collect_kw=collect_kw,
                            free_now=not shared, on_cache=lambda name, cache, p=p: _record(
                                index.entries, index.last_paths, p, name, cache, index.path, index.model_name,
                                index.order))
        p.routers = share.routers
    if ranks.world_size > 1:
        _gather_others(plans, router_weights, index.entries, index.last_paths, index.path.parent, ranks, split)
    _finish_hub(hub if not shared or ranks.rank == 0 else None, checkpoints, progress)


def _finish_hub(hub: HubCheckpointFiles | None, checkpoints: Sequence[Checkpoint], progress: bool) -> None:
    """Free what the sweep downloaded and still holds (``hub_disk``), saying so."""
    for line in hub.finish([c.revision for c in checkpoints if not c.path]) if hub else []:
        if progress:
            print(line, flush=True)


def _my_share(plans: list[_Pending], names: list[str], router_weights: bool, ranks: Ranks,
              split: bool = False) -> list[tuple[_Pending, _Pending]]:
    """This rank's work, as ``(checkpoint, the part of it to do here)``.

    Units are numbered over every checkpoint and dataset of the sweep, done or not, so every rank
    numbers them alike whatever it found finished: whole checkpoints when there are at least as many
    as ranks, else (checkpoint, dataset) caches round-robin (a checkpoint's routers go with its first
    dataset), and with fewer caches than ranks (``split``) every rank does its shards of every cache.
    """
    def needed(p: _Pending) -> bool:
        return bool(p.todo) or (router_weights and p.routers is None)

    if split:
        return [(p, p) for p in plans if needed(p)]
    if ranks.world_size == 1 or len(plans) >= ranks.world_size:
        return [(p, p) for i, p in enumerate(plans) if ranks.owns(i) and needed(p)]
    out = []
    for i, p in enumerate(plans):
        mine = [t for t in p.todo if ranks.owns(i * len(names) + names.index(t[0]))]
        routers_here = router_weights and p.routers is None and ranks.owns(i * len(names))
        if mine or routers_here:
            out.append((p, dataclasses.replace(p, todo=mine)))
    return out


def _gather_others(plans: list[_Pending], router_weights: bool, entries: dict, last_paths: dict, root: Path,
                   ranks: Ranks, split: bool = False) -> None:
    """Once every rank has written its share (a barrier): the caches and router weights the others wrote.

    Caches split over the ranks are joined by rank 0 first (a second barrier).
    """
    ranks.barrier()
    if split:
        if ranks.rank == 0:
            for p in plans:
                for _, _, cdir in p.todo:
                    join_parts(cdir)
        ranks.barrier()
    for p in plans:
        for ds_name, _, cdir in p.todo:
            if ds_name not in p.done:
                try:  # the folder is the cache's identity: complete there means collected as this sweep asked
                    cache = RoutingCache.open(cdir)
                except CacheError as e:
                    raise CacheError(f"another rank did not finish the cache at {cdir} ({e}); run the same command again") from None
                p.done[ds_name] = cache
                entries[last_paths[f"{p.ckpt.name}/{ds_name}"]] = _entry(p.ckpt, ds_name, cache, root, p.keys[ds_name])
        if router_weights and p.routers is None:
            p.routers = stored_router_weights(p.w_path)
            if p.routers is None:
                raise CacheError(f"another rank did not save the router weights at {p.w_path}; run the same command again")


@dataclass
class _Pending:
    """One checkpoint of a sweep: its caches found complete, those left to collect, and its router weights."""

    ckpt: Checkpoint
    done: dict[str, RoutingCache]
    todo: list
    keys: dict[str, str]
    w_path: Path
    routers: dict[int, torch.Tensor] | None


def _record(entries: dict, last_paths: dict, p: _Pending, ds_name: str, cache: RoutingCache, idx_path: Path,
            model_name: str, order: dict) -> None:
    """Put one finished cache in the index on disk at once, so a stopped sweep keeps it."""
    entries[last_paths[f"{p.ckpt.name}/{ds_name}"]] = _entry(p.ckpt, ds_name, cache, idx_path.parent, p.keys[ds_name])
    _write_index(idx_path, model_name, entries, order, last_paths)


def _collect_checkpoint(p: _Pending, make_wrapper: Callable[[Checkpoint], Any], hub: HubCheckpointFiles | None,
                        repo: str, *, router_weights: bool, batch_size: int, progress: bool, force: bool,
                        collect_kw: dict, on_cache: Callable[[str, RoutingCache], None], free_now: bool = True) -> None:
    """Load one checkpoint, save its routers, collect what is left, then free its Hub download (see ``hub_disk``).

    ``free_now=False`` when other ranks load this checkpoint too: it is freed after they are all done.
    """
    from core.collection.collector import ActivationCollector
    from core.model_access.loading import is_big_model

    hub_revision = hub is not None and not p.ckpt.path
    if hub_revision:
        hub.before_load(p.ckpt.revision)
    wrapper = make_wrapper(p.ckpt)
    if hub_revision and not _from_hub(wrapper, repo):
        hub.not_from_hub(p.ckpt.revision)
    if router_weights:  # a loaded model is the authority on its routers
        p.routers = wrapper.get_router_weights()
        save_router_weights(p.w_path, p.routers)
    collector = ActivationCollector(wrapper, batch_size=batch_size, progress=progress)
    for ds_name, tokenized, cdir in p.todo:
        cache = collector.collect(tokenized, cdir, dataset_name=ds_name, force=force, **collect_kw)
        if cache is not None:  # None: this rank wrote its part of a split cache (rank 0 joins them later)
            p.done[ds_name] = cache
            on_cache(ds_name, cache)
    big = is_big_model(getattr(wrapper, "hf_model", None))
    del collector, wrapper
    if big:  # a full collection frees its reference cycles before the next checkpoint loads: both are not held at once
        gc.collect()
    if hub_revision and free_now:
        line = hub.after_collect(p.ckpt.revision)
        if line and progress:
            print(line, flush=True)
