"""Visualize an MoE training log (seed 000's JSONL format, or the toolkit's own trainer logs).

    uv run exp/visualize_training_log.py --help

The command lives in the library (``core.commands.visualize_training_log``); this file only runs it.
"""

import sys

from core.commands.visualize_training_log import main

if __name__ == "__main__":
    sys.exit(main())
