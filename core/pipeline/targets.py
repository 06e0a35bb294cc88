"""Stage 1 of the main run: which model and checkpoints, which tokens, and their routing caches.

Caches are keyed by model, checkpoint, dataset, the exact token rows and the collection
settings (see ``core.collection.sweep``), so a second run with the same options reuses every
cache without loading a model, and a run with other options never reads stale routing.
Training the embedded model is a step of its own (:func:`train_embedded_model`), before this.
A model trained by the toolkit is studied on held-out text only: the documents its training
run read (its ``training_data.json``) are left out before the datasets are sampled.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

import torch

from core.collection.checkpoints import (
    Checkpoint,
    CheckpointError,
    list_hub_checkpoints,
    list_local_checkpoints,
    parse_checkpoint_name,
    select_checkpoints,
)
from core.collection.hub_disk import is_hub_repo, plan_text
from core.collection.sweep import Sweep, sweep_checkpoints
from core.model_access.loading import Placement, parse_max_memory
from core.model_access.shapes import (
    RECORD_NAME,
    ensure_random_model,
    is_random_spec,
    random_model_folder,
)
from core.model_access.wrapper import MoEModelWrapper
from core.paths import CONFIGS
from core.pipeline.options import OptionsError, RunOptions
from core.store.cache_format import bytes_per_token
from core.store.identity import weights_digest
from data import DataError, DatasetLoader, LoadReport, TokenizedDataset, renumber_documents, tokenize_documents


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


def embedded_config(opts: RunOptions) -> Path:
    return CONFIGS / ("train_micro.yaml" if opts.micro else "train_default.yaml")


def train_embedded_model(opts: RunOptions) -> Path:
    """The embedded default model's run folder, training it first if it is not there yet."""
    from core.pipeline.training_monitor import study_moe_monitor
    from core.study_moe.training import ensure_default_model

    config = embedded_config(opts)
    if not opts.output.wandb:
        return ensure_default_model(opts.model.models_dir, config=config, progress=opts.output.progress, monitor=study_moe_monitor())
    from core.pipeline.training_wandb import WandbTrainingLog
    from core.study_moe.config import TrainConfig

    sink = WandbTrainingLog(TrainConfig.from_yaml(config), opts.output.wandb_project, Path(opts.output.results_dir) / "wandb-training")
    # no W&B run when the model was found, not trained: the sink starts one at the first log line
    return sink.run(lambda sinks: ensure_default_model(opts.model.models_dir, config=config, progress=opts.output.progress,
                                                       monitor=study_moe_monitor(), sinks=sinks))


def resolve_model(opts: RunOptions, embedded_run: Path | None = None) -> ModelTarget:
    """The model and checkpoints named by the options (``embedded_run``: the trained embedded model's folder)."""
    if opts.model.name is None:
        if embedded_run is None or not (embedded_run / "checkpoints.json").is_file():
            raise CheckpointError("the embedded model is not trained yet: run train_embedded_model(options) first")
        ckpts = _run_checkpoints(embedded_run, opts, f"the embedded model ({embedded_run})")
        return ModelTarget(name=f"embedded/{embedded_run.name}", source=str(embedded_run), revision=None,
                           checkpoints=ckpts, embedded=True, run_dir=embedded_run, weights_digest=weights_digest(embedded_run))
    if is_random_spec(opts.model.name):
        return _random_target(opts)
    local = Path(opts.model.name).expanduser()
    if local.is_dir() and (local / "checkpoints.json").exists():  # a local training run: its revisions are checkpoints
        ckpts = _run_checkpoints(local, opts, str(local))
        return ModelTarget(name=local.name, source=str(local), revision=None, checkpoints=ckpts, embedded=False, run_dir=local,
                           weights_digest=weights_digest(local))
    if local.is_dir() and (opts.model.revision or opts.model.checkpoints):
        what = f"--revision {opts.model.revision}" if opts.model.revision else f"--checkpoints {','.join(opts.model.checkpoints)}"
        raise CheckpointError(f"{what}: {local} is a plain model directory with one set of weights and no revisions "
                              "(a training run folder has checkpoints.json; Hub models have branches)")
    final = Checkpoint(name=opts.model.revision or "main", path=str(local) if local.is_dir() else None)
    if not opts.model.checkpoints:
        ckpts = [final]
    elif opts.model.checkpoints == ["auto"]:
        ckpts = select_checkpoints(list_hub_checkpoints(opts.model.name), n=opts.model.max_checkpoints, spacing="log")
    else:
        ckpts = [parse_checkpoint_name(c) for c in opts.model.checkpoints]
        _check_hub_names(opts.model.name, [c.name for c in ckpts] + ([opts.model.revision] if opts.model.revision else []))
        if final.name not in {c.name for c in ckpts}:
            ckpts.append(final)  # saturation is measured against the model itself
    return ModelTarget(name=opts.model.name, source=str(opts.model.name), revision=opts.model.revision, checkpoints=ckpts, embedded=False,
                       weights_digest=weights_digest(local) if local.is_dir() else None)


