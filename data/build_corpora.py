"""Rebuild the offline corpora bundled under ``data/corpora/`` (a maintainer's tool).

The toolkit never runs this: it reads only the compressed copies in ``data/corpora``. It
exists so the bundle can be reproduced and audited: every file there is a byte-exact,
xz-compressed copy of a public source (see each folder's ``ATTRIBUTION.md``).

    uv run python -m data.build_corpora --source /path/to/datasets [--stdlib /path/to/lib/python3.11]

``--source`` is a folder with ``wikitext-2/{valid,test}.txt``, ``gsm8k/{train,test}.jsonl``
and ``LICENSE``, ``tinyshakespeare/input.txt`` and ``alice/alice.txt``.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sysconfig
from pathlib import Path

CORPORA_DIR = Path(__file__).parent / "corpora"

# The Python source corpus: a fixed selection of pure-Python standard-library modules,
# chosen for readable, idiomatic code of varied kinds (text, math, data structures, parsing).
PYTHON_SOURCE_MODULES = (
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "glob.py",
    "graphlib.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
)

# (source file relative to --source, bundled file relative to data/corpora)
TEXT_FILES = (
    ("wikitext-2/valid.txt", "wikitext2/valid.txt.xz"),
    ("wikitext-2/test.txt", "wikitext2/test.txt.xz"),
    ("gsm8k/train.jsonl", "gsm8k/train.jsonl.xz"),
    ("gsm8k/test.jsonl", "gsm8k/test.jsonl.xz"),
    ("tinyshakespeare/input.txt", "shakespeare/input.txt.xz"),
    ("alice/alice.txt", "alice/alice.txt.xz"),
)


def _xz(src: bytes, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(lzma.compress(src, preset=9 | lzma.PRESET_EXTREME))


def build(source: Path, stdlib: Path, out: Path = CORPORA_DIR) -> dict[str, int]:
    """Write the compressed corpora under ``out``; return bytes written per file."""
    sizes: dict[str, int] = {}
    for rel_src, rel_dst in TEXT_FILES:
        path = source / rel_src
        if not path.is_file():
            raise FileNotFoundError(f"missing source file {path}")
        _xz(path.read_bytes(), out / rel_dst)
        sizes[rel_dst] = (out / rel_dst).stat().st_size
    shutil.copyfile(source / "gsm8k" / "LICENSE", out / "gsm8k" / "LICENSE")

    lines = []
    for module in PYTHON_SOURCE_MODULES:
        text = (stdlib / module).read_text(encoding="utf-8")
        lines.append(json.dumps({"module": module, "source": text}))
    dst = out / "python_source" / "stdlib.jsonl.xz"
    _xz(("\n".join(lines) + "\n").encode("utf-8"), dst)
    sizes["python_source/stdlib.jsonl.xz"] = dst.stat().st_size
    shutil.copyfile(stdlib / "LICENSE.txt", out / "python_source" / "LICENSE.txt")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder holding the source corpora")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    args = parser.parse_args()
    sizes = build(args.source, args.stdlib)
    for name, size in sizes.items():
        print(f"{name}: {size / 1e6:.3f} MB")
    print(f"total: {sum(sizes.values()) / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
