"""Compare several runs of the study side by side: one HTML page, the same figures, the findings in one table.

    uv run exp/compare_runs.py results/run-a results/run-b [results/run-c ...] --out results/compare-abc

Each RUN_DIR is a folder exp/basic_routing_analysis.py wrote (metrics.json, arrays.safetensors).
The first run is the reference; every other run's per-layer numbers are drawn with it and its
differences from it tested: paired over the documents both runs routed where their routing caches
are on disk and hold the same token ids (load balance, domain specialization), otherwise from
the two runs' own 95% intervals. The page says which, for every difference.

The page's folder is built beside --out and put in its place whole, with the toolkit's record of
its files (core.owned_files): an earlier comparison is replaced, a folder holding anything the
toolkit did not write is refused in one line before any work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (results/<run>/); the first is the reference")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/compare-<first run>-<n>-runs); report.html is written there")
    p.add_argument("--names", default=None, help="comma-separated labels of the runs (default: their folder names)")
    p.add_argument("--cache-dir", default=None,
                   help="where the runs' routing caches are (default: the folder each run used, or cache/ beside it)")
    p.add_argument("--title", default=None, help="page title")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from core.owned_files import OwnershipError, built_in_scratch, check_replaceable
    from core.pipeline.run_comparison import CompareError, check_runs, compare, load_documents

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    out = args.out or Path("results") / f"compare-{Path(args.runs[0]).name}-{len(args.runs)}-runs"
    hint = "choose another --out"
    try:
        runs = check_runs(args.runs, names)  # before any work: not a run, one run, other layer counts
        check_replaceable(out, hint)
        if any(out.resolve() == r.folder.resolve() for r in runs):
            raise CompareError(f"--out {out} is one of the runs; choose another --out")
    except (CompareError, OwnershipError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run in runs:
        load_documents(run, args.cache_dir)
    comp = compare(runs)
    from core.pipeline.comparison_page import write_page

    try:
        with built_in_scratch(out, hint) as work:
            write_page(comp, work, args.title or f"{len(runs)} runs side by side: " + ", ".join(r.name for r in runs))
    except OwnershipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, why in comp.shared.items():
        print(f"{name} vs {runs[0].name}: " + ("paired tests over shared documents" if not why else f"summaries only ({why})"))
    print(f"report: {out / 'report.html'}")
    return 0
