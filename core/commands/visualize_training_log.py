"""Visualize an MoE training log (seed 000's JSONL format, or the toolkit's own trainer logs).

Writes an HTML report with the router affinity heatmap, expert utilization over training,
router entropy, routing accuracy and the training metrics, plus PNG/SVG copies where this
machine can render them, and warns about expert collapse and under-use.

The report folder is built beside ``--out`` and put in its place whole, with the toolkit's marker
listing its files (``core.owned_files``): an earlier report is replaced, a folder holding anything
the toolkit did not write is refused in one line before any work.

    uv run exp/visualize_training_log.py --log moe_outputs/training_log.txt --out results/tlog
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.owned_files import OwnershipError, built_in_scratch, check_replaceable
from viz.training_log import (
    COLLAPSE_SHARE,
    UNDERUSE_OF_UNIFORM,
    TrainingLogError,
    read_affinity_matrix,
    read_training_log,
)
from viz.training_log_report import write_training_log_report

AFFINITY_NAME = "router_affinity_matrix.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Plot an MoE training log and warn about expert collapse and under-use.",
        epilog=(
            f"Warnings: collapse when one expert takes >= {COLLAPSE_SHARE:.0%} of routing at "
            f"any record; under-use when an expert gets <= {UNDERUSE_OF_UNIFORM:.0%} of the "
            "uniform share 1/E at the last record. Exit status 2 on a bad log."
        ),
    )
    parser.add_argument("--log", type=Path, required=True,
                        help="training log, one JSON object per line")
    parser.add_argument("--affinity", type=Path, default=None,
                        help=f"router affinity CSV (default: {AFFINITY_NAME} beside the log, if present)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <log folder>/training_log_report)")
    parser.add_argument("--static", choices=("png", "svg", "pdf", "none"), default="png",
                        help="static image format written to <out>/figures (default: png)")
    parser.add_argument("--entropy-unit", choices=("nats", "bits"), default="nats",
                        help="unit of the logged entropy (default: nats)")
    parser.add_argument("--collapse-share", type=float, default=COLLAPSE_SHARE,
                        help=f"share of one expert counted as collapse (default {COLLAPSE_SHARE})")
    parser.add_argument("--underuse", type=float, default=UNDERUSE_OF_UNIFORM,
                        help=f"fraction of 1/E counted as under-use (default {UNDERUSE_OF_UNIFORM})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.collapse_share <= 1.0:
        parser.error(f"--collapse-share must be in (0, 1], got {args.collapse_share}")
    if not 0.0 <= args.underuse < 1.0:
        parser.error(f"--underuse must be in [0, 1), got {args.underuse}")
    affinity_path = args.affinity
    if affinity_path is None and (args.log.parent / AFFINITY_NAME).is_file():
        affinity_path = args.log.parent / AFFINITY_NAME
    out_dir = args.out or args.log.parent / "training_log_report"
    hint = "choose another --out"
    try:
        check_replaceable(out_dir, hint)  # before any work: only a folder all of whose files the toolkit wrote
        log = read_training_log(args.log)
        affinity = read_affinity_matrix(affinity_path) if affinity_path is not None else None
    except (TrainingLogError, OwnershipError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with built_in_scratch(out_dir, hint) as work:
            outputs = write_training_log_report(
                log, work, affinity,
                static_format=None if args.static == "none" else args.static,
                entropy_unit=args.entropy_unit,
                collapse_share=args.collapse_share,
                underuse_of_uniform=args.underuse,
            )
    except OwnershipError as exc:  # written into while this command ran: the new report is kept where it was built
        print(f"error: {exc}", file=sys.stderr)
        return 2
    outputs.report = out_dir / outputs.report.relative_to(work)
    outputs.images = {name: out_dir / path.relative_to(work) for name, path in outputs.images.items()}
    for warning in outputs.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if outputs.static_note:
        print(f"note: no static images: {outputs.static_note}", file=sys.stderr)
    print(f"report: {outputs.report}")
    for path in outputs.images.values():
        print(f"image: {path}")
    return 0
