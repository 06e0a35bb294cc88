"""Several finished runs side by side: read and check them, line up their per-layer numbers, test the differences.

A run is a folder ``exp/basic_routing_analysis.py`` wrote (``metrics.json`` with its arrays). Each
is checked before any work (a folder that is not a run, one run only, runs with other numbers
of MoE layers: one line each). Each run's per-layer numbers are read with their intervals where
the run has them. Each later run is compared with the first (the reference): where both runs'
routing caches of their final checkpoint are still on disk and hold the same documents (the same
token ids, document by document), the difference is tested paired over those documents
(:mod:`core.analysis.run_difference`); otherwise, where both runs have intervals, from the two
intervals, and the page says which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.run_difference import DocumentCounts, PairedDifference, document_counts, paired_difference, \
    shared_documents, summary_difference


class CompareError(ValueError):
    """Input that cannot be compared (not a run, one run, other layer counts); one line a person understands."""


@dataclass
class Run:
    """One run: its label, folder, metrics (arrays read) and, when found, its final checkpoint's routing per document."""

    name: str
    folder: Path
    metrics: dict[str, Any]
    documents: DocumentCounts | None = None
    no_documents: str = ""  # why its routing per document is not at hand

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.metrics["model"]["moe_layers"]]


Getter = Callable[[dict[str, Any]], "tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None"]


def _estimate(path: str) -> Getter:
    """(value, low, high) of the estimate at ``path`` in metrics.json (``/``-separated), None where the run has none."""
    def get(m: dict[str, Any]) -> Any:
        node: Any = m
        for part in path.split("/"):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        if node is None:
            return None
        if isinstance(node, dict) and "value" in node:
            return tuple(None if node.get(k) is None else np.asarray(node[k], np.float64) for k in ("value", "low", "high"))
        return np.asarray(node, np.float64), None, None
    return get


def _adjacent_r(m: dict[str, Any]) -> Any:
    """Mean |r| of expert selection between layer l and l + 1 (the correlation's super-diagonal), no interval."""
    c = m.get("correlation_topk")
    if not c or c.get("layer_mean_abs") is None:
        return None
    r = np.asarray(c["layer_mean_abs"], np.float64)
    return np.append(np.diagonal(r, 1), np.nan), None, None


@dataclass(frozen=True)
class Metric:
    """One per-layer number every run has: where it is, what it is called, and the paired statistic that tests it."""

    key: str
    label: str
    get: Getter
    paired: str | None = None  # core.analysis.run_difference statistic computed from the runs' shared documents


METRICS = (
    Metric("load_balance", "Load balance: utilization entropy / log E", _estimate("headline/estimates/load_balance"),
           "load_balance"),
    Metric("domain_specialization", "Domain specialization: KL of a domain's expert shares to all tokens' (nats)",
           _estimate("headline/estimates/domain_divergence"), "domain_specialization"),
    Metric("token_entropy", "Router entropy per token / log E", _estimate("routing_stats/token_entropy_norm")),
    Metric("same_top1", "Consecutive tokens with the same top-1 expert", _estimate("headline/estimates/consistency_same_top1")),
    Metric("vocabulary", "Vocabulary: a token id's share at its top expert", _estimate("headline/estimates/vocabulary")),
    Metric("adjacent_r", "Mean |r| of expert selection, layer l with l + 1", _adjacent_r),
)


@dataclass
class Comparison:
    """What the page shows: the runs, each metric's numbers per run, each difference against the reference."""

    runs: list[Run]
    values: dict[str, list[Any]]  # metric key -> per run (value, low, high) or None
    differences: dict[str, list[tuple[str, PairedDifference]]] = field(default_factory=dict)  # key -> [(run name, B - A)]
    shared: dict[str, str] = field(default_factory=dict)  # run name -> "" (shares the reference's documents) or why not


