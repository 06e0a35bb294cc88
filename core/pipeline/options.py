"""Options of the main run, by stage: model, data, collection, analysis, output (nested dataclasses).

The dataclasses are the one statement of every option: its default, its help and its choices
sit on its field, and the command line (:func:`build_parser`), the YAML files of ``configs/``
(:func:`load_yaml`, either nested by stage or flat) and ``--print-config`` are made from them.
The command line overrides the YAML file, which overrides the defaults, so a researcher keeps a
config per study (``configs/olmoe.yaml``) and tweaks one flag at a time. The collection stage
holds exactly the settings a routing cache's identity records (``CollectionOptions.settings``).
"""

from __future__ import annotations

import argparse
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from core.path_names import BadNameError, check_name, check_path_length, check_path_name
from core.paths import CONFIGS
from core.safe_io import probe_writable


class OptionsError(ValueError):
    """A config file or flag is wrong; the message says which."""


def opt(default: Any, help: str, *, choices: tuple | None = None, key: str | None = None, low: int | None = None,
        repeat: bool = False) -> Any:
    """A field with its help text (and choices); ``key``: its name on the command line and in YAML, if not the field's;
    ``low``: the smallest value a number (or each number of a list) may take, checked by :func:`check_ranges`;
    ``repeat``: a list whose flag may be given several times (the values add up)."""
    meta = {"help": help, "choices": choices, "key": key, "low": low, "repeat": repeat}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
REMOTES = ("ndif", "local")
REUSED_ANALYSES = ("pass", "router_similarity", "expert_alignment", "ablation", "pruning",
                   "generated_text")  # the one pass, and the analyses that declare reuse_key (tests/test_result_reuse.py checks)
DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")


