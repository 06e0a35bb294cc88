"""Log a run's metrics, tables, figures and report to Weights & Biases.

Runs go online when ``WANDB_API_KEY`` is set and offline otherwise, so an experiment never
fails or hangs for lack of an account; offline runs say where they were written and how to
upload them later with ``wandb sync``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import plotly.graph_objects as go

MODES = ("online", "offline", "disabled")


def resolve_mode(mode: str | None = None) -> str:
    """``mode`` if given, else ``WANDB_MODE``, else online with an API key and offline without."""
    chosen = mode or os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline"
    )
    if chosen == "dryrun":
        chosen = "offline"
    if chosen not in MODES:
        raise ValueError(f"W&B mode {chosen!r} is not one of {', '.join(MODES)}")
    return chosen


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "", strict: bool = True) -> dict[str, float]:
    """Nested ``{"entropy": {"L3": 1.2}}`` becomes ``{"entropy/L3": 1.2}``; lists of numbers ``name/0, name/1, ...``.

    ``strict``: a value that is not a number is an error; otherwise it is left out.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/", strict=strict))
            continue
        if isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
            flat.update(flatten_metrics({str(i): v for i, v in enumerate(value)}, prefix=f"{name}/", strict=strict))
            continue
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if not _is_number(value):
            if strict:
                raise TypeError(f"metric {name!r}: expected a number, got {type(value).__name__}")
            continue
        flat[name] = float(value) if isinstance(value, float) else value
    return flat


def _is_number(value: Any) -> bool:
    if isinstance(value, np.generic):
        value = value.item()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class WandbLogger:
    """One W&B run: ``log_metrics``, ``log_table``, ``log_figure``, ``log_file``, ``finish``.

    Use as a context manager so the run is finished (and marked failed on an exception).
    """

    def __init__(
        self,
        project: str,
        run_dir: str | Path,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        tags: Sequence[str] = (),
        group: str | None = None,
    ) -> None:
        import wandb  # imported here: it is slow to import and only needed when logging

        if not project or not isinstance(project, str):
            raise ValueError("W&B project name must be a non-empty string")
        self.mode = resolve_mode(mode)
        self._wandb = wandb
        self._root = Path(run_dir)
        self._root.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            console="off", quiet=True, x_disable_stats=True, disable_git=True,
            save_code=False, disable_job_creation=True,
        )
        self.run = wandb.init(
            project=project, name=name, dir=str(self._root), mode=self.mode,
            config=dict(config or {}), tags=list(tags) or None, group=group, settings=settings,
        )
        self._finished = False

    # -------------------------------------------------------------------- paths
    @property
    def run_path(self) -> Path:
        """The run's own directory (``.../wandb/offline-run-*`` offline), holding ``files/``."""
        return Path(self.run.dir).parent

    # ------------------------------------------------------------------ logging
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log scalar metrics (nested mappings become ``a/b`` keys)."""
        self.run.log(flatten_metrics(metrics), step=step)

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Set run-level summary values (final numbers shown in the runs table)."""
        for key, value in flatten_metrics(values).items():
            self.run.summary[key] = value

    def log_table(self, key: str, df: pd.DataFrame, step: int | None = None) -> None:
        """Log a DataFrame as a W&B table (cells that are not numbers are sent as text)."""
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"table {key!r}: expected a pandas DataFrame, got {type(df).__name__}")
        clean = df.reset_index() if not isinstance(df.index, pd.RangeIndex) else df
        clean = clean.rename(columns=str)
        for col in clean.columns:
            if clean[col].dtype == object:
                clean[col] = clean[col].map(lambda v: v if isinstance(v, (int, float)) else str(v))
        self.run.log({key: self._wandb.Table(dataframe=clean)}, step=step)

    def log_figure(self, key: str, fig: go.Figure, step: int | None = None) -> None:
        """Log an interactive Plotly figure."""
        if not isinstance(fig, go.Figure):
            raise TypeError(f"figure {key!r}: expected a plotly Figure, got {type(fig).__name__}")
        self.run.log({key: self._wandb.Plotly(fig)}, step=step)

    def log_file(self, path: str | Path) -> None:
        """Store a file (e.g. ``report.html`` or a CSV) with the run, under its file name."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cannot log {path} to W&B: no such file")
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def log_artifact(self, name: str, kind: str, paths: Sequence[str | Path]) -> None:
        """Store files as one versioned artifact (e.g. the HTML report and metrics.json, ``kind="report"``)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        artifact = self._wandb.Artifact(safe, type=kind)
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"cannot log {path} to W&B: no such file")
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    # ------------------------------------------------------------------- finish
    def finish(self, exit_code: int = 0) -> Path:
        """End the run and return its directory; offline runs print how to upload them."""
        path = self.run_path
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=exit_code)
            if self._wandb.run is None:
                # Shut the W&B service down so the run log is fully on disk before we say
                # where it is (offline, finish() alone can return before the flush).
                self._wandb.teardown()
            if self.mode == "offline":
                print(
                    f"W&B run saved offline in {path} (upload later: wandb sync {path})",
                    file=sys.stderr,
                )
        return path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


_BLOCK = 32768  # W&B's .wandb file is a LevelDB-style log of 32 KiB blocks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _log_payloads(path: Path) -> list[bytes]:
    """Reassemble the records of a ``.wandb`` log (records may span block boundaries)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run log (bad header)")
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            out.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            out.append(pending + payload)
            pending = b""
    return out


def read_offline_run(run_path: str | Path) -> dict[str, Any]:
    """What an offline run recorded: ``project``, ``group``, ``config``, ``history`` (one dict per
    ``log`` call, with its ``_step``), ``summary`` and ``artifacts`` (name, type, files), decoded
    from its ``run-*.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_path = Path(run_path)
    logs = sorted(run_path.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"{run_path}: no run-*.wandb file (is this a W&B run directory?)")
    out: dict[str, Any] = {"project": None, "group": None, "config": {}, "history": [], "summary": {}, "artifacts": []}

    def key_of(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    for payload in _log_payloads(logs[0]):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["project"], out["group"] = rec.run.project, rec.run.run_group or None
            for item in rec.run.config.update:
                out["config"][key_of(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][key_of(item)] = json.loads(item.value_json)
        elif kind == "history":
            row = {key_of(i): json.loads(i.value_json) for i in rec.history.item}
            row.setdefault("_step", rec.history.step.num)
            out["history"].append(row)
        elif kind == "artifact":
            files = [e.path for e in rec.artifact.manifest.contents]
            out["artifacts"].append({"name": rec.artifact.name, "type": rec.artifact.type, "files": files})
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][key_of(item)] = json.loads(item.value_json)
    return out
