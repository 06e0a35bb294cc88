"""Where the repository's own folders are: configs/ (studies and training runs) and the default models/ folder.

The project is installed in place (``uv`` installs it editable), so these are the checkout's folders.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
