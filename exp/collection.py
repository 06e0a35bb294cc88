"""Stage 1 of the main run: which model and checkpoints, which tokens, and their routing caches.

Caches are keyed by model, checkpoint, dataset, the exact token rows and the collection
settings (see ``core.checkpoints.sweep_checkpoints``), so a second run with the same options
reuses every cache without loading a model, and a run with other options never reads stale
routing. Each checkpoint's router weights are stored beside its caches for the drift analysis.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.checkpoints import (
    Checkpoint,
    list_hub_checkpoints,
    list_local_checkpoints,
    model_slug,
    open_sweep,
    parse_checkpoint_name,
    select_checkpoints,
    sweep_checkpoints,
)
from core.model_wrapper import MoEModelWrapper
from core.routing_cache import RoutingCache
from data import DatasetLoader, TokenizedDataset, tokenize_documents
from exp.run_options import REPO_ROOT, RunOptions

ROUTER_WEIGHTS_FILE = "router_weights.safetensors"


@dataclass
class ModelTarget:
    """What the run studies: a display name, what to open, and the checkpoints in training order."""

    name: str
    source: str  # Hub name or local directory of the final model
    revision: str | None
    checkpoints: list[Checkpoint]  # training order; the last one is the model analysed in full
    embedded: bool
    run_dir: Path | None = None
    weights_digest: str | None = None  # of a local model's weight files: retrained weights get new caches

    @property
    def final(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def cache_key(self) -> str:
        """The name caches are filed under: the model name, plus the weights' digest for local models."""
        return f"{self.name}@{self.weights_digest}" if self.weights_digest else self.name


def weights_digest(folder: Path, whole_file_limit: int = 256 << 20) -> str:
    """A short digest of a local model's weight files (whole files up to 256 MB, else their size, head and tail).

    Caches are keyed by model name and checkpoint; for a local folder the name says nothing
    about the weights, so a retrained model would otherwise be analysed with stale routing.
    """
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {folder}")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= whole_file_limit:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                part = min(16 << 20, whole_file_limit)
                h.update(fh.read(part))
                fh.seek(max(size - part, part))
                h.update(fh.read())
    return h.hexdigest()[:12]


def resolve_model(opts: RunOptions) -> ModelTarget:
    """The model and checkpoints named by the options; trains the embedded default if it is missing."""
    if opts.model is None:
        from core.moe_training import ensure_default_model

        config = REPO_ROOT / "configs" / ("train_micro.yaml" if opts.micro else "train_default.yaml")
        run_dir = ensure_default_model(opts.models_dir, config=config, progress=opts.progress)
        ckpts = select_checkpoints(list_local_checkpoints(run_dir), n=opts.max_checkpoints, spacing="log")
        return ModelTarget(name=f"embedded/{run_dir.name}", source=str(run_dir), revision=None,
                           checkpoints=ckpts, embedded=True, run_dir=run_dir, weights_digest=weights_digest(run_dir))
    local = Path(opts.model).expanduser()
    if local.is_dir() and (local / "checkpoints.json").exists():  # a local training run: its revisions are checkpoints
        ckpts = list_local_checkpoints(local)
        if opts.checkpoints and opts.checkpoints != ["auto"]:
            ckpts = [c for c in ckpts if c.name in set(opts.checkpoints)] or ckpts
        ckpts = select_checkpoints(ckpts, n=opts.max_checkpoints, spacing="log")
        return ModelTarget(name=local.name, source=str(local), revision=None, checkpoints=ckpts, embedded=False, run_dir=local,
                           weights_digest=weights_digest(local))
    final = Checkpoint(name=opts.revision or "main", path=str(local) if local.is_dir() else None)
    if not opts.checkpoints:
        ckpts = [final]
    elif opts.checkpoints == ["auto"]:
        ckpts = select_checkpoints(list_hub_checkpoints(opts.model), n=opts.max_checkpoints, spacing="log")
    else:
        ckpts = [parse_checkpoint_name(c) for c in opts.checkpoints]
        if final.name not in {c.name for c in ckpts}:
            ckpts.append(final)  # saturation is measured against the model itself
    return ModelTarget(name=opts.model, source=str(opts.model), revision=opts.revision, checkpoints=ckpts, embedded=False,
                       weights_digest=weights_digest(local) if local.is_dir() else None)


