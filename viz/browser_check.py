"""Open a report in headless Chromium and say whether it really works offline.

Talks the DevTools protocol over ``--remote-debugging-pipe`` (standard library only, no
driver to match versions with) and reports console errors, uncaught exceptions, dialogs
(an ``alert`` would mean injected script ran), requests that left the disk, and how many
Plotly figures drew. Run ``python -m viz.browser_check report.html`` to check a page by hand.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:", "chrome:", "devtools:")

# Counts figure containers and those Plotly finished drawing (an SVG and a traced layout).
_COUNT_JS = """(() => {
  const divs = Array.from(document.querySelectorAll('.plotly-graph-div'));
  const drawn = divs.filter(d => d.querySelector('svg.main-svg') && d._fullLayout
      && Array.isArray(d._fullData) && d._fullData.length === (d.data || []).length);
  return JSON.stringify({total: divs.length, drawn: drawn.length,
                         undrawn: divs.filter(d => !drawn.includes(d)).map(d => d.id)});
})()"""


# What each drawn figure shows, for layout checks: boxes of the figure, its title and axis
# titles (page pixels), and the tick texts of its y axis and colour bars. Pass it in
# ``check_page(..., evaluate=[FIGURE_GEOMETRY_JS])``; it returns JSON keyed by figure id.
FIGURE_GEOMETRY_JS = """(() => {
  const box = el => { if (!el) return null; const r = el.getBoundingClientRect();
                      return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; };
  const texts = (gd, sel) => Array.from(gd.querySelectorAll(sel)).map(t => t.textContent);
  const out = {};
  for (const gd of document.querySelectorAll('.plotly-graph-div')) {
    out[gd.id] = {figure: box(gd.querySelector('svg.main-svg')), title: box(gd.querySelector('.gtitle')),
                  xtitle: box(gd.querySelector('.g-xtitle text')), ytitle: box(gd.querySelector('.g-ytitle text')),
                  yticks: texts(gd, '.ytick text'), xticks: texts(gd, '.xtick text'),
                  colorbar_ticks: texts(gd, '.colorbar .cbaxis text, .colorbar .ytick text')};
  }
  return JSON.stringify(out);
})()"""

class BrowserUnavailable(RuntimeError):
    """No Chromium/Chrome executable was found on this machine."""


@dataclass
class PageCheck:
    """What happened when the page loaded."""

    figures_total: int = 0
    figures_drawn: int = 0
    undrawn: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and not self.external_requests
            and not self.dialogs
            and self.figures_drawn == self.figures_total
        )


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary (``CHROMIUM`` env var first), or None."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _Pipe:
    """Minimal DevTools client: NUL-separated JSON messages over two pipes."""

    def __init__(self, binary: str, profile: str) -> None:
        to_child_r, self._to_child_w = os.pipe()
        self._from_child_r, from_child_w = os.pipe()

        def _wire_fds() -> None:  # runs in the child before exec: Chromium expects fds 3/4
            # Copy above 3/4 first: a pipe end may already sit on 3 or 4, and dup2 onto
            # itself would keep it close-on-exec.
            high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-quic", "--no-first-run", "--no-default-browser-check",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--mute-audio", "--allow-file-access-from-files",
            f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank",
        ]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=_wire_fds,  # noqa: PLW1509 - no threads started yet
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None  # page session whose dialogs get dismissed
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child_r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._inbox.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                self._inbox.put(json.loads(raw))

    def _pump(self, deadline: float) -> dict[str, Any]:
        try:
            msg = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("Chromium did not answer in time") from None
        if msg is None:
            raise RuntimeError("Chromium closed the DevTools pipe (did it crash?)")
        return msg

    def _send(self, method: str, params: dict | None, session: str | None) -> int:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child_w, json.dumps(msg).encode() + b"\0")
        return self._next_id

    def _record(self, event: dict[str, Any]) -> None:
        """Keep an event; dismiss dialogs at once (an open alert blocks the page)."""
        self.events.append(event)
        if event.get("method") == "Page.javascriptDialogOpening" and self.session:
            self._send("Page.handleJavaScriptDialog", {"accept": True}, self.session)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        want = self._send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            reply = self._pump(deadline)
            if reply.get("id") == want:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._record(reply)

    def wait_event(self, method: str, timeout: float, session: str | None = None, since: int = 0) -> None:
        """Until ``method`` arrives (for ``session``, if given), counting the events kept from index ``since``."""
        deadline = time.monotonic() + timeout
        ours = lambda e: e.get("method") == method and (session is None or e.get("sessionId") == session)  # noqa: E731
        if any(ours(e) for e in self.events[since:]):
            return
        while True:
            msg = self._pump(deadline)
            if "method" not in msg:
                continue
            self._record(msg)
            if ours(msg):
                return

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass  # the browser is gone already; it is killed below if not
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child_w, self._from_child_r):
            try:
                os.close(fd)
            except OSError:
                pass


def _describe(event: dict[str, Any]) -> str | None:
    """One line for an event that counts as a page error, else None."""
    method, p = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        return f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}"
    if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
        return f"console.{p['type']}: {args}"
    if method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
        e = p["entry"]
        return f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".strip()
    return None


class Browser:
    """One headless Chromium that checks several pages, each in a browser context of its own.

    A context shares no cookies, storage or cache with another, so each page loads as in a fresh
    browser; Chromium's start (about a second) is paid once. Use it as a context manager.
    """

    def __init__(self) -> None:
        self._binary = find_chromium()
        if self._binary is None:
            raise BrowserUnavailable("no chromium found; install it with: apt-get install -y chromium")
        self._profile = tempfile.TemporaryDirectory(prefix="viz-chromium-")
        self._pipe = _Pipe(self._binary, self._profile.name)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pipe.close()
        self._profile.cleanup()

    def check(self, path: str | Path, expected_figures: int | None = None, timeout: float = 60.0,
              evaluate: list[str] | None = None) -> tuple[PageCheck, list[Any]]:
        """:func:`check_page` in this browser (started again if it has died since the last page)."""
        if self._pipe.proc.poll() is not None:
            self._pipe.close()
            self._pipe = _Pipe(self._binary, self._profile.name)
        pipe, since = self._pipe, len(self._pipe.events)
        context = pipe.call("Target.createBrowserContext")["browserContextId"]
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank", "browserContextId": context})["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            counts, values = _load(pipe, session, since, Path(path).resolve().as_uri(), expected_figures, timeout,
                                   evaluate or [])
        finally:
            try:
                pipe.call("Target.disposeBrowserContext", {"browserContextId": context}, timeout=10)
            except (TimeoutError, RuntimeError, OSError):
                pass  # the browser died: the next page starts another
        events = [e for e in pipe.events[since:] if e.get("sessionId") == session]
        del pipe.events[since:]
        return _page_check(counts, events), values


def _load(pipe: _Pipe, session: str, since: int, url: str, expected_figures: int | None, timeout: float,
          evaluate: list[str]) -> tuple[dict[str, Any], list[Any]]:
    """Open ``url`` in the page of ``session``, wait for its figures to draw, then run ``evaluate``."""
    pipe.session = session
    for domain in ("Runtime", "Log", "Page", "Network"):
        pipe.call(f"{domain}.enable", session=session)
    pipe.call("Page.navigate", {"url": url}, session=session)
    pipe.wait_event("Page.loadEventFired", timeout, session=session, since=since)
    deadline = time.monotonic() + timeout
    while True:
        res = pipe.call("Runtime.evaluate", {"expression": _COUNT_JS, "returnByValue": True}, session=session)
        counts = json.loads(res["result"]["value"])
        target_n = counts["total"] if expected_figures is None else expected_figures
        if counts["drawn"] >= target_n or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    values = []
    for expr in evaluate:
        res = pipe.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True},
                        session=session)
        values.append(res.get("result", {}).get("value"))
    pipe.call("Runtime.evaluate", {"expression": "0"}, session=session)  # flush events
    return counts, values


def _page_check(counts: dict[str, Any], events: list[dict[str, Any]]) -> PageCheck:
    """What the page's events and figure counts say."""
    check = PageCheck(figures_total=counts["total"], figures_drawn=counts["drawn"], undrawn=counts["undrawn"])
    for event in events:
        line = _describe(event)
        if line:
            check.errors.append(line)
        if event.get("method") == "Network.requestWillBeSent":
            req_url = event["params"]["request"]["url"]
            if not req_url.startswith(_LOCAL_SCHEMES):
                check.external_requests.append(req_url)
        if event.get("method") == "Page.javascriptDialogOpening":
            check.dialogs.append(event["params"].get("message", ""))
    return check


def check_page(
    path: str | Path,
    expected_figures: int | None = None,
    timeout: float = 60.0,
    evaluate: list[str] | None = None,
    browser: Browser | None = None,
) -> tuple[PageCheck, list[Any]]:
    """Load ``path`` headless, wait for the figures to draw, and collect what went wrong.

    ``evaluate`` holds extra JavaScript expressions run after drawing; their values come back
    as the second element (the tests use it to hover over points). ``browser``: a running
    :class:`Browser` to check the page in (else one is started for this page and closed).
    """
    if browser is not None:
        return browser.check(path, expected_figures, timeout, evaluate)
    with Browser() as own:
        return own.check(path, expected_figures, timeout, evaluate)


def main(argv: list[str] | None = None) -> int:
    """Command line: exit 0 when the page loads cleanly and every figure draws."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="HTML file to open")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        parser.error(f"{args.page}: no such file")
    try:
        check, _ = check_page(args.page, timeout=args.timeout)
    except BrowserUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"figures drawn: {check.figures_drawn}/{check.figures_total}")
    for label, items in (("error", check.errors), ("external request", check.external_requests),
                         ("dialog", check.dialogs), ("not drawn", check.undrawn)):
        for item in items:
            print(f"{label}: {item}")
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
