"""Benchmark the router-expert alignment analysis at OLMoE-1B-7B's expert shape, against a full SVD per expert.

    uv run exp/benchmark_alignment.py --help

The command lives in the library (``core.commands.benchmark_alignment``); this file only runs it.
"""

import sys

from core.commands.benchmark_alignment import main

if __name__ == "__main__":
    main()
    sys.exit(0)