def check_runs(folders: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Run]:
    """Read every run, refusing in one line what cannot be compared; nothing is written."""
    from core.array_files import ArrayFileError, load_metrics

    if len(folders) < 2:
        raise CompareError(f"compare needs at least two run folders, got {len(folders)}: give several results/<run>/ folders")
    if names is not None and len(names) != len(folders):
        raise CompareError(f"--names gives {len(names)} names for {len(folders)} runs")
    seen: dict[Path, str] = {}
    runs = []
    for i, folder in enumerate(map(Path, folders)):
        if not (folder / "metrics.json").is_file():
            raise CompareError(f"{folder} is not a run folder: it has no metrics.json (exp/basic_routing_analysis.py "
                               "writes results/<run>/metrics.json)")
        if folder.resolve() in seen:
            raise CompareError(f"{folder} is given twice (as {seen[folder.resolve()]})")
        seen[folder.resolve()] = str(folder)
        try:
            metrics = load_metrics(folder)
        except ArrayFileError as e:
            raise CompareError(f"{folder}: {e}") from None
        runs.append(Run(names[i] if names else folder.name, folder, metrics))
    if len({r.name for r in runs}) < len(runs):
        raise CompareError(f"two runs have one name ({', '.join(r.name for r in runs)}); give --names")
    _check_layers(runs)
    return runs


def _check_layers(runs: list[Run]) -> None:
    counts = {r.name: len(r.layers) for r in runs}
    if len(set(counts.values())) > 1:
        raise CompareError("the runs have different numbers of MoE layers (" + ", ".join(f"{n}: {c}" for n, c in counts.items())
                           + "); per-layer figures need the same layers, so compare runs of one depth")


def _cache_root(run: Run, cache_dir: str | Path | None) -> Path:
    """Where the run's caches are: the given folder, the one the run was told, or ``cache/`` beside the run folder."""
    if cache_dir is not None:
        return Path(cache_dir)
    out = run.metrics.get("options", {}).get("output", {})
    told = Path(out["cache_dir"]) if out.get("cache_dir") else None
    if told is not None and (told.is_absolute() or told.is_dir()):
        return told
    results = Path(out.get("results_dir") or run.folder.parent)
    return results / "cache" if results.is_absolute() and results.is_dir() else run.folder.parent / "cache"


def load_documents(run: Run, cache_dir: str | Path | None = None) -> None:
    """The run's final-checkpoint routing counted per document, from its caches (``run.no_documents`` says why not)."""
    from core.collection.sweep import index_path, open_sweep
    from core.store.cache import CacheStream

    model = run.metrics["model"]
    key = f"{model['name']}@{model['weights_digest']}" if model.get("weights_digest") else model["name"]
    index = index_path(_cache_root(run, cache_dir), key)
    if not index.is_file():
        run.no_documents = f"no routing caches of {model['name']} at {index.parent} (pass --cache-dir)"
        return
    final = model.get("final_checkpoint") or (run.metrics.get("checkpoints") or [{}])[-1].get("name")
    try:
        caches = [open_sweep(index, ds, [final] if final else None)[-1][2] for ds in run.metrics["datasets"]]
        run.documents = document_counts(CacheStream(caches))
    except Exception as e:  # noqa: BLE001 - any unreadable or changed cache: the comparison goes on from summaries
        run.no_documents = f"its caches at {index.parent} could not be read ({str(e).splitlines()[0][:200]})"


def compare(runs: list[Run]) -> Comparison:
    """Every metric per run, and each later run's difference from the first: paired where they share documents."""
    values = {m.key: [m.get(r.metrics) for r in runs] for m in METRICS}
    out = Comparison(runs, values)
    ref = runs[0]
    for run in runs[1:]:
        if ref.documents is None or run.documents is None:
            gone = ref if ref.documents is None else run
            out.shared[run.name] = f"{gone.name}: {gone.no_documents}"
        else:
            out.shared[run.name] = shared_documents(ref.documents, run.documents) or ""
    for m in METRICS:
        out.differences[m.key] = []
        a = values[m.key][0]
        for run, b in zip(runs[1:], values[m.key][1:]):
            if m.paired and not out.shared[run.name]:
                out.differences[m.key].append((run.name, paired_difference(ref.documents, run.documents, m.paired)))
            elif a is not None and b is not None and a[1] is not None and b[1] is not None:
                out.differences[m.key].append((run.name, summary_difference(m.key, a, b)))
    return out


def finding_topic(text: str) -> str:
    """What a finding is about: its words before the first parenthesis or colon ("Load balance", "Ablation")."""
    return text.split(" (")[0].split(":")[0].strip()


def findings_table(runs: list[Run]) -> pd.DataFrame:
    """Each finding topic (a row) as each run (a column) states it; empty where a run has no such finding."""
    rows: dict[str, dict[str, str]] = {}
    for run in runs:
        for text in run.metrics.get("findings", []):
            rows.setdefault(finding_topic(text), {})[run.name] = text
    return pd.DataFrame.from_dict(rows, orient="index", columns=[r.name for r in runs]).fillna("")
