"""Read MoE training logs (seed 000's JSONL format) and spot collapse and under-use.

One JSON object per line: ``epoch``, ``routing_acc``, ``entropy``, ``utilization`` (share of
routing per expert) and ``metrics`` (e.g. accuracy, loss). The toolkit's own trainer adds
``step``, ``tokens``, ``layer_entropy``, ``layer_utilization`` and ``routing_monitor`` (the live
routing monitor's record, drawn as flagged experts per layer and its alarms); any other keys are
ignored. A bad line fails with ``TrainingLogError("<path>:<line>: <problem>")``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REQUIRED_FIELDS = ("epoch", "routing_acc", "entropy", "utilization", "metrics")
COLLAPSE_SHARE = 0.9  # one expert taking at least 90% of the routing is collapse
UNDERUSE_OF_UNIFORM = 0.1  # an expert below 10% of the uniform share 1/E is under-used


class TrainingLogError(ValueError):
    """A training log or affinity matrix that cannot be read; the message names the line."""


@dataclass
class TrainingLog:
    """The records of one training log as arrays (one row per line of the log)."""

    path: Path
    epochs: np.ndarray  # [T]
    routing_acc: np.ndarray  # [T], NaN where not measured
    entropy: np.ndarray  # [T]
    utilization: np.ndarray  # [T, E]
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [T]
    steps: np.ndarray | None = None  # [T]
    tokens: np.ndarray | None = None  # [T]
    layers: list[int] | None = None
    layer_entropy: np.ndarray | None = None  # [T, L]
    layer_utilization: np.ndarray | None = None  # [T, L, E]
    routing_acc_chance: np.ndarray | None = None  # [T], the toolkit trainer's chance level
    monitor: list[dict | None] | None = None  # [T] the routing monitor's record (core.analysis.routing_monitor)

    @property
    def num_experts(self) -> int:
        return int(self.utilization.shape[1])

    @property
    def x(self) -> np.ndarray:
        """Training time for plots: steps when the log has them, else epochs."""
        return self.steps if self.steps is not None else self.epochs

    @property
    def x_label(self) -> str:
        return "training step" if self.steps is not None else "epoch"

    def to_frame(self) -> pd.DataFrame:
        """One row per record with flat columns (the CSV behind the figures)."""
        cols: dict[str, Any] = {"epoch": self.epochs}
        if self.steps is not None:
            cols["step"] = self.steps
        if self.tokens is not None:
            cols["tokens"] = self.tokens
        cols["routing_acc"] = self.routing_acc
        if self.routing_acc_chance is not None:
            cols["routing_acc_chance"] = self.routing_acc_chance
        cols["entropy"] = self.entropy
        for e in range(self.num_experts):
            cols[f"util_expert_{e}"] = self.utilization[:, e]
        for name, values in self.metrics.items():
            cols[f"metric_{name}"] = values
        if self.layer_entropy is not None and self.layers is not None:
            for j, layer in enumerate(self.layers):
                cols[f"entropy_layer_{layer}"] = self.layer_entropy[:, j]
        return pd.DataFrame(cols)


# ---------------------------------------------------------------------------- parsing
def _number(value: Any, what: str, where: str, allow_null: bool = True) -> float:
    if value is None and allow_null:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainingLogError(f"{where}: {what} must be a number, got {json.dumps(value)[:40]}")
    if not math.isfinite(value):
        raise TrainingLogError(f"{where}: {what} is {value} (write null for a value that was not measured)")
    return float(value)


def _vector(value: Any, what: str, where: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise TrainingLogError(f"{where}: {what} must be a non-empty list of numbers")
    out = [_number(v, f"{what}[{i}]", where, allow_null=False) for i, v in enumerate(value)]
    if any(v < 0 or not math.isfinite(v) for v in out):
        raise TrainingLogError(f"{where}: {what} has a negative or non-finite value")
    return out


def _per_layer(value: Any, what: str, where: str) -> tuple[list[int], list[Any]]:
    """Per-layer values as a list (layers 0..L-1) or an object keyed by layer index."""
    if isinstance(value, dict) and value:
        try:
            items = sorted((int(k), v) for k, v in value.items())
        except ValueError:
            raise TrainingLogError(f"{where}: {what} keys must be layer indices") from None
        return [k for k, _ in items], [v for _, v in items]
    if isinstance(value, list) and value:
        return list(range(len(value))), value
    raise TrainingLogError(f"{where}: {what} must be a non-empty list or an object keyed by layer")


def _parse_record(rec: dict[str, Any], where: str) -> dict[str, Any]:
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        raise TrainingLogError(f"{where}: missing field(s) {', '.join(repr(m) for m in missing)}")
    epoch = _number(rec["epoch"], "epoch", where, allow_null=False)
    if not epoch.is_integer() or epoch < 0:
        raise TrainingLogError(f"{where}: epoch must be a non-negative integer, got {rec['epoch']}")
    acc = _number(rec["routing_acc"], "routing_acc", where)
    if math.isfinite(acc) and not 0.0 <= acc <= 1.0:
        raise TrainingLogError(f"{where}: routing_acc {acc} is outside [0, 1]")
    ent = _number(rec["entropy"], "entropy", where)
    if math.isfinite(ent) and ent < 0:
        raise TrainingLogError(f"{where}: entropy {ent} is negative")
    if not isinstance(rec["metrics"], dict):
        raise TrainingLogError(f"{where}: metrics must be an object of name: number")
    out: dict[str, Any] = {
        "epoch": int(epoch),
        "routing_acc": acc,
        "entropy": ent,
        "utilization": _vector(rec["utilization"], "utilization", where),
        "metrics": {str(k): _number(v, f"metrics.{k}", where) for k, v in rec["metrics"].items()},
    }
    for key in ("step", "tokens"):
        if key in rec:
            out[key] = _number(rec[key], key, where, allow_null=False)
    if "routing_acc_chance" in rec:
        out["routing_acc_chance"] = _number(rec["routing_acc_chance"], "routing_acc_chance", where)
    if "layer_entropy" in rec:
        layers, vals = _per_layer(rec["layer_entropy"], "layer_entropy", where)
        out["layer_entropy"] = (layers, [_number(v, "layer_entropy value", where) for v in vals])
    if "layer_utilization" in rec:
        layers, vals = _per_layer(rec["layer_utilization"], "layer_utilization", where)
        vecs = [_vector(v, f"layer_utilization[{l}]", where) for l, v in zip(layers, vals)]
        out["layer_utilization"] = (layers, vecs)
    if "routing_monitor" in rec:
        mon = rec["routing_monitor"]
        if not isinstance(mon, dict) or not isinstance(mon.get("layers"), list):
            raise TrainingLogError(f"{where}: routing_monitor must be an object with a list of layers")
        out["monitor"] = mon
    if "layer_entropy" in out and "layer_utilization" in out:
        ent_layers, util_layers = out["layer_entropy"][0], out["layer_utilization"][0]
        if ent_layers != util_layers:
            raise TrainingLogError(
                f"{where}: layer_entropy covers layers {ent_layers} but layer_utilization "
                f"covers {util_layers}"
            )
    return out


def _check_against(first: dict, prev: dict, cur: dict, first_line: int, where: str) -> None:
    """Consistency of one record with the first and the previous one."""
    n0, n = len(first["utilization"]), len(cur["utilization"])
    if n != n0:
        raise TrainingLogError(f"{where}: utilization has {n} experts but line {first_line} has {n0}")
    for key in ("step", "tokens", "layer_entropy", "layer_utilization"):
        if (key in first) != (key in cur):
            has = "has" if key in cur else "lacks"
            raise TrainingLogError(f"{where}: {has} '{key}' unlike line {first_line}")
    for key in ("layer_entropy", "layer_utilization"):
        if key in cur and cur[key][0] != first[key][0]:
            raise TrainingLogError(
                f"{where}: {key} covers layers {cur[key][0]} but line {first_line} covers {first[key][0]}"
            )
    if "layer_utilization" in cur:
        for layer, vec in zip(*cur["layer_utilization"]):
            if len(vec) != n0:
                raise TrainingLogError(
                    f"{where}: layer_utilization[{layer}] has {len(vec)} experts, utilization has {n0}"
                )
    if cur["epoch"] < prev["epoch"]:
        raise TrainingLogError(f"{where}: epoch {cur['epoch']} comes after epoch {prev['epoch']} (out of order)")
    if "step" in cur:
        if cur["step"] <= prev["step"]:
            raise TrainingLogError(f"{where}: step {cur['step']:g} does not increase (previous {prev['step']:g})")
    elif cur["epoch"] == prev["epoch"]:
        raise TrainingLogError(f"{where}: epoch {cur['epoch']} repeats (no 'step' to tell the records apart)")
    if "tokens" in cur and cur["tokens"] < prev["tokens"]:
        raise TrainingLogError(f"{where}: tokens {cur['tokens']:g} decreases (previous {prev['tokens']:g})")


def read_training_log(path: str | Path) -> TrainingLog:
    """Parse a JSONL training log; raise ``TrainingLogError`` naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise TrainingLogError(f"{path}: no such file")
    records: list[dict[str, Any]] = []
    first_line = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise TrainingLogError(f"{path}: not a text file (byte {exc.start} is not UTF-8); expected a JSONL training log") from None
    if "\x00" in "".join(lines[:50]):
        raise TrainingLogError(f"{path}: not a text file (it holds NUL bytes); expected a JSONL training log")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingLogError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(raw, dict):
            raise TrainingLogError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        rec = _parse_record(raw, where)
        if records:
            _check_against(records[0], records[-1], rec, first_line, where)
        else:
            first_line = lineno
        records.append(rec)
    if not records:
        raise TrainingLogError(f"{path}: the log has no records")
    names = sorted({k for r in records for k in r["metrics"]})
    log = TrainingLog(
        path=path,
        epochs=np.array([r["epoch"] for r in records], dtype=float),
        routing_acc=np.array([r["routing_acc"] for r in records]),
        entropy=np.array([r["entropy"] for r in records]),
        utilization=np.array([r["utilization"] for r in records]),
        metrics={n: np.array([r["metrics"].get(n, math.nan) for r in records]) for n in names},
    )
    first = records[0]
    if "step" in first:
        log.steps = np.array([r["step"] for r in records])
    if "tokens" in first:
        log.tokens = np.array([r["tokens"] for r in records])
    if any("routing_acc_chance" in r for r in records):
        log.routing_acc_chance = np.array([r.get("routing_acc_chance", math.nan) for r in records])
    if any("monitor" in r for r in records):
        log.monitor = [r.get("monitor") for r in records]
    for key in ("layer_entropy", "layer_utilization"):
        if key in first:
            log.layers = list(first[key][0])
            setattr(log, key, np.array([r[key][1] for r in records], dtype=float))
    return log


