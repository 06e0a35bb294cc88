"""Seconds and peak memory of each stage of a run: the stage table in summary.md and the README.

Peak host memory is the process's resident high-water mark over the stage alone: Linux lets a
process reset it (``/proc/self/clear_refs``), and ``VmHWM`` then reads the stage's own peak.
Elsewhere it is not measured. Peak GPU memory is torch's allocator peak over the stage.

Each stage ends by handing what it freed back to the system (glibc's ``malloc_trim``), so the
next stage's peak starts from what is still held, not from the heap the last stage left behind.
(No garbage collection: arrays are freed when their last reference goes, and a full collection
in a process holding many objects, as a test session does, costs a tenth of a second or more.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Stage:
    """One row of the table; ``part_of`` names the stage a sub-step's seconds belong to (no memory of its own)."""

    name: str
    seconds: float
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    part_of: str | None = None


def _reset_host_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak resident set size (VmHWM) to the current one
        return True
    except OSError:
        return False


def _host_peak_mb() -> float | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
    except OSError:
        return None
    return round(int(m.group(1)) / 1024, 1) if m else None


def _cuda(device: str) -> Any:
    if not str(device).startswith("cuda"):
        return None
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def _release_freed() -> None:
    """What the stage freed, back to the system: glibc's freed heap trimmed."""
    from core.model_access.loading import release_freed_memory

    release_freed_memory()


class StageClock:
    """``with clock.stage("collection"): ...`` records a :class:`Stage`; ``rows`` keeps them in order."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.rows: list[Stage] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cuda = _cuda(self.device)
        host = _reset_host_peak()
        if cuda is not None:
            cuda.synchronize(self.device)
            cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda is not None:
                cuda.synchronize(self.device)
            gpu = round(cuda.max_memory_allocated(self.device) / 2**20, 1) if cuda is not None else None
            self.rows.append(Stage(name, round(time.perf_counter() - t0, 3), _host_peak_mb() if host else None, gpu))
            _release_freed()

    def add_parts(self, stage: str, seconds: dict[str, float]) -> None:
        """Sub-steps timed inside ``stage`` (the analyses of the one pass), listed under it."""
        self.rows.extend(Stage(name, round(float(s), 3), part_of=stage) for name, s in seconds.items())

    def note_last(self, note: str) -> None:
        """Say how the last stage ran, in its name (``ablation (reused)``: its stored result was taken, not computed)."""
        self.rows[-1].name = f"{self.rows[-1].name} ({note})"

    def to_list(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def markdown(self) -> str:
        """The table: stage, seconds, peak host memory (and GPU memory when a GPU ran)."""
        gpu = any(r.peak_gpu_mb is not None for r in self.rows)
        head = "| Stage | Seconds | Peak memory (MB) |" + (" Peak GPU memory (MB) |" if gpu else "")
        rule = "| --- | ---: | ---: |" + (" ---: |" if gpu else "")
        lines = [head, rule]
        for r in self.rows:
            name = f"&nbsp;&nbsp;{r.name}" if r.part_of else r.name
            mem = "" if r.part_of else ("n/a" if r.peak_rss_mb is None else f"{r.peak_rss_mb:,.0f}")
            cells = [name, f"{r.seconds:,.1f}", mem] + ([("" if r.part_of else f"{r.peak_gpu_mb or 0:,.0f}")] if gpu else [])
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
