"""PNG/SVG/PDF copies of figures for papers, when this machine can render them.

Rendering needs the ``kaleido`` package (a project dependency) and a Chrome or Chromium
binary (Debian: ``apt-get install -y chromium``; or set ``BROWSER_PATH``). Where either is
missing the functions return no files and one line saying why, instead of failing a run.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from core.safe_io import atomic_files_for

log = logging.getLogger(__name__)
FORMATS = ("png", "svg", "pdf")


def _import_kaleido() -> None:
    """Import kaleido with a bare ``sys.argv``: its logging dependency (logistro) parses the
    command line at import time and would reject or swallow the caller's own options."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        import kaleido  # noqa: F401
    finally:
        sys.argv = saved


def static_export_unavailable() -> str | None:
    """Why static export cannot run here, or None when it can."""
    try:
        _import_kaleido()
    except ImportError:
        return "static export needs the 'kaleido' package (uv add kaleido)"
    from viz.browser_check import find_chromium  # local: keeps `python -m viz.browser_check` clean

    if not os.environ.get("BROWSER_PATH") and find_chromium() is None:
        return "static export needs Chrome or Chromium (apt-get install -y chromium, or set BROWSER_PATH)"
    return None


def _prepare() -> str | None:
    reason = static_export_unavailable()
    if reason is None and not os.environ.get("BROWSER_PATH"):
        from viz.browser_check import find_chromium

        os.environ["BROWSER_PATH"] = find_chromium() or ""
    return reason


def export_many(
    figures: Mapping[str, go.Figure],
    out_dir: str | Path,
    fmt: str = "png",
    scale: float = 2.0,
) -> tuple[dict[str, Path], str | None]:
    """Write ``out_dir/<name>.<fmt>`` for every figure in one browser session.

    Returns the written paths and None, or ``({}, reason)`` when nothing could be written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"static format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not figures:
        return {}, None
    reason = _prepare()
    if reason is not None:
        return {}, reason
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.{fmt}" for name in figures}
    # Rendered into temporary files made and cleared by core.safe_io, then renamed: a reader never sees a
    # half-written image, and no file found by a name is ever removed.
    try:
        with atomic_files_for(list(paths.values())) as tmps:
            pio.write_images(list(figures.values()), tmps, format=fmt, scale=scale)
    except Exception as exc:  # noqa: BLE001 - kaleido raises many kinds; all mean "no image"
        reason = f"static export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning(reason)
        return {}, reason
    return paths, None


def export_static(fig: go.Figure, path: str | Path, scale: float = 2.0) -> Path | None:
    """Write one figure to ``path`` (format from its suffix); None, with a logged reason, if not."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    written, reason = export_many({path.stem: fig}, path.parent, fmt=fmt, scale=scale)
    if reason is not None:
        log.warning("%s: %s", path, reason)
        return None
    return written[path.stem]
