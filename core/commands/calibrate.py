"""Calibrate every finding's verdict: false-positive rate, power and coverage on simulated worlds that look like text.

    uv run exp/calibrate.py                        # issue 27's sizes: 16 x 64, top-8, 40 x 250 tokens, 30 seeds
    uv run exp/calibrate.py --seeds 5 --worlds iid,documents --jobs 2
    uv run exp/calibrate.py --layers 4 --experts 16 --top-k 2 --docs 24 --doc-len 100   # a fast look
    uv run exp/calibrate.py --worlds topical --analyses routing_consistency --seeds 150 --first-seed 30 --out -

Prints one line per verdict against the bar (per-element false-positive rate <= 7% and <= 10% of
runs flagging any element in every null world, power >= 80% on every planted effect, coverage
>= 90%), and writes the summary and the long table to ``--out`` (docs/CALIBRATION.md by default)
and the long table to ``--csv``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from core.paths import REPO_ROOT

HAND_WRITTEN = "\n## How to read it"  # from this heading on, --out keeps what was there


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--seeds", type=int, default=30, help="draws of every world (default 30)")
    p.add_argument("--first-seed", type=int, default=0, help="the first draw's seed (a longer look with fresh draws: 30)")
    p.add_argument("--analyses", default=None,
                   help="comma-separated registered analyses the null worlds run (default: all), e.g. routing_consistency")
    p.add_argument("--worlds", default=None, help="comma-separated world names (default: every world)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--docs", type=int, default=40, help="documents per draw (few-document worlds set their own)")
    p.add_argument("--doc-len", type=int, default=250, help="tokens per document")
    p.add_argument("--oracle", default=None, help="comma-separated planted domain worlds: print the power of a test told "
                   "where the effect is (core/calibration/oracle.py) and exit")
    p.add_argument("--resamples", type=int, default=200, help="the run's resamples (as --resamples of the main run)")
    p.add_argument("--jobs", type=int, default=1, help="processes (each draw is independent)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "CALIBRATION.md", help="markdown table ('-': none)")
    p.add_argument("--csv", type=Path, default=None, help="also write the long table as CSV")
    p.add_argument("--no-progress", action="store_true")
    return p


TITLE = "# Calibration of every finding's verdict"
CSV_HEADER = "world,verdict,role"


def _check_outputs(out: Path, csv: Path | None) -> None:
    """Before any work: never overwrite a file this command did not write (its mark: the first line it writes)."""
    from core.owned_files import FileMark, check_output_file

    for path, first, flag in ((out, TITLE, "--out"), (csv, CSV_HEADER, "--csv")):
        if path is not None and str(path) != "-":
            check_output_file(path, FileMark(first), f"choose another {flag}")


def _split_worlds(given: str | None) -> tuple[list, list[str], list[str]]:
    """The routing worlds, router-weight worlds and loss worlds named in ``--worlds`` (all of each kind by default)."""
    from core.calibration.catalogue import worlds
    from core.calibration.losses import loss_world_names
    from core.calibration.weights import ROUTER_WORLDS

    names = given.split(",") if given else None
    weight_names = [w.name for w in ROUTER_WORLDS if names is None or w.name in names]
    loss_names = [n for n in loss_world_names() if names is None or n in names]
    try:
        chosen = worlds(None if names is None else [n for n in names if n not in weight_names + loss_names])
    except ValueError as e:
        _parser().error(f"{e}; router worlds: {', '.join(w.name for w in ROUTER_WORLDS)}; "
                        f"loss worlds: {', '.join(loss_world_names())}")
    return chosen, weight_names, loss_names


def _oracle(args: argparse.Namespace, shape: object) -> int:
    """Print the oracle's power on each named planted domain world (seeds as ``--seeds``/``--first-seed``)."""
    from core.calibration.catalogue import worlds
    from core.calibration.oracle import oracle_power

    try:
        chosen = worlds(args.oracle.split(","))
    except ValueError as e:
        _parser().error(str(e))
    for world, _ in chosen:
        if world.domain_factor == 1.0:
            _parser().error(f"{world.name} plants no domain effect; the oracle is for domain worlds")
        r = oracle_power(world, shape, range(args.first_seed, args.first_seed + args.seeds))
        print(f"{r['world']}: a test told the layer, expert and domain finds it in {r['oracle_power']:.0%} of {r['runs']} runs "
              f"at 0.05, and in {r['oracle_power_searching']:.0%} at 0.05 / (layers x experts)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import pandas as pd

    from core.calibration.losses import calibrate_losses
    from core.calibration.runner import calibrate
    from core.calibration.table import markdown, passes, summary
    from core.calibration.weights import calibrate_routers
    from core.calibration.worlds import Shape
    from core.pipeline.spec import registered
    from core.safe_io import atomic_write_text

    if min(args.seeds, args.layers, args.experts, args.top_k, args.docs, args.doc_len, args.jobs) < 1 or args.top_k > args.experts:
        _parser().error("every size must be >= 1 and --top-k at most --experts")
    if args.layers < 10:
        _parser().error("the planted worlds put effects at layers 1 to 9: --layers must be at least 10")
    if args.first_seed < 0:
        _parser().error("--first-seed must be 0 or more")
    shape = Shape(args.layers, args.experts, args.top_k, args.docs, args.doc_len)
    if args.oracle:
        return _oracle(args, shape)
    chosen, weight_names, loss_names = _split_worlds(args.worlds)
    from core.owned_files import OwnershipError

    try:
        _check_outputs(args.out, args.csv)
    except OwnershipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    analyses = args.analyses.split(",") if args.analyses else None
    known = {s.name for s in registered() if s.stage == "pass"}
    if analyses and (unknown := sorted(set(analyses) - known)):
        _parser().error(f"unknown analyses {', '.join(unknown)}; registered pass analyses: {', '.join(sorted(known))}")
    long = calibrate(chosen, shape, seeds, args.resamples, args.jobs, progress=not args.no_progress, analyses=analyses)
    if weight_names:
        long = pd.concat([long, calibrate_routers(args.experts, seeds, names=weight_names)], ignore_index=True)
    if loss_names:
        long = pd.concat([long, calibrate_losses(seeds, names=loss_names)], ignore_index=True)
    s = summary(long)
    for _, row in s.iterrows():
        print(f"{'ok  ' if passes(row) else 'FAIL'} {row['verdict']}: worst FPR per element {row['worst FPR per element']:.3f}"
              f" ({row['worst null world']}), runs flagging any {row['runs flagging any (worst)']:.2f}, "
              f"power {row['power'] or '–'}, coverage {row['coverage (min)']:.3f}")
    command = "uv run exp/calibrate.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    about = (f"{TITLE}\n\n{shape.layers} layers x {shape.experts} experts, top-{shape.top_k}, "
             f"{shape.docs} documents x {shape.doc_len} tokens unless a world says otherwise, {args.seeds} seeds per world"
             f"{f' (from seed {args.first_seed})' if args.first_seed else ''}, "
             f"{args.resamples} resamples. Written by `core/commands/calibrate.py`.")
    if str(args.out) != "-":
        kept = args.out.read_text() if args.out.exists() else ""  # the hand-written reading of the table stays
        kept = kept[kept.index(HAND_WRITTEN):] if HAND_WRITTEN in kept else ""
        atomic_write_text(args.out, markdown(long, command.strip(), about) + kept)
    if args.csv:
        atomic_write_text(args.csv, long.to_csv(index=False))
    return 0 if all(passes(r) for _, r in s.iterrows()) else 1
