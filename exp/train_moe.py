"""Train the toolkit's own MoE on the bundled corpus, or run seed 002's routing grid.

    uv run exp/train_moe.py --help

The command lives in the library (``core.commands.train_moe``); this file only runs it.
"""

import sys

from core.commands.train_moe import main

if __name__ == "__main__":
    sys.exit(main())
