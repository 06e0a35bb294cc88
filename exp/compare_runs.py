"""Compare several runs of the study side by side in one HTML page (the same figures, the findings in one table).

    uv run exp/compare_runs.py --help

The command lives in the library (``core.commands.compare_runs``); this file only runs it.
"""

import sys

from core.commands.compare_runs import main

if __name__ == "__main__":
    sys.exit(main())
