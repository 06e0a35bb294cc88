"""List and prune routing caches: every setting gets its own cache, so old ones pile up.

    uv run exp/caches.py --help

The command lives in the library (``core.commands.caches``); this file only runs it.
"""

import sys

from core.commands.caches import main

if __name__ == "__main__":
    sys.exit(main())