@dataclass
class ModelOptions:
    """What is studied, at which checkpoints, and where it runs."""

    name: str | None = opt(None, "Hub name or local directory (default: the embedded model, trained on the bundled corpus "
                           "the first time); random:NAME builds a model with NAME's dimensions and random weights, offline "
                           "for random:allenai/OLMoE-1B-7B-0924, to measure at scale", key="model")
    layers: int | None = opt(None, "with --model random:NAME: how many of NAME's decoder layers (default: all)", low=1)
    revision: str | None = opt(None, "model revision (branch, tag or commit)")
    checkpoints: list[str] = opt([], "comma-separated revisions to study over training, or 'auto' (all of a local run; "
                                 "a log-spaced subset on the Hub)")
    max_checkpoints: int = opt(8, "at most this many checkpoints with --checkpoints auto", low=1)
    keep_checkpoints: bool = opt(False, "keep every Hub checkpoint in the Hugging Face cache after its routing is collected "
                                 "(about 14 GB each for OLMoE); by default each revision the sweep downloaded is deleted once "
                                 "collected, and revisions you had cached before are never deleted")
    device: str = opt("cpu", "cpu, cuda, cuda:1, ... or mps")
    device_map: str | None = opt(None, "spread a model bigger than one GPU over the GPUs (and CPU, and disk under "
                                 "<models-dir>/offload) with accelerate; auto fills GPU 0 first", choices=DEVICE_MAPS)
    max_memory: str | None = opt(None, "with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    dtype: str | None = opt(None, "the model's dtype: float32, bfloat16, float16 or auto", choices=DTYPES)
    remote: str | None = opt(None, "ndif: run the traces (collection, ablation) on NDIF, nnsight's hosted models, with the "
                             "API key in NDIF_API_KEY; weight analyses are skipped (the weights stay there). local: run them "
                             "through nnsight's local simulation of an NDIF request, to check before sending", choices=REMOTES)
    trust_remote_code: bool = opt(False, "run the model repository's own code (only for a repository you trust)")
    models_dir: str = opt("models", "where the embedded model is trained and random models are written")


@dataclass
class DataOptions:
    """Which documents, and how many tokens of them."""

    datasets: list[str] = opt(["wikitext2", "gsm8k", "humaneval", "shakespeare"],
                              "comma-separated dataset names (e.g. fineweb,gsm8k,humaneval)")
    offline: bool | None = opt(None, "use only the bundled corpora (default for the embedded model; the Hub for others)")
    num_samples: int = opt(200, "documents per dataset", low=1)
    max_tokens: int = opt(40_000, "tokens collected per dataset (after tokenization)", low=1)
    max_length: int = opt(128, "tokens per sequence", low=1)


@dataclass
class CollectionOptions:
    """How routing is collected: exactly the settings a routing cache's identity records (other settings, other caches)."""

    batch_size: int = opt(16, "sequences per forward pass", low=1)
    storage: str = opt("full", "cache router logits and selections (full) or only selections (compact)", choices=("full", "compact"))
    shard_tokens: int = opt(65_536, "tokens per cache shard (what the analyses hold in memory per checkpoint)", low=1)
    logits_dtype: str = opt("float16", "precision of the cached router logits and weights",
                            choices=("float16", "bfloat16", "float32"))
    hidden_layers: list[int] = opt([], "comma-separated model layers whose hidden states are cached with the routing "
                                   "(for probes; default none)", low=0)

    def settings(self) -> dict[str, Any]:
        """The settings as ``core.collection.sweep.sweep_checkpoints`` takes them and a cache's manifest records them."""
        return {"batch_size": self.batch_size, "storage": self.storage, "shard_tokens": self.shard_tokens,
                "dtype": self.logits_dtype, "hidden_layers": [int(x) for x in self.hidden_layers]}


@dataclass
class AnalysisOptions:
    """Which analyses beyond the one pass run, on how many tokens, with how many resamples."""

    ablation: bool = opt(True, "the causal ablation of each layer's most- and least-used expert")
    ablation_tokens: int = opt(4_000, "tokens per dataset for the ablation forward passes", low=1)
    pruning: bool = opt(True, "the expert-pruning study (each criterion against random)")
    pruning_tokens: int = opt(1_500, "tokens per dataset for the pruning forward passes", low=1)
    pruning_fractions: list[float] = opt([0.125, 0.25, 0.5], "comma-separated shares of each layer's experts to prune")
    pruning_random_seeds: int = opt(8, "random choices the pruning criteria are tested against (at least 3)", low=3)
    collaboration: bool = opt(True, "dictionary learning of experts that fire together")
    generate_tokens: int = opt(24, "tokens the model writes after the start of 2 documents per domain, shown coloured by "
                               "the routing recorded while it wrote them (0: none; never for a remote model)", low=0)
    resamples: int = opt(200, "bootstrap resamples over documents behind every interval (0: no intervals or nulls)", low=0)
    recompute: list[str] = opt([], "compute these analyses again even where a stored result of the same model, tokens, "
                               "settings and inputs exists (repeatable, or comma-separated)",
                               choices=(*REUSED_ANALYSES, "all"), repeat=True)


@dataclass
class OutputOptions:
    """Where the results and caches go, and what is written besides metrics.json and the report."""

    run_name: str | None = opt(None, "name of results/<run>/ (default: derived from the model and options)")
    results_dir: str = opt("results", "where each run's folder is written")
    cache_dir: str | None = opt(None, "where routing caches live (default: <results-dir>/cache)")
    recollect: bool = opt(False, "collect routing again even where a cache of the same model, data and settings exists")
    static: str = opt("png", "also write each figure as an image (needs Chromium)", choices=("png", "svg", "pdf", "none"))
    wandb: bool = opt(False, "log to Weights & Biases (offline without an API key)")
    wandb_project: str = opt("moe-routing-study", "the W&B project")
    progress: bool = opt(True, "progress bars and stage lines")


STAGES = {"model": ModelOptions, "data": DataOptions, "collection": CollectionOptions, "analysis": AnalysisOptions,
          "output": OutputOptions}


@dataclass
class RunOptions:
    """Everything that decides what a run computes (and so which caches it may reuse), by stage."""

    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    collection: CollectionOptions = field(default_factory=CollectionOptions)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    seed: int = opt(0, "seed of the document sample, random models and every resampling", low=0)
    micro: bool = opt(False, "tiny sizes everywhere (smoke test)")

    def to_dict(self) -> dict[str, Any]:
        """The options by stage, each under its command-line and YAML name: what metrics.json and ``--print-config`` show."""
        out = asdict(self)
        for stage, cls in STAGES.items():
            out[stage] = {_key(f): out[stage][f.name] for f in fields(cls)}
        return out

    @property
    def cache_root(self) -> Path:
        return Path(self.output.cache_dir or Path(self.output.results_dir) / "cache")


def _key(f: Any) -> str:
    return f.metadata.get("key") or f.name


def option_table() -> dict[str, tuple[str | None, Any, Any]]:
    """Every option by its command-line and YAML name: (stage or None for the top level, field, type)."""
    out: dict[str, tuple[str | None, Any, Any]] = {}
    for stage, cls in STAGES.items():
        hints = typing.get_type_hints(cls)
        out.update({_key(f): (stage, f, hints[f.name]) for f in fields(cls)})
    hints = typing.get_type_hints(RunOptions)
    out.update({f.name: (None, f, hints[f.name]) for f in fields(RunOptions) if f.name not in STAGES})
    return out


def _base(tp: Any) -> tuple[type, bool]:
    """An annotation's base type (int, str, bool, float or list) and whether None is allowed."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base(args[0])[0], True
    return (list if typing.get_origin(tp) is list else tp), False


def _item_type(tp: Any) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    inner = typing.get_args(args[0]) if typing.get_origin(tp) in (Union, types.UnionType) else args
    return inner[0] if inner else str


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """A YAML or keyword value as the option's type, or a one-line error naming the option."""
    base, optional = _base(tp)
    if value is None:
        if optional:
            return None
        raise OptionsError(f"{key.replace('_', '-')} needs a value")
    if base is list:
        if isinstance(value, (bool, dict, set)):
            raise OptionsError(f"{key.replace('_', '-')} must be a list or comma-separated values, not {value!r}")
        items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
        return [_coerce(key, v, _item_type(tp)) for v in items]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise OptionsError(f"{key.replace('_', '-')} must be true or false, not {value!r}")
    if base in (int, float):
        if isinstance(value, bool) or (base is int and isinstance(value, float) and not value.is_integer()):
            raise OptionsError(f"{key.replace('_', '-')} must be a {'whole ' if base is int else ''}number, not {value!r}")
        try:
            return base(value)
        except (TypeError, ValueError):
            raise OptionsError(f"{key.replace('_', '-')} must be a {'whole ' if base is int else ''}number, not {value!r}") from None
    if isinstance(value, (bool, list, tuple, dict, set)):  # YAML's yes/no, a list or a mapping where a name belongs
        raise OptionsError(f"{key.replace('_', '-')} must be a name or text, not {value!r}")
    return str(value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's options by name: nested by stage (``data: {max_tokens: ...}``) or flat (``max_tokens: ...``)."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (CONFIGS / p.name).exists():
        p = CONFIGS / p.name
    if not p.exists():
        raise OptionsError(f"config file {path} does not exist (configs are in {CONFIGS})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise OptionsError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise OptionsError(f"config file {p} must hold a mapping of option: value")
    flat: dict[str, Any] = {}
    for k, v in data.items():
        k = str(k).replace("-", "_")
        if k in STAGES and isinstance(v, dict):  # a stage (``model:`` with a value is the flat model name)
            flat.update({str(kk).replace("-", "_"): vv for kk, vv in v.items()})
        elif k in STAGES and k not in option_table():
            raise OptionsError(f"config file {p}: {k} must hold a mapping of option: value")
        else:
            flat[k] = v
    unknown = sorted(set(flat) - set(option_table()))
    if unknown:
        raise OptionsError(f"config file {p}: unknown options {unknown}; known: {sorted(option_table())}")
    return flat


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per option field (``--no-X`` for options that are on by default)."""
    ap = argparse.ArgumentParser(
        prog="basic_routing_analysis.py",
        description="Trace, cache and analyse how an MoE language model routes tokens; writes results/<run>/ "
        "with metrics, figures and an HTML report. With no arguments it runs offline on the toolkit's "
        "embedded MoE (trained on the bundled corpus the first time).",
    )
    ap.add_argument("--config", help="YAML file of options (see configs/), nested by stage or flat; flags override it")
    ap.add_argument("--print-config", action="store_true", help="print the options (defaults < --config < flags) as YAML and exit")
    for stage, title in [(s, f"{s} options") for s in STAGES] + [(None, "run options")]:
        group = ap.add_argument_group(title)
        for key, (where, f, tp) in option_table().items():
            if where == stage:
                _add_flag(group, key, f, tp)
    return ap


def _add_flag(group: Any, key: str, f: Any, tp: Any) -> None:
    """One option's flag: its help, choices and type from the field."""
    flag, base = "--" + key.replace("_", "-"), _base(tp)[0]
    help_text = f.metadata.get("help")
    if base is bool and f.default is True:
        group.add_argument(f"--no-{key.replace('_', '-')}", dest=key, action="store_false", default=None, help=f"skip: {help_text}")
    elif base is bool:
        group.add_argument(flag, dest=key, action="store_true", default=None, help=help_text)
    else:  # choices are checked by validate(): a wrong one is a one-line error, like every other wrong value
        choices = f.metadata.get("choices")
        help_text += f" (one of {', '.join(choices)})" if choices else ""
        group.add_argument(flag, dest=key, default=None, help=help_text, action="append" if f.metadata.get("repeat") else "store",
                           metavar=key.upper() if base is list or not choices else "{" + ",".join(choices) + "}")


def parse_options(argv: list[str] | None = None) -> RunOptions:
    """Defaults < YAML (``--config``) < flags; ``--print-config`` prints the result as YAML and exits."""
    args = vars(build_parser().parse_args(argv))
    config, show = args.pop("config"), args.pop("print_config")
    merged: dict[str, Any] = load_yaml(config) if config else {}
    merged.update({k: ",".join(v) if isinstance(v, list) else v for k, v in args.items() if v is not None})
    opts = make_options(**merged)
    if show:
        print(to_yaml(opts), end="")
        raise SystemExit(0)
    return opts


def to_yaml(opts: RunOptions) -> str:
    """The options as a config file of ``configs/`` (nested by stage) that gives the same run."""
    return yaml.safe_dump(opts.to_dict(), sort_keys=False)


def make_options(**kwargs: Any) -> RunOptions:
    """RunOptions from options by name (as on the command line, flat), lists as lists or comma-separated strings."""
    table = option_table()
    unknown = sorted(set(kwargs) - set(table))
    if unknown:
        raise OptionsError(f"unknown options {unknown}")
    parts: dict[str | None, dict[str, Any]] = {stage: {} for stage in STAGES}
    parts[None] = {}
    for key, value in kwargs.items():
        stage, f, tp = table[key]
        parts[stage][f.name] = _coerce(key, value, tp)
    opts = RunOptions(**{stage: cls(**parts[stage]) for stage, cls in STAGES.items()}, **parts[None])
    if opts.micro:
        _shrink(opts)
    validate(opts)
    return opts


def _shrink(opts: RunOptions) -> None:
    """--micro: tiny sizes everywhere (several shards per cache, as at full size)."""
    d, a, c = opts.data, opts.analysis, opts.collection
    d.num_samples, d.max_tokens, d.max_length = min(d.num_samples, 12), min(d.max_tokens, 1_500), min(d.max_length, 64)
    a.ablation_tokens, a.pruning_tokens = min(a.ablation_tokens, 300), min(a.pruning_tokens, 300)
    a.pruning_random_seeds = min(a.pruning_random_seeds, 3)  # the fewest its test takes: 21 pruned forwards, not 36
    a.generate_tokens = min(a.generate_tokens, 8)
    opts.model.max_checkpoints = min(opts.model.max_checkpoints, 3)
    c.batch_size, c.shard_tokens = min(c.batch_size, 4), min(c.shard_tokens, 128)


def validate(opts: RunOptions) -> None:
    """Every option's range and choices, and how options combine; a one-line OptionsError for the first that is wrong."""
    for stage, cls in STAGES.items():
        for f in fields(cls):
            value, choices = getattr(getattr(opts, stage), f.name), f.metadata.get("choices")
            values = value if isinstance(value, list) else [value]  # a list's every item (--recompute)
            wrong = [v for v in values if choices and v is not None and v not in choices]
            if wrong:
                raise OptionsError(f"{_key(f).replace('_', '-')} must be one of {', '.join(map(str, choices))}, not {wrong[0]!r}")
    check_ranges(opts)
    fr = opts.analysis.pruning_fractions
    if not fr or not all(0 < f < 1 for f in fr):
        raise OptionsError(f"pruning-fractions must be shares between 0 and 1, not {fr!r}")
    if not opts.data.datasets:
        raise OptionsError("no datasets given")
    if len(set(opts.data.datasets)) != len(opts.data.datasets):
        raise OptionsError(f"datasets repeat: {', '.join(opts.data.datasets)}")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", str(opts.model.device)):
        raise OptionsError(f"device must be cpu, cuda, cuda:N or mps, not {opts.model.device!r}")
    validate_names(opts)
    _validate_model(opts.model)


def validate_names(opts: RunOptions) -> None:
    """The names that become parts of paths (run, datasets, revisions, model), before any work (``core.path_names``)."""
    try:
        if opts.output.run_name is not None:
            check_name("run-name", opts.output.run_name)
        for name in opts.data.datasets:
            check_name("dataset", name)
        for name in [opts.model.revision] + [c for c in opts.model.checkpoints if c != "auto"]:
            if name is not None:
                check_path_name("revision", name)
        if opts.model.name is not None:
            check_path_length("model", opts.model.name)
    except BadNameError as e:
        raise OptionsError(str(e)) from None


def check_ranges(opts: RunOptions) -> None:
    """Every number (and every number of a list) at least its option's declared ``low``: a new option is checked by declaring it."""
    for key, (stage, f, _) in option_table().items():
        low = f.metadata.get("low")
        value = getattr(opts if stage is None else getattr(opts, stage), f.name)
        if low is None or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if v < low:
                need = "0 or more" if low == 0 else f"a whole number of at least {low}"
                raise OptionsError(f"{key.replace('_', '-')} must be {need}, not {v!r}")


def _validate_model(m: ModelOptions) -> None:
    """How the model options combine: placement, NDIF, random models."""
    if m.max_memory is not None:
        if m.device_map is None:
            raise OptionsError("--max-memory applies with --device-map only")
        from core.model_access.loading import parse_max_memory

        try:
            parse_max_memory(m.max_memory)
        except ValueError as e:
            raise OptionsError(str(e)) from None
    if m.remote == "ndif" and (m.name is None or str(m.name).startswith("random:") or Path(m.name).exists()):
        raise OptionsError("--remote ndif runs a model NDIF hosts: pass its Hub name with --model (not a local folder)")
    if m.remote == "ndif" and m.device_map:
        raise OptionsError("--device-map places a local model; with --remote ndif the model runs on NDIF")
    if m.layers is not None and not str(m.name or "").startswith("random:"):
        raise OptionsError(f"--layers {m.layers} applies to random:NAME models only (a real model keeps all its layers)")


def preflight(opts: RunOptions) -> None:
    """What can be checked before any work starts: dataset names, the device, and that every output folder can be written."""
    device = opts.model.device
    if device != "cpu":
        import torch

        kind, _, index = device.partition(":")
        if kind == "cuda" and (not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()):
            raise OptionsError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s) here; use --device cpu")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise OptionsError("--device mps: no Apple GPU here; use --device cpu")
    if opts.model.remote == "ndif" and not os.environ.get("NDIF_API_KEY"):
        raise OptionsError("--remote ndif needs your NDIF API key in the environment variable NDIF_API_KEY "
                           "(from https://login.ndif.us; never put it in a file of the repository)")
    from data.registry import default_registry

    known = default_registry()
    unknown = [n for n in opts.data.datasets if n not in known]
    if unknown:
        raise OptionsError(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(known)}")
    folders = [Path(opts.output.results_dir), opts.cache_root]
    if opts.model.name is None or str(opts.model.name).startswith("random:"):
        folders.append(Path(opts.model.models_dir))
    for path in folders:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe_writable(path)
        except OSError as e:
            raise OptionsError(f"cannot write to {path} ({e.strerror or e}); choose another folder") from None