def _random_target(opts: RunOptions) -> ModelTarget:
    """A ``random:NAME`` model: its folder (written by :func:`ensure_random_model`), one set of weights, no revisions."""
    folder = random_model_folder(opts.model.name, opts.model.layers, opts.seed, opts.model.models_dir)
    if not (folder / RECORD_NAME).is_file():
        raise CheckpointError(f"{opts.model.name} is not written yet: run core.pipeline.targets.write_random(options) first")
    if opts.model.revision or opts.model.checkpoints:
        raise CheckpointError(f"{opts.model.name} has one set of random weights: it has no revisions or checkpoints")
    return ModelTarget(name=f"random:{folder.name}", source=str(folder), revision=None,
                       checkpoints=[Checkpoint(name="main", path=str(folder))], embedded=False,
                       weights_digest=weights_digest(folder))


def write_random(opts: RunOptions) -> Path:
    """The folder of the ``random:NAME`` model the options name, written first if missing (a few GB at OLMoE's size)."""
    return ensure_random_model(opts.model.name, opts.model.layers, opts.seed, opts.model.models_dir, make_tokenizer=bundled_tokenizer)


def bundled_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE learned from the bundled WikiText-2 validation split (the runs analyse its test split)."""
    from core.study_moe.tokenizer import train_bpe_tokenizer

    docs = DatasetLoader(offline=True).load("wikitext2", "validation")
    return train_bpe_tokenizer([d.text for d in docs], vocab_size=vocab_size)


def _check_hub_names(model: str, names: list[str]) -> None:
    """Named revisions must be branches of the Hub repository (checked where the Hub answers; else loading says so)."""
    try:
        branches = {c.name for c in list_hub_checkpoints(model, include_other=True)} | {"main"}
    except CheckpointError:
        return
    unknown = [n for n in names if n not in branches]
    if unknown:
        sample = ", ".join(sorted(branches)[:8]) + (" ..." if len(branches) > 8 else "")
        raise CheckpointError(f"{model} has no revision {', '.join(unknown)}; it has {len(branches)}: {sample}")


def _run_checkpoints(run_dir: Path, opts: RunOptions, where: str) -> list[Checkpoint]:
    """A training run's checkpoints to study: ``--revision`` is the one analysed in full (the last), with those before it."""
    available = list_local_checkpoints(run_dir)
    revision = opts.model.revision
    if revision:
        names = [c.name for c in available]
        if revision not in names:
            raise CheckpointError(f"--revision {revision}: no checkpoint {revision} in {where}; it has {', '.join(names)}")
        later = [n for n in opts.model.checkpoints if n in names[names.index(revision) + 1:]]
        if later:
            raise CheckpointError(f"--checkpoints {', '.join(later)} come after --revision {revision}, the model analysed: "
                                  "name earlier checkpoints, or a later --revision")
        available = available[:names.index(revision) + 1]
    return _named_or_selected(available, opts, where)


def _named_or_selected(available: list[Checkpoint], opts: RunOptions, where: str) -> list[Checkpoint]:
    """The checkpoints ``--checkpoints`` names (the final one always included), or a log-spaced subset.

    A name that does not exist is an error listing what does, never a silent fallback.
    """
    if not opts.model.checkpoints or opts.model.checkpoints == ["auto"]:
        return select_checkpoints(available, n=opts.model.max_checkpoints, spacing="log")
    by_name = {c.name: c for c in available}
    unknown = [n for n in opts.model.checkpoints if n not in by_name]
    if unknown:
        raise CheckpointError(f"no checkpoint {', '.join(unknown)} in {where}; it has {', '.join(by_name)}")
    picked = [by_name[n] for n in dict.fromkeys(opts.model.checkpoints)]
    if available and available[-1].name not in {c.name for c in picked}:
        picked.append(available[-1])  # saturation is measured against the final checkpoint
    return sorted(picked, key=lambda c: available.index(c))


def open_wrapper(target: ModelTarget, ckpt: Checkpoint, opts: RunOptions) -> MoEModelWrapper:
    """The model at one checkpoint (a local folder or a Hub revision)."""
    from core.study_moe.model import register_with_auto

    register_with_auto()  # the toolkit's own model type opens from any folder (a copied run, an edited config)
    placement = None
    if opts.model.device_map:
        placement = Placement(opts.model.device_map, parse_max_memory(opts.model.max_memory), str(Path(opts.model.models_dir) / "offload"))
    remote = {"ndif": True, "local": "local"}.get(opts.model.remote or "", False)
    wrapper = MoEModelWrapper(ckpt.path or target.source, revision=ckpt.revision, device=opts.model.device, dtype=opts.model.dtype,
                              trust_remote_code=opts.model.trust_remote_code, placement=placement, remote=remote)
    placed = torch.device(wrapper.device).type
    if placed != torch.device(opts.model.device).type:  # caches record the device type the routing was computed on
        raise OptionsError(f"--device-map {opts.model.device_map} put the model's input layer on {wrapper.device}; "
                           f"pass --device {placed} with it")
    return wrapper


def training_exclusion(target: ModelTarget) -> frozenset[str] | None:
    """Text digests of the documents the target's training run read (None: not recorded, nothing to leave out)."""
    from core.study_moe.training_data import training_digests

    return training_digests(target.run_dir) if target.run_dir is not None else None


