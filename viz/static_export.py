"""PNG/SVG/PDF copies of figures for papers, when this machine can render them.

Rendering needs the ``kaleido`` package (a project dependency) and a Chrome or Chromium
binary (Debian: ``apt-get install -y chromium``; or set ``BROWSER_PATH``). Where either is
missing the functions return no files and one line saying why, instead of failing a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from core.safe_io import atomic_files_for, atomic_write_json

MANIFEST = ".static-images.json"  # name -> what each image was drawn from, so a rerun redraws only what changed

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
    drawn_from = {name: _figure_digest(fig, fmt, scale) for name, fig in figures.items()}
    known = _read_manifest(out_dir)
    on_disk = {name: _file_digest(paths[name]) for name in figures if name in known}  # each file read once
    todo = [name for name in figures if not _still_good(known.get(name), drawn_from[name], on_disk.get(name))]
    # Rendered into temporary files made and cleared by core.safe_io, then renamed: a reader never sees a
    # half-written image, and no file found by a name is ever removed.
    try:
        if todo:
            with atomic_files_for([paths[n] for n in todo]) as tmps:
                _render([figures[n] for n in todo], tmps, format=fmt, scale=scale)
    except Exception as exc:  # noqa: BLE001 - kaleido raises many kinds; all mean "no image"
        reason = f"static export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning(reason)
        return {}, reason
    on_disk.update({n: _file_digest(paths[n]) for n in todo})
    entries = {**known, **{n: {"figure": drawn_from[n], "file": on_disk[n]} for n in figures}}
    atomic_write_json(out_dir / MANIFEST, {"format": 1, "images": entries})
    return paths, None


def _render(figures: list[go.Figure], files: list[Path], format: str, scale: float) -> None:  # noqa: A002 - plotly's word
    """``plotly.io.write_images`` in one page of one browser session.

    Kaleido reloads its page (plotly.js) after every figure: 29 figures took 9.6 s, 4.4 s without the
    reloads (a run's PNGs took 12-18 s). Its tab is put back without the reload here; the images are byte
    for byte those of ``write_images`` (tests/test_viz_static.py). A kaleido without that step gets
    ``write_images``.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import kaleido

    if not hasattr(kaleido.Kaleido, "_return_kaleido_tab"):
        pio.write_images(figures, files, format=format, scale=scale)
        return

    class OnePage(kaleido.Kaleido):
        async def _return_kaleido_tab(self, tab: Any) -> None:
            await self.tabs_ready.put(tab)

    d = pio.defaults
    specs = [{"fig": fig.to_dict(), "path": Path(file), "topojson": d.topojson,
              "opts": {"format": format, "width": d.default_width, "height": d.default_height, "scale": scale}}
             for fig, file in zip(figures, files)]
    kopts = {k: getattr(d, k) for k in ("plotlyjs", "mathjax", "headers") if getattr(d, k, None)}

    async def write() -> None:
        async with OnePage(**kopts) as k:
            await k.write_fig_from_object(specs, cancel_on_error=True)

    with ThreadPoolExecutor(1) as pool:  # its own event loop: the caller may be inside one (a notebook)
        pool.submit(asyncio.run, write()).result()


def _figure_digest(fig: go.Figure, fmt: str, scale: float) -> str:
    """What an image is drawn from: the figure's full JSON, the format and the scale."""
    return hashlib.sha256(f"{fmt}|{scale}|{fig.to_json()}".encode()).hexdigest()


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _read_manifest(out_dir: Path) -> dict[str, dict]:
    """The images a previous export drew (an unreadable or foreign manifest: none, so all are drawn again)."""
    try:
        raw = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    images = raw.get("images") if isinstance(raw, dict) and raw.get("format") == 1 else None
    return {k: v for k, v in images.items() if isinstance(v, dict)} if isinstance(images, dict) else {}


def _still_good(entry: dict | None, figure: str, file: str | None) -> bool:
    """An image is reused only when drawn from the same figure and its file (``file``: its digest now) is what was written."""
    return entry is not None and entry.get("figure") == figure and file is not None and entry.get("file") == file


def export_static(fig: go.Figure, path: str | Path, scale: float = 2.0) -> Path | None:
    """Write one figure to ``path`` (format from its suffix); None, with a logged reason, if not."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    written, reason = export_many({path.stem: fig}, path.parent, fmt=fmt, scale=scale)
    if reason is not None:
        log.warning("%s: %s", path, reason)
        return None
    return written[path.stem]
