"""False-positive rate, power and interval coverage of every finding's verdict, on simulated worlds that look like text.

    uv run exp/calibrate.py --help

The command lives in the library (``core.commands.calibrate``); this file only runs it.
"""

import sys

from core.commands.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
