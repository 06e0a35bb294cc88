"""Memory of every streaming analysis of the main run, and whether it grows with the number of tokens.

    uv run exp/benchmark_memory.py --help

The command lives in the library (``core.commands.benchmark_memory``); this file only runs it.
"""

import sys

from core.commands.benchmark_memory import main

if __name__ == "__main__":
    main()
    sys.exit(0)