def read_affinity_matrix(path: str | Path) -> tuple[np.ndarray, list[str] | None, list[str] | None]:
    """Read ``router_affinity_matrix.csv`` -> (matrix [N, E], row labels, expert labels).

    Accepts a bare numeric grid, a header row of expert names, and/or a first column of row
    labels (as pandas writes it).
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingLogError(f"{path}: no such file")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [(i, r) for i, r in enumerate(csv.reader(fh), start=1) if any(c.strip() for c in r)]
    if not rows:
        raise TrainingLogError(f"{path}: the affinity matrix is empty")

    def numeric(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    header: list[str] | None = None
    if not all(numeric(c) for c in rows[0][1]):
        header = rows[0][1]
        rows = rows[1:]
    label_col = bool(header and header[0].strip() == "") or any(
        not numeric(r[0]) for _, r in rows if r
    )
    labels: list[str] | None = [] if label_col else None
    matrix: list[list[float]] = []
    width = None
    for lineno, row in rows:
        cells = row[1:] if label_col else row
        if labels is not None:
            labels.append(row[0])
        values = []
        for col, cell in enumerate(cells, start=2 if label_col else 1):
            if not numeric(cell):
                raise TrainingLogError(f"{path}:{lineno}: column {col} is not a number ({cell[:20]!r})")
            values.append(float(cell))
        if width is None:
            width = len(values)
        elif len(values) != width:
            raise TrainingLogError(f"{path}:{lineno}: has {len(values)} values but earlier rows have {width}")
        matrix.append(values)
    if not matrix or not width:
        raise TrainingLogError(f"{path}: the affinity matrix has no numeric rows")
    experts = None
    if header is not None:
        experts = header[1:] if label_col else header
        if len(experts) != width:
            raise TrainingLogError(f"{path}:1: header names {len(experts)} columns but rows have {width}")
    return np.array(matrix), labels, experts


# --------------------------------------------------------------------------- warnings
def utilization_warnings(
    util: np.ndarray,
    x: np.ndarray,
    x_label: str = "epoch",
    where: str = "",
    collapse_share: float = COLLAPSE_SHARE,
    underuse_of_uniform: float = UNDERUSE_OF_UNIFORM,
) -> list[str]:
    """Collapse (one expert ≥ ``collapse_share`` of routing at any record) and under-use
    (experts below ``underuse_of_uniform`` × 1/E at the last record) for ``util [T, E]``."""
    totals = util.sum(axis=1, keepdims=True)
    share = np.divide(util, totals, out=np.zeros_like(util, dtype=float), where=totals > 0)
    num_experts = util.shape[1]
    out: list[str] = []
    collapsed = np.nonzero(share.max(axis=1) >= collapse_share)[0]
    if collapsed.size:
        t = int(collapsed[0])
        e = int(share[t].argmax())
        last = "and is still collapsed at the end" if collapsed[-1] == len(share) - 1 else \
            "but recovers by the end"
        out.append(
            f"collapse{where}: expert {e} takes {share[t, e]:.1%} of routing at {x_label} "
            f"{x[t]:g} {last} (threshold {collapse_share:.0%})"
        )
    limit = underuse_of_uniform / num_experts
    low = np.nonzero(share[-1] <= limit)[0]
    if low.size and num_experts > 1:
        names = ", ".join(str(int(e)) for e in low)
        out.append(
            f"under-use{where}: expert(s) {names} get at most {limit:.2%} of routing at the last "
            f"{x_label} {x[-1]:g} (threshold {underuse_of_uniform:.0%} of the uniform share "
            f"{1 / num_experts:.1%})"
        )
    return out


def monitor_flagged(log: TrainingLog) -> tuple[list[int], np.ndarray] | None:
    """The monitor's layers and its flagged experts (dead + dominant) per record ``[T, L]``, NaN where it had none."""
    if not log.monitor:
        return None
    layers = sorted({int(r["layer"]) for m in log.monitor if m for r in m["layers"]})
    if not layers:
        return None
    out = np.full((len(log.monitor), len(layers)), np.nan)
    for t, m in enumerate(log.monitor):
        for r in (m or {}).get("layers", []):
            out[t, layers.index(int(r["layer"]))] = len(r.get("dead", [])) + len(r.get("dominant", []))
    return layers, out


