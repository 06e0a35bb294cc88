"""Benchmark the toolkit's MoE layer against a dense FFN and transformers' OLMoE MoE block.

    uv run exp/benchmark_moe.py --help

The command lives in the library (``core.commands.benchmark_moe``); this file only runs it.
"""

import sys

from core.commands.benchmark_moe import main

if __name__ == "__main__":
    sys.exit(main())
