"""Benchmark routing collection against the model's plain forward pass, and the cache's size.

    uv run exp/benchmark_collection.py --help

The command lives in the library (``core.commands.benchmark_collection``); this file only runs it.
"""

import sys

from core.commands.benchmark_collection import main

if __name__ == "__main__":
    main()
    sys.exit(0)