def load_tokenized(opts: RunOptions, tokenizer: Any, loader: DatasetLoader | None = None,
                   exclude: Collection[str] | None = None) -> dict[str, TokenizedDataset]:
    """Each dataset's documents, tokenized (one row per document) and cut to ``max_tokens`` tokens.

    All datasets share one domain and dataset name table, so their routing can be concatenated.
    The embedded model reads the bundled corpora unless told otherwise (it is the offline default).
    ``exclude`` (text digests, see :func:`training_exclusion`) leaves the model's training
    documents out before sampling, so the run analyses held-out documents only.
    """
    offline = opts.data.offline if opts.data.offline is not None else (True if opts.model.name is None else None)
    loader = loader or DatasetLoader(offline=offline)
    parts = []
    for name in opts.data.datasets:  # one at a time, so that a dataset that gives nothing is told apart from the others
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            part = loader.load(name, None, opts.data.num_samples, opts.seed, exclude)
        if not part:  # the error says why, in one line; "only 0 documents" would be a second
            raise DataError(_why_no_documents(loader.last_report))
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        parts.append(part)
    docs = renumber_documents(d for part in parts for d in part)
    domains = list(dict.fromkeys(d.domain for d in docs))
    out = {}
    for name in opts.data.datasets:
        mine = [d for d in docs if d.dataset == name]
        try:
            tok = tokenize_documents(mine, tokenizer, max_length=opts.data.max_length, pack=False,
                                     domain_names=domains, dataset_names=list(opts.data.datasets))
        except DataError as e:
            raise DataError(f"dataset {name}: {len(mine)} documents, but {e}") from None
        out[name] = tok.head_tokens(opts.data.max_tokens)
    return out


def _why_no_documents(report: LoadReport) -> str:
    """What left a dataset without documents: none in its split, all of them empty, or all in the model's training corpus."""
    where = f"dataset {report.name} ({report.split} split, {report.source})"
    if report.excluded:  # a document neither empty nor excluded would have been returned
        return (f"{where} gave no documents to analyse: all {report.excluded} of its non-empty documents were in the "
                "model's training corpus (the embedded model holds out documents of wikitext2, gsm8k, humaneval and shakespeare)")
    if report.skipped_empty:
        return f"{where} gave no documents: all {report.skipped_empty} of its documents are empty"
    return f"{where} gave no documents: it holds none"


def collect_all(opts: RunOptions, target: ModelTarget, tokenized: dict[str, TokenizedDataset],
                final_wrapper: MoEModelWrapper | None = None) -> Sweep:
    """Routing caches of every dataset at every checkpoint, and each checkpoint's router weights."""
    def make_wrapper(ckpt: Checkpoint) -> MoEModelWrapper:
        if final_wrapper is not None and ckpt == target.final:
            return final_wrapper
        return open_wrapper(target, ckpt, opts)

    settings = opts.collection.settings()
    token_bytes = None
    if final_wrapper is not None:  # the caches' size is known from the model's shape; checked against free space first
        w = final_wrapper
        token_bytes = bytes_per_token(settings, len(w.moe_layers), w.num_experts, w.top_k, int(getattr(w, "hidden_size", 0) or 0))
    return sweep_checkpoints(
        target.checkpoints, tokenized, make_wrapper, opts.cache_root, model_name=target.cache_key,
        **settings, router_weights=opts.model.remote != "ndif", progress=opts.output.progress,
        model_source=target.source, model_dtype=opts.model.dtype, device=opts.model.device, force=opts.output.recollect,
        keep_checkpoints=opts.model.keep_checkpoints, announce=lambda ckpts: announce_downloads(opts, target, ckpts),
        token_bytes=token_bytes,
    )


def announce_downloads(opts: RunOptions, target: ModelTarget, to_load: list[Checkpoint], say: Any = print) -> str | None:
    """Before collecting: the download and disk use of the Hub revisions still to collect (finished ones need none).

    Only for a Hub model's revisions (local folders download nothing). The final model the run
    analyses is loaded before the sweep, so it counts as cached and is kept for the analyses.
    """
    revisions = [c.revision for c in to_load if c.path is None]
    if target.embedded or not revisions or not is_hub_repo(target.source) or not opts.output.progress:
        return None
    text = plan_text(target.source, revisions, keep=opts.model.keep_checkpoints)
    say(text)
    return text


def model_card(target: ModelTarget, wrapper: MoEModelWrapper, tokenized: dict[str, TokenizedDataset]) -> dict[str, Any]:
    """What the report and metrics.json say of the model: name, revision, weights, shape, checkpoints, the data it saw."""
    from core.study_moe.training_data import training_data_note

    analysed = target.final.path  # a local checkpoint's own weights: the digest says which model was analysed
    return {"name": target.name, **wrapper.describe(), "final_checkpoint": target.final.name,
            "weights_digest": weights_digest(analysed) if analysed else target.weights_digest, "checkpoints": [c.name for c in target.checkpoints], "embedded": target.embedded,
            "training_data": training_data_note(target.run_dir, tokenized)}