def open_wrapper(target: ModelTarget, ckpt: Checkpoint, opts: RunOptions) -> MoEModelWrapper:
    """The model at one checkpoint (a local folder or a Hub revision)."""
    return MoEModelWrapper(ckpt.path or target.source, revision=ckpt.revision, device=opts.device, dtype=opts.dtype,
                           trust_remote_code=opts.trust_remote_code)


def load_tokenized(opts: RunOptions, tokenizer: Any, loader: DatasetLoader | None = None) -> dict[str, TokenizedDataset]:
    """Each dataset's documents, tokenized (one row per document) and cut to ``max_tokens`` tokens.

    All datasets share one domain and dataset name table, so their routing can be concatenated.
    The embedded model reads the bundled corpora unless told otherwise (it is the offline default).
    """
    offline = opts.offline if opts.offline is not None else (True if opts.model is None else None)
    loader = loader or DatasetLoader(offline=offline)
    docs = loader.load_domains(opts.datasets, num_samples_per_dataset=opts.num_samples, seed=opts.seed)
    domains = list(dict.fromkeys(d.domain for d in docs))
    out = {}
    for name in opts.datasets:
        mine = [d for d in docs if d.dataset == name]
        tok = tokenize_documents(mine, tokenizer, max_length=opts.max_length, pack=False,
                                 domain_names=domains, dataset_names=list(opts.datasets))
        out[name] = tok.head_tokens(opts.max_tokens)
    return out


def _weights_path(cache_root: Path, target: ModelTarget, ckpt: Checkpoint) -> Path:
    return cache_root / model_slug(target.cache_key) / model_slug(ckpt.name) / ROUTER_WEIGHTS_FILE


def _save_router_weights(path: Path, weights: dict[int, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({str(k): v.contiguous() for k, v in weights.items()}, str(tmp))
    tmp.replace(path)


def collect_all(opts: RunOptions, target: ModelTarget, tokenized: dict[str, TokenizedDataset],
                final_wrapper: MoEModelWrapper | None = None) -> dict[str, list[tuple[str, int | None, RoutingCache]]]:
    """Routing caches of every dataset at every checkpoint: ``{dataset: [(checkpoint, step, cache), ...]}``."""
    cache_root = Path(opts.cache_dir or Path(opts.results_dir) / "cache")

    def make_wrapper(ckpt: Checkpoint) -> MoEModelWrapper:
        w = final_wrapper if (final_wrapper is not None and ckpt == target.final) else open_wrapper(target, ckpt, opts)
        _save_router_weights(_weights_path(cache_root, target, ckpt), w.get_router_weights())
        return w

    index = sweep_checkpoints(
        target.checkpoints, tokenized, make_wrapper, cache_root, model_name=target.cache_key, batch_size=opts.batch_size,
        storage=opts.storage, progress=opts.progress,
    )
    return {name: open_sweep(index, name, checkpoints=target.checkpoints) for name in tokenized}


def router_weights_over_checkpoints(opts: RunOptions, target: ModelTarget) -> list[dict[int, torch.Tensor]]:
    """Each checkpoint's router matrices, from beside its caches (loading the model only if they are missing)."""
    cache_root = Path(opts.cache_dir or Path(opts.results_dir) / "cache")
    out = []
    for ckpt in target.checkpoints:
        path = _weights_path(cache_root, target, ckpt)
        if not path.exists():
            _save_router_weights(path, open_wrapper(target, ckpt, opts).get_router_weights())
        out.append({int(k): v for k, v in load_file(str(path)).items()})
    return out
