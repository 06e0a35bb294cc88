"""The main experiment's command line: options from configs/ and flags, the run, one-line errors.

    uv run exp/basic_routing_analysis.py                      # offline, the embedded model
    uv run exp/basic_routing_analysis.py --model allenai/OLMoE-1B-7B-0924 \\
        --datasets fineweb,gsm8k,humaneval --checkpoints auto --device cuda --dtype bfloat16 --wandb
"""

from __future__ import annotations

import os
import sys

from core.pipeline.options import OptionsError, parse_options


def main(argv: list[str] | None = None) -> int:
    """Run the study from the command line; the exit code is 0, 2 for a one-line error, 1 for a full or read-only
    disk met during the work (one line too), 130 when interrupted."""
    try:
        opts = parse_options(argv)  # before the heavy imports: --help and option errors answer at once
    except OptionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from core.collection.checkpoints import CheckpointError
    from core.model_access.discovery import NoRoutersError
    from core.commands.disk_errors import disk_error_line
    from core.model_access.loading import ModelLoadError
    from core.owned_files import OwnershipError
    from core.pipeline.launch import stop_ranks
    from core.pipeline.run import BasicRoutingAnalysis
    from core.store.cache_format import CacheError
    from data import DataError

    if not opts.output.progress:  # --no-progress: transformers' own bars ("Loading weights") stay quiet too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        summary = BasicRoutingAnalysis(options=opts).run()
    except (OptionsError, ModelLoadError, NoRoutersError, CacheError, CheckpointError, DataError, OwnershipError) as e:
        print(f"error: {e}", file=sys.stderr)  # what is wrong, in one line, not a stack trace
        return 2
    except OSError as e:  # a full disk, a folder made read-only during the run: every write is atomic, caches resume
        print(disk_error_line(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every write is atomic: finished shards stay, the next run resumes from them
        print("\ninterrupted: finished cache shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        import torch.distributed as dist

        if not isinstance(e, dist.DistError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # a peer that died, or a collective that timed out
        print(f"error: rank {os.environ.get('RANK', 0)}: another process of this torchrun stopped answering ({first[:200]}); "
              "finished caches are kept: run the same command again to resume", file=sys.stderr)
        return 1
    finally:
        stop_ranks()
    if summary is None:
        print(f"rank {os.environ.get('RANK')}: its share of the caches is collected and analysed; rank 0 writes the report")
        return 0
    print()
    print(f"Done in {summary.seconds:.1f} s.")
    for f in summary.findings:
        print(f"- {f}")
    for w in summary.warnings:
        print(f"! {w}")
    print(f"\nReport: {summary.report.resolve()}")
    print(f"Summary: {(summary.run_dir / 'summary.md').resolve()}")
    if summary.wandb_dir:
        print(f"W&B run: {summary.wandb_dir}")
    return 0
