"""A canary tree around a command: files a careless or hostile input must never touch.

``CanaryTree(root, owned=[...])`` plants files that look like a user's (some named like the
toolkit's own: a ``shard-00099.safetensors``, a ``manifest.json``, a ``models/`` folder), records
every file under ``root`` with its content hash and mode, and :meth:`CanaryTree.check` asserts
that, outside the folders the command owns, no file changed, vanished or appeared.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

PLANTED = {
    "victim.txt": b"a user's notes\n",
    "README.md": b"# a user's project\n",
    "models/keep.txt": b"a user's file beside the models\n",
    "results/other-run/metrics.json": b'{"a user": "other run"}\n',
    "results/cache/shard-00099.safetensors": b"not the toolkit's shard\n",
    "notes/manifest.json": b'{"shards": ["../victim.txt"]}\n',
    "data/keep.py": b"# a package file\n",
}


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p.relative_to(root))] = ("link:" + os.readlink(p), 0)
                continue
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return out


@dataclass
class CanaryTree:
    """Files planted under ``root``; ``owned`` are the folders the command may write (relative to ``root``)."""

    root: Path
    owned: list[str] = field(default_factory=list)
    planted: dict[str, bytes] = field(default_factory=lambda: dict(PLANTED))

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        for rel, data in self.planted.items():
            p = self.root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        self.before = _snapshot(self.root)

    def _is_owned(self, rel: str) -> bool:
        parts = Path(rel).parts
        return any(parts[: len(Path(o).parts)] == Path(o).parts for o in self.owned)

    def check(self) -> None:
        """Assert that nothing outside ``owned`` changed, vanished or appeared."""
        after = _snapshot(self.root)
        changed = sorted(r for r in self.before if not self._is_owned(r) and after.get(r) != self.before[r])
        new = sorted(r for r in after if r not in self.before and not self._is_owned(r))
        assert not changed, f"files outside the owned folders changed or vanished: {changed}"
        assert not new, f"files appeared outside the owned folders: {new}"
        for rel in self.planted:  # planted files are never the command's, even inside an owned folder
            assert (self.root / rel).read_bytes() == self.planted[rel], f"the planted file {rel} was changed or removed"
