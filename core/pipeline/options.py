"""Options of the main routing-analysis run: defaults, a YAML file in configs/, then the command line.

The command line overrides the YAML file, which overrides the defaults, so a researcher keeps
a config per study (``configs/olmoe.yaml``) and tweaks one flag at a time.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from core.paths import CONFIGS


@dataclass
class RunOptions:
    """Everything that decides what a run computes (and so which caches it may reuse)."""

    model: str | None = None  # None: the embedded default model, trained on the bundled corpus if missing; random:NAME: NAME's shape, random weights
    layers: int | None = None  # with model random:NAME: how many of its decoder layers (default: all)
    revision: str | None = None
    checkpoints: list[str] = field(default_factory=list)  # revisions to sweep; "auto" = all of a local run / a log-spaced subset on the Hub
    max_checkpoints: int = 8
    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "gsm8k", "humaneval"])
    offline: bool | None = None  # bundled corpora only; None: offline for the embedded model, the Hub for others
    num_samples: int = 200  # documents per dataset
    max_tokens: int = 40_000  # tokens collected per dataset (after tokenization)
    max_length: int = 128
    batch_size: int = 16
    storage: str = "full"  # "full" (logits fp16) or "compact" (indices and weights only)
    shard_tokens: int = 65_536  # tokens per cache shard: what the analyses hold in memory per checkpoint
    recollect: bool = False  # collect again even where a cache of the same identity is complete
    keep_checkpoints: bool = False  # keep Hub revisions in the HF cache after collection (default: free what the sweep downloaded)
    device: str = "cpu"
    device_map: str | None = None  # auto, balanced, balanced_low_0 or sequential: spread a big model over devices (accelerate)
    max_memory: str | None = None  # with device_map: per device, e.g. "0=70GiB,1=70GiB,cpu=200GiB"
    dtype: str | None = None
    remote: str | None = None  # ndif: trace on NDIF (NDIF_API_KEY from the environment); local: nnsight's simulation of it
    trust_remote_code: bool = False
    seed: int = 0
    run_name: str | None = None
    results_dir: str = "results"
    cache_dir: str | None = None  # default: <results_dir>/cache
    models_dir: str = "models"
    ablation: bool = True
    ablation_tokens: int = 4_000  # tokens per dataset for the ablation forward passes
    pruning: bool = True  # expert pruning by each criterion against random (core.analysis.pruning)
    pruning_tokens: int = 1_500  # tokens per dataset for the pruning forward passes (about 50 of them on the embedded model)
    pruning_fractions: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5])  # of each layer's experts
    collaboration: bool = True
    resamples: int = 200  # bootstrap resamples over documents for every interval (0: no intervals or nulls)
    static: str = "png"  # static images of every figure for papers: png, svg, pdf or none
    wandb: bool = False
    wandb_project: str = "moe-routing-study"
    progress: bool = True
    micro: bool = False  # tiny everything: for tests and smoke runs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OptionsError(ValueError):
    """A config file or flag is wrong; the message says which."""


def _split_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def load_yaml(path: str | Path) -> dict[str, Any]:
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
    known = {f.name for f in fields(RunOptions)}
    unknown = sorted(set(k.replace("-", "_") for k in data) - known)
    if unknown:
        raise OptionsError(f"config file {p}: unknown options {unknown}; known: {sorted(known)}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="basic_routing_analysis.py",
        description="Trace, cache and analyse how an MoE language model routes tokens; writes results/<run>/ "
        "with metrics, figures and an HTML report. With no arguments it runs offline on the toolkit's "
        "embedded MoE (trained on the bundled corpus the first time).",
    )
    ap.add_argument("--config", help="YAML file of options (see configs/); flags override it")
    ap.add_argument("--model", help="Hub name or local directory (default: the embedded model); random:NAME builds a model "
                    "with NAME's dimensions and random weights, offline for random:allenai/OLMoE-1B-7B-0924, to measure at scale")
    ap.add_argument("--layers", type=int, help="with --model random:NAME: how many of NAME's decoder layers (default: all)")
    ap.add_argument("--revision", help="model revision (branch, tag or commit)")
    ap.add_argument("--checkpoints", help="comma-separated revisions to study over training, or 'auto'")
    ap.add_argument("--max-checkpoints", type=int, help="at most this many checkpoints with --checkpoints auto")
    ap.add_argument("--datasets", help="comma-separated dataset names (e.g. fineweb,gsm8k,humaneval)")
    ap.add_argument("--offline", action="store_true", default=None, help="use only the bundled corpora (default for the embedded model)")
    ap.add_argument("--num-samples", type=int, help="documents per dataset")
    ap.add_argument("--max-tokens", type=int, help="tokens collected per dataset")
    ap.add_argument("--max-length", type=int, help="tokens per sequence")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--storage", choices=["full", "compact"], help="cache router logits (full) or only selections (compact)")
    ap.add_argument("--shard-tokens", type=int, help="tokens per cache shard (memory per checkpoint during analysis)")
    ap.add_argument("--recollect", action="store_true", default=None,
                    help="collect routing again even where a cache of the same model, data and settings exists")
    ap.add_argument("--keep-checkpoints", action="store_true", default=None,
                    help="keep every Hub checkpoint in the Hugging Face cache after its routing is collected (about 14 GB "
                    "each for OLMoE); by default each revision the sweep downloaded is deleted once collected, and "
                    "revisions you had cached before are never deleted")
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--device-map", choices=DEVICE_MAPS,
                    help="spread a model bigger than one GPU over the GPUs (and CPU, and disk under <models-dir>/offload) "
                    "with accelerate; auto fills GPU 0 first")
    ap.add_argument("--max-memory", help="with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    ap.add_argument("--dtype", help="float32, bfloat16, float16 or auto")
    ap.add_argument("--remote", choices=REMOTES,
                    help="ndif: run the traces (collection, ablation) on NDIF, nnsight's hosted models, with the API key "
                    "in NDIF_API_KEY; weight analyses are skipped (the weights stay there). local: run them through "
                    "nnsight's local simulation of an NDIF request, to check before sending")
    ap.add_argument("--trust-remote-code", action="store_true", default=None)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--run-name", help="name of results/<run>/ (default: derived from model and options)")
    ap.add_argument("--results-dir")
    ap.add_argument("--cache-dir", help="where routing caches live (default: <results-dir>/cache)")
    ap.add_argument("--models-dir", help="where the embedded model is trained and kept")
    ap.add_argument("--no-ablation", dest="ablation", action="store_false", default=None, help="skip the causal ablation")
    ap.add_argument("--no-pruning", dest="pruning", action="store_false", default=None, help="skip the expert-pruning study")
    ap.add_argument("--pruning-tokens", type=int, help="tokens per dataset for the pruning forward passes (default 1500)")
    ap.add_argument("--pruning-fractions", help="comma-separated shares of each layer's experts to prune (default 0.125,0.25,0.5)")
    ap.add_argument("--no-collaboration", dest="collaboration", action="store_false", default=None, help="skip dictionary learning")
    ap.add_argument("--resamples", type=int, help="bootstrap resamples over documents per interval (default 200)")
    ap.add_argument("--static", choices=["png", "svg", "pdf", "none"], help="also write each figure as an image (needs Chromium)")
    ap.add_argument("--wandb", action="store_true", default=None, help="log to Weights & Biases (offline without an API key)")
    ap.add_argument("--wandb-project")
    ap.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    ap.add_argument("--micro", action="store_true", default=None, help="tiny sizes everywhere (smoke test)")
    return ap


LIST_OPTIONS = ("checkpoints", "datasets", "pruning_fractions")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
REMOTES = ("ndif", "local")
DTYPES = (None, "auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")


def parse_options(argv: list[str] | None = None) -> RunOptions:
    """Defaults < YAML (``--config``) < flags."""
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config")
    merged: dict[str, Any] = load_yaml(config) if config else {}
    merged.update({k: v for k, v in args.items() if v is not None})
    return make_options(**merged)


def make_options(**kwargs: Any) -> RunOptions:
    """RunOptions from keyword values, with lists given as lists or comma-separated strings."""
    known = {f.name for f in fields(RunOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise OptionsError(f"unknown options {unknown}")
    for name in LIST_OPTIONS:
        if name in kwargs:
            kwargs[name] = _split_list(kwargs[name])
    opts = RunOptions(**kwargs)
    try:
        opts.pruning_fractions = [float(f) for f in opts.pruning_fractions]
    except ValueError:
        raise OptionsError(f"pruning-fractions must be numbers, not {opts.pruning_fractions!r}") from None
    if not opts.pruning_fractions or not all(0 < f < 1 for f in opts.pruning_fractions):
        raise OptionsError(f"pruning-fractions must be shares between 0 and 1, not {opts.pruning_fractions!r}")
    if opts.micro:
        opts.num_samples = min(opts.num_samples, 12)
        opts.max_tokens = min(opts.max_tokens, 1_500)
        opts.max_length = min(opts.max_length, 64)
        opts.ablation_tokens = min(opts.ablation_tokens, 300)
        opts.pruning_tokens = min(opts.pruning_tokens, 300)
        opts.max_checkpoints = min(opts.max_checkpoints, 3)
        opts.batch_size = min(opts.batch_size, 4)
        opts.shard_tokens = min(opts.shard_tokens, 128)  # several shards per cache, as at full size
    if opts.static not in ("png", "svg", "pdf", "none"):
        raise OptionsError(f"static must be png, svg, pdf or none, not {opts.static!r}")
    if opts.storage not in ("full", "compact"):
        raise OptionsError(f"storage must be 'full' or 'compact', not {opts.storage!r}")
    if not isinstance(opts.keep_checkpoints, bool):
        raise OptionsError(f"keep_checkpoints must be true or false, not {opts.keep_checkpoints!r}")
    if opts.resamples < 0:
        raise OptionsError(f"resamples must be 0 or more, not {opts.resamples}")
    for name in ("batch_size", "max_checkpoints", "max_tokens", "num_samples", "max_length", "ablation_tokens", "pruning_tokens"):
        value = getattr(opts, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OptionsError(f"{name.replace('_', '-')} must be a whole number of at least 1, not {value!r}")
    if opts.dtype not in DTYPES:
        raise OptionsError(f"dtype must be one of {', '.join(str(d) for d in DTYPES if d)}, not {opts.dtype!r}")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", str(opts.device)):
        raise OptionsError(f"device must be cpu, cuda, cuda:N or mps, not {opts.device!r}")
    if opts.shard_tokens < 1:
        raise OptionsError(f"shard_tokens must be at least 1, not {opts.shard_tokens}")
    if not opts.datasets:
        raise OptionsError("no datasets given")
    if opts.device_map is not None and opts.device_map not in DEVICE_MAPS:
        raise OptionsError(f"device_map must be one of {', '.join(DEVICE_MAPS)}, not {opts.device_map!r}")
    if opts.max_memory is not None:
        if opts.device_map is None:
            raise OptionsError("--max-memory applies with --device-map only")
        from core.model_access.loading import parse_max_memory

        try:
            parse_max_memory(opts.max_memory)
        except ValueError as e:
            raise OptionsError(str(e)) from None
    if opts.remote is not None and opts.remote not in REMOTES:
        raise OptionsError(f"remote must be ndif or local, not {opts.remote!r}")
    if opts.remote == "ndif" and (opts.model is None or str(opts.model).startswith("random:") or Path(opts.model).exists()):
        raise OptionsError("--remote ndif runs a model NDIF hosts: pass its Hub name with --model (not a local folder)")
    if opts.remote == "ndif" and opts.device_map:
        raise OptionsError("--device-map places a local model; with --remote ndif the model runs on NDIF")
    if opts.layers is not None and not str(opts.model or "").startswith("random:"):
        raise OptionsError(f"--layers {opts.layers} applies to random:NAME models only (a real model keeps all its layers)")
    return opts


def preflight(opts: RunOptions) -> None:
    """What can be checked before any work starts: dataset names, the device, and that every output folder can be written."""
    if opts.device != "cpu":
        import torch

        kind, _, index = opts.device.partition(":")
        if kind == "cuda" and (not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()):
            raise OptionsError(f"--device {opts.device}: torch sees {torch.cuda.device_count()} CUDA device(s) here; use --device cpu")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise OptionsError("--device mps: no Apple GPU here; use --device cpu")
    if opts.remote == "ndif" and not os.environ.get("NDIF_API_KEY"):
        raise OptionsError("--remote ndif needs your NDIF API key in the environment variable NDIF_API_KEY "
                           "(from https://login.ndif.us; never put it in a file of the repository)")
    from data.registry import default_registry

    known = default_registry()
    unknown = [n for n in opts.datasets if n not in known]
    if unknown:
        raise OptionsError(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(known)}")
    folders = [opts.results_dir, opts.cache_dir or str(Path(opts.results_dir) / "cache")]
    if opts.model is None or str(opts.model).startswith("random:"):
        folders.append(opts.models_dir)
    for folder in folders:
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OptionsError(f"cannot write to {path} ({e.strerror or e}); choose another folder") from None