def monitor_warnings(log: TrainingLog) -> list[str]:
    """The routing monitor's alarms at the last record that has layers: one line per layer not healthy."""
    records = [(x, m) for x, m in zip(log.x, log.monitor or []) if m and m["layers"]]
    if not records:
        return []
    x, last = records[-1]
    return [f"routing monitor at {log.x_label} {x:g} (last {last.get('window_batches')} batches): layer {r['layer']} "
            f"{r['state']}" + (f", dead experts {r['dead']}" if r.get("dead") else "")
            + (f", dominant experts {r['dominant']}" if r.get("dominant") else "")
            for r in last["layers"] if r.get("state") != "healthy"]


def log_warnings(log: TrainingLog, collapse_share: float = COLLAPSE_SHARE,
                 underuse_of_uniform: float = UNDERUSE_OF_UNIFORM) -> list[str]:
    """All utilization warnings for a log: overall, then per layer when the log has layers."""
    out = utilization_warnings(log.utilization, log.x, log.x_label, "",
                               collapse_share, underuse_of_uniform)
    if log.layer_utilization is not None and log.layers is not None:
        for j, layer in enumerate(log.layers):
            out += utilization_warnings(log.layer_utilization[:, j, :], log.x, log.x_label,
                                        f" in layer {layer}", collapse_share, underuse_of_uniform)
    return out + monitor_warnings(log)
